"""`probing search`: Bayesian search of a probe's hyper-parameters with Optuna; the best trial on test.

- Sampler: TPE, seeded, multivariate, with the constant liar so that trials asked together (a batch, or
  other workers' running trials) spread over the space.
- Spaces (the paper's Table 4, overridable): lr log-uniform in [1e-5, 5e-4] for every task; epochs
  RefCOCOg {20, 30, 40}, VSR {3, 5, 10, 15, 20}, RCM {50, 100, 150} (RCM with early-stopping patience 10);
  RefCOCOg GIoU and L1 loss scales each in {1, 2, 4, 6, ..., 20} (our reading of the paper's
  "{1, 2, 4, ..., 20}").
- Frozen mode asks K trials at once, trains them as one batched pass (`train_frozen`) and tells K values;
  unfrozen mode trains one trial at a time. The objective is the trial's best val metric.
- Storage: in memory for one process (the default: trials take seconds, storage round trips would
  dominate); `--storage sqlite:///file.db` or `postgresql://...` (Optuna's RDBStorage) or
  `journal:PATH` (a JournalStorage file, safe on shared file systems) for several workers;
  `--study-name` names (and resumes) a study, and the trials it already finished count toward the budget.
- Several workers: each trial stamps a heartbeat in its user attributes while it runs; a running trial
  whose heartbeat is older than the grace period (its worker died) is failed and its parameters enqueued
  again (`retry_of`), so nothing is lost. Exactly `trials` trials finish: a trial runs only while fewer
  than that many valid trials (finished or running) precede it in number order (numbers are given out
  atomically by the storage, so every worker reaches the same verdict), and of two retries of one trial
  the lower-numbered runs. Trials refused by these rules end as FAIL with the reason in `surplus`.
- After the budget is spent, the best trial is trained once more from its seed (deterministic) and
  evaluated on test: `OUT/best/` is a `probing train` run folder (metrics, predictions, weights).
  `OUT/trials.csv`, `OUT/summary.json` and Optuna's plots (`OUT/plots/*.png`) describe the study.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probing.artifacts import code_version, existing_output_matches, staged_directory, write_json
from probing.data import DataOptions
from probing.errors import ProbingError
from probing.metrics import main_metric
from probing.runs import TrainRequest, run_training
from probing.train import TrainSettings, Trial, train_frozen

log = logging.getLogger(__name__)

EPOCH_CHOICES: dict[str, tuple[int, ...]] = {"refcocog": (20, 30, 40), "vsr": (3, 5, 10, 15, 20),
                                             "rcm": (50, 100, 150)}
LOSS_SCALES: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
LR_RANGE = (1e-5, 5e-4)
SEARCH_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float] = LR_RANGE  # log-uniform bounds
    epochs: tuple[int, ...] = (20, 30, 40)
    giou_scale: tuple[float, ...] | None = None  # RefCOCOg only
    l1_scale: tuple[float, ...] | None = None

    def check(self) -> SearchSpace:
        low, high = self.lr
        if not (0 < low <= high and math.isfinite(high)):
            raise ProbingError(f"search space: lr bounds must satisfy 0 < low <= high, got {list(self.lr)}")
        if not self.epochs or any(e < 1 for e in self.epochs):
            raise ProbingError(f"search space: epochs must be positive integers, got {list(self.epochs)}")
        for name in ("giou_scale", "l1_scale"):
            values = getattr(self, name)
            if values is not None and (not values or any(v < 0 for v in values)):
                raise ProbingError(f"search space: {name} must be non-negative numbers, got {list(values)}")
        return self

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        result: dict[str, Any] = {"lr": FloatDistribution(self.lr[0], self.lr[1], log=True),
                                  "epochs": CategoricalDistribution(list(self.epochs))}
        for name in ("giou_scale", "l1_scale"):
            values = getattr(self, name)
            if values is not None:
                result[name] = CategoricalDistribution(list(values))
        return result

    def trial(self, params: dict[str, Any], seed: int) -> Trial:
        return Trial(lr=float(params["lr"]), epochs=int(params["epochs"]), seed=seed,
                     giou_scale=float(params.get("giou_scale", 1.0)), l1_scale=float(params.get("l1_scale", 1.0)))


def default_space(task: str) -> SearchSpace:
    boxes = task == "refcocog"
    return SearchSpace(epochs=EPOCH_CHOICES[task], giou_scale=LOSS_SCALES if boxes else None,
                       l1_scale=LOSS_SCALES if boxes else None)


@dataclass(frozen=True)
class SearchRequest:
    task: str
    mode: str
    layer: int
    out: Path
    settings: TrainSettings
    space: SearchSpace
    trials: int = 10
    batch: int = 8  # frozen: trials asked and trained together
    seed: int = 0  # sampler seed, and the probes' initialisation and batch order
    storage: str | None = None
    study_name: str | None = None
    heartbeat: float = 30.0  # seconds between heartbeats; a trial silent for 4x this is retried
    features: Path | None = None
    data: DataOptions | None = None
    model: str | None = None
    init: str = "pretrained"
    revision: str | None = None
    workers: int = 0
    poll: float = 1.0  # seconds between looks at the study while other workers hold the remaining trials
    final_seeds: tuple[int, ...] | None = None  # seeds the best trial is evaluated with (default: `seed`)
    label: str | None = None  # how reports name the model

    def check(self) -> SearchRequest:
        if self.trials < 1 or self.batch < 1:
            raise ProbingError("--trials and --batch must be at least 1")
        if self.seed < 0:
            raise ProbingError(f"--seed must be >= 0, got {self.seed}")
        final = self.final_seeds or (self.seed,)
        if len(set(final)) != len(final) or min(final) < 0:
            raise ProbingError(f"final seeds must be distinct and >= 0, got {list(final)}")
        if self.heartbeat <= 0:
            raise ProbingError("--heartbeat must be positive")
        self.space.check()
        self.train_request((), self.out).check()
        if self.storage is not None and self.study_name is None:
            raise ProbingError("--storage needs --study-name (the study that workers share)")
        return self

    def train_request(self, trials: tuple[Trial, ...], out: Path) -> TrainRequest:
        return TrainRequest(task=self.task, mode=self.mode, layer=self.layer, out=out, trials=trials,
                            settings=self.settings, features=self.features, data=self.data, model=self.model,
                            init=self.init, revision=self.revision, workers=self.workers, label=self.label)


def open_storage(url: str | None):
    """None (in memory), an RDB URL (sqlite:///..., postgresql://...) or journal:PATH."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError as error:
            raise ProbingError(f"--storage {url.split(':')[0]}: a database driver is missing ({error})") from None
        except Exception as error:  # sqlalchemy's connection errors
            raise ProbingError(f"--storage: cannot open {redact(url)} ({type(error).__name__})") from None
    raise ProbingError(f"--storage: '{redact(url)}' is not sqlite:///..., postgresql://... or journal:PATH")


def redact(url: str) -> str:
    """A storage URL without its password, for manifests and messages."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def sampler_seed(request: SearchRequest) -> int:
    """The seed in one process; with a shared storage each worker gets its own (seed, process) stream, or all
    workers would propose the same points (parallel searches are not bit-reproducible)."""
    if request.storage is None:
        return request.seed
    return hash((request.seed, os.getpid(), time.time_ns())) % (2**31)


def create_study(request: SearchRequest):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed(request), multivariate=True, constant_liar=True)
    direction = "maximize"  # Acc@0.5 and accuracy
    return optuna.create_study(storage=open_storage(request.storage), sampler=sampler, direction=direction,
                               study_name=request.study_name, load_if_exists=True)


class Heartbeat:
    """Stamps `heartbeat` (unix time) on the given running trials every `interval` seconds."""

    def __init__(self, trials: Sequence[Any], interval: float):
        self.trials, self.interval = list(trials), interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        now = time.time()
        for trial in self.trials:
            try:
                trial.set_user_attr("heartbeat", now)
            except Exception as error:  # a storage hiccup must not end the beats silently
                log.warning("trial %d: heartbeat not recorded (%s)", trial.number, error)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._beat()

    def __enter__(self) -> Heartbeat:
        for trial in self.trials:  # other workers judge staleness by this trial's own interval, not theirs
            trial.set_user_attr("heartbeat_interval", self.interval)
        self._beat()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()


def _started(trial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


GRACE_HEARTBEATS = 4  # a running trial silent for this many of its heartbeat intervals is taken as dead


def retry_stale_trials(study, default_interval: float) -> list[int]:
    """Fail running trials whose worker stopped beating; enqueue their parameters again. Returns their numbers.

    Staleness is judged by each trial's own heartbeat interval (recorded by its worker), so a worker started
    with a short interval never fails the trials of a worker that beats slowly.
    """
    from optuna.trial import TrialState

    retried = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get("heartbeat", _started(trial))
        interval = trial.user_attrs.get("heartbeat_interval", default_interval)
        if now - last <= GRACE_HEARTBEATS * interval:
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        origin = trial.user_attrs.get("retry_of", trial.number)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": origin})
        log.warning("trial %d stopped beating (worker gone?): failed and enqueued again", trial.number)
        retried.append(trial.number)
    return retried


def _counts_toward_budget(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.RUNNING) and "surplus" not in trial.user_attrs


def surplus_reason(study, number: int, budget: int) -> str | None:
    """Why trial `number` must not run (None: it may). See the module docstring for the rules."""
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == number)
    origin = mine.user_attrs.get("retry_of")
    valid = [t for t in trials if _counts_toward_budget(t) or t.number == number]
    if origin is not None and any(t.user_attrs.get("retry_of") == origin and t.number < number for t in valid):
        return f"duplicate retry of trial {origin}"
    ahead = sum(1 for t in valid if t.number < number)
    if ahead >= budget:
        return f"budget of {budget} trials already taken"
    return None


def completed(study) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _ask_batch(study, request: SearchRequest, distributions, size: int) -> list[Any]:
    from optuna.trial import TrialState

    asked = []
    for _ in range(size):
        trial = study.ask(distributions)
        reason = surplus_reason(study, trial.number, request.trials)
        if reason is not None:
            trial.set_user_attr("surplus", reason)
            study.tell(trial, state=TrialState.FAIL)
            break
        asked.append(trial)
    return asked


def run_trials(study, request: SearchRequest, train_batch: Callable[[list[Trial]], list[float]]) -> None:
    """Ask, train, tell until `request.trials` trials of the study are complete (shared with other workers)."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    distributions = request.space.distributions()
    # disable=None: a bar on a terminal only (logs and one-line errors stay clean)
    bar = tqdm(total=request.trials, initial=min(len(completed(study)), request.trials), unit="trial",
               desc=f"search {request.task} {request.mode} layer {request.layer}", disable=None, leave=False)
    while len(completed(study)) < request.trials:
        bar.n = min(len(completed(study)), request.trials)
        bar.refresh()
        retry_stale_trials(study, request.heartbeat)
        taken = sum(1 for t in study.get_trials(deepcopy=False) if _counts_toward_budget(t))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        free = request.trials - taken
        if free <= 0 and not waiting:
            time.sleep(request.poll)  # other workers hold the remaining trials; they may still die
            continue
        asked = _ask_batch(study, request, distributions, max(1, min(free, request.batch)) if free > 0 else 1)
        if not asked:
            time.sleep(request.poll)
            continue
        with Heartbeat(asked, request.heartbeat):
            try:
                values = train_batch([request.space.trial(t.params, request.seed) for t in asked])
            except BaseException:
                for trial in asked:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
        for trial, value in zip(asked, values, strict=True):
            told = study.tell(trial, value, skip_if_finished=True)
            if told.state != TrialState.COMPLETE:  # another worker took it for dead meanwhile and retried it
                log.warning("trial %d was failed by another worker while running; its retry counts instead",
                            trial.number)
    bar.close()


@dataclass
class _Trainer:
    """Trains a batch of trials and returns their val metrics; keeps what the final evaluation can reuse."""

    train_batch: Callable[[list[Trial]], list[float]]
    inputs: dict[str, Any]
    setup: Any = None  # unfrozen: the UnfrozenSetup (data and ViT outputs loaded once)
    kept: dict[Trial, tuple[Any, Any]] = field(default_factory=dict)  # unfrozen: best trial -> (result, model)
    splits: dict[str, Any] | None = None  # frozen: the layer's features with targets, once read


def _frozen_trainer(request: SearchRequest) -> _Trainer:
    from probing.probe_data import feature_identity, load_probe_splits, open_stores

    stores = open_stores(request.features, request.task, request.layer)
    metric = main_metric(request.task)
    trainer = _Trainer(train_batch=lambda trials: [],
                       inputs={"features": {split: feature_identity(store) for split, store in stores.items()}})

    def train_batch(trials: list[Trial]) -> list[float]:
        if trainer.splits is None:  # features read on first use: a reused search never reads them
            trainer.splits = load_probe_splits(stores, request.task, request.layer, request.data)
        splits = trainer.splits
        return [r.val_metrics[metric] for r in train_frozen(splits["train"], splits["val"], trials, request.settings)]

    trainer.train_batch = train_batch
    return trainer


def _unfrozen_trainer(request: SearchRequest) -> _Trainer:
    from probing.unfrozen import UnfrozenSetup

    setup = UnfrozenSetup(request.task, request.model, request.data, request.settings, init=request.init,
                          revision=request.revision, features=request.features, workers=request.workers)
    metric = main_metric(request.task)
    trainer = _Trainer(train_batch=lambda trials: [], inputs={"model": setup.model_identity,
                                                              "datasets": setup.fingerprints}, setup=setup)
    best_value = [-math.inf]

    def train_batch(trials: list[Trial]) -> list[float]:
        values = []
        for trial in trials:
            result, model = setup.fit(trial, request.layer)
            value = result.val_metrics[metric]
            if value > best_value[0]:  # an unfrozen trial is a whole fine-tune: keep the best for the test run
                best_value[0] = value
                trainer.kept = {trial: (result, model.cpu())}
            values.append(value)
        return values

    trainer.train_batch = train_batch
    return trainer


@dataclass
class SearchOutcome:
    summary: dict[str, Any]
    reused: bool = False
    best_run: dict[str, Any] = field(default_factory=dict)


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value,
                     **{f"param_{k}": v for k, v in sorted(trial.params.items())},
                     "retry_of": trial.user_attrs.get("retry_of"), "surplus": trial.user_attrs.get("surplus"),
                     "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
                     if trial.datetime_complete and trial.datetime_start else None})
    return rows


def _plots(study, folder: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances, as PNG (importances need 2+ trials)."""
    import warnings

    import matplotlib
    from optuna.exceptions import ExperimentalWarning

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # optuna's matplotlib plots are "experimental"
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    folder.mkdir(parents=True, exist_ok=True)
    makers = {"optimization_history": optuna_plots.plot_optimization_history,
              "param_importances": optuna_plots.plot_param_importances}
    for name, make in makers.items():
        if name == "param_importances" and (len(completed(study)) < 2 or len(study.best_trial.params) < 2):
            continue
        if name == "param_importances":  # fANOVA (scikit-learn), seeded: the same study gives the same plot
            from optuna.importance import FanovaImportanceEvaluator

            try:
                axes = make(study, evaluator=FanovaImportanceEvaluator(seed=0))
            except RuntimeError as error:  # e.g. every trial scored the same: no variance to attribute
                log.info("no parameter importances: %s", error)
                continue
        else:
            axes = make(study)
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=120)
        plt.close(figure)
        written.append(f"plots/{name}.png")
    return written


def run_search(request: SearchRequest) -> SearchOutcome:
    """Search, then train the best trial once more and evaluate it on test; write `request.out`."""
    request.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DDP would pair processes that Optuna gives different trials: they would train each other's models
        raise ProbingError("probing search runs one process per worker: start several `probing search` processes "
                           "on one --storage instead of `accelerate launch` (which is for `probing train` and "
                           "`probing extract`)")
    trainer = (_frozen_trainer if request.mode == "frozen" else _unfrozen_trainer)(request)
    inputs = trainer.inputs
    identity = {"kind": "search", "format_version": SEARCH_FORMAT_VERSION, "task": request.task,
                "mode": request.mode, "layer": request.layer, "probe": request.settings.probe,
                "hidden": request.settings.hidden, "trials": request.trials, "batch": request.batch,
                "seed": request.seed,
                "final_seeds": list(request.final_seeds or (request.seed,)),
                "space": asdict(request.space), "study_name": request.study_name,
                "settings": {k: v for k, v in asdict(request.settings).items()
                             if k not in ("device", "eval_batch_size", "task", "probe", "hidden")},
                "inputs": inputs}
    if existing_output_matches(request.out, identity, "search"):
        return SearchOutcome(summary=json.loads((request.out / "summary.json").read_text()), reused=True)
    study = create_study(request)
    run_trials(study, request, trainer.train_batch)
    best = study.best_trial
    final_trials = tuple(request.space.trial(best.params, seed) for seed in (request.final_seeds or (request.seed,)))
    metric = main_metric(request.task)
    with staged_directory(request.out) as staging:
        best_metrics = run_training(request.train_request(final_trials, staging / "best"), trainer.setup,
                                    {t: kept for t, kept in trainer.kept.items() if t in final_trials},
                                    splits=trainer.splits)
        rows = trial_rows(study)
        columns = sorted({key for row in rows for key in row}, key=lambda k: (not k == "number", k))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        (staging / "trials.csv").write_text(buffer.getvalue())
        plots = _plots(study, staging / "plots")
        run = next((r for r in best_metrics["runs"] if r["seed"] == request.seed), best_metrics["runs"][0])
        summary = {
            "task": request.task, "mode": request.mode, "layer": request.layer, "probe": request.settings.probe,
            "metric": metric, "trials_complete": len(completed(study)), "trials_total": len(rows),
            "best": {"number": best.number, "params": best.params, "val_search": best.value,
                     "val": run["val"], "test": run["test"], "best_epoch": run["best_epoch"],
                     "seeds": best_metrics["summary"]},
            "trials": rows, "plots": plots, "study_name": request.study_name,
        }
        write_json(staging / "summary.json", summary)
        write_json(staging / "manifest.json", {**identity, "code_version": code_version(),
                                               "storage": redact(request.storage) if request.storage else None})
    return SearchOutcome(summary=summary, best_run=best_metrics)
