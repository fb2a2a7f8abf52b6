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

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from probing.artifacts import code_version, existing_output_matches, staged_directory, write_json
from probing.data.types import DataOptions
from probing.errors import ProbingError
from probing.models import ModelSource
from probing.probe_run import ProbeInputs, TrainRequest, make_trainer, write_run
from probing.records import SearchSummary, StageResult
from probing.search_space import SearchSpace
from probing.settings import check, comma_separated, identity, setting
from probing.tasks import get_task
from probing.train import TrainSettings, Trial
from probing.trainers import FittedTrial, Trainer

log = logging.getLogger(__name__)

SEARCH_FORMAT_VERSION = 1


def default_space(task: str, probe: str = "linear") -> SearchSpace:
    """The task's default space (the paper's Table 4 for its tasks), as the probe kind searches it."""
    return get_task(task).search_space.for_probe(probe)


def trial_from(params: dict[str, Any], seed: int) -> Trial:
    """The Trial a study's parameters stand for (a logistic-regression trial has only C)."""
    if "logreg_c" in params:
        return Trial(seed=seed, logreg_c=float(params["logreg_c"]))
    return Trial(
        lr=float(params["lr"]),
        epochs=int(params["epochs"]),
        seed=seed,
        giou_scale=float(params.get("giou_scale", 1.0)),
        l1_scale=float(params.get("l1_scale", 1.0)),
    )


def _final_seeds(text: str, option: str) -> tuple[int, ...]:
    return comma_separated(int, what="integers")(text, option)


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How a search runs: the `search` section of a config's experiment and the options of `probing search`."""

    trials: int = setting(10, identity=True, low=1, help="Trials to finish (shared by every worker of a study).")
    batch: int = setting(8, identity=True, low=1, help="Frozen: trials trained together in one pass.")
    seed: int = setting(0, identity=True, low=0, help="Seed of the sampler and of every trial's probe.")
    final_seeds: tuple[int, ...] | None = setting(
        None, identity=True, low=0, parse=_final_seeds, help="Seeds the best trial is evaluated with (default: --seed)."
    )
    storage: str | None = setting(
        None, help="sqlite:///file.db | postgresql://... | journal:PATH (default: in memory)."
    )
    study_name: str | None = setting(None, identity=True, config=False, help="Study to create or resume in --storage.")
    heartbeat: float = setting(
        30.0, above=0, help="Seconds between a running trial's heartbeats; a trial silent for 4x as long is retried."
    )
    poll: float = setting(
        1.0,
        above=0,
        cli=False,
        config=False,
        help="Seconds between looks at the study while other workers hold the remaining trials.",
    )

    @property
    def seeds_of_best(self) -> tuple[int, ...]:
        return self.final_seeds or (self.seed,)


@dataclass(frozen=True, kw_only=True)
class SearchRequest(ModelSource, SearchSettings, ProbeInputs):
    """One search: a task, layer and probe; its space; what it trains on; how it runs."""

    task: str
    layer: int
    out: Path
    settings: TrainSettings
    space: SearchSpace
    data: DataOptions | None = None

    def check(self) -> SearchRequest:
        check(self)
        final = self.seeds_of_best
        if len(set(final)) != len(final):
            raise ProbingError(f"final seeds must be distinct, got {list(final)}")
        self.space.check()
        self.train_request((), self.out).check()
        if self.storage is not None and self.study_name is None:
            raise ProbingError("--storage needs --study-name (the study that workers share)")
        return self

    def train_request(self, trials: tuple[Trial, ...], out: Path) -> TrainRequest:
        shared = {f.name: getattr(self, f.name) for f in (*fields(ModelSource), *fields(ProbeInputs))}
        return TrainRequest(
            task=self.task, layer=self.layer, out=out, trials=trials, settings=self.settings, data=self.data, **shared
        )


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
    direction = get_task(request.task).head.direction
    return optuna.create_study(
        storage=open_storage(request.storage),
        sampler=sampler,
        direction=direction,
        study_name=request.study_name,
        load_if_exists=True,
    )


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
    bar = tqdm(
        total=request.trials,
        initial=min(len(completed(study)), request.trials),
        unit="trial",
        desc=f"search {request.task} {request.mode} layer {request.layer}",
        disable=None,
        leave=False,
    )
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
                values = train_batch([trial_from(t.params, request.seed) for t in asked])
            except BaseException:
                for trial in asked:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
        for trial, value in zip(asked, values, strict=True):
            told = study.tell(trial, value, skip_if_finished=True)
            if told.state != TrialState.COMPLETE:  # another worker took it for dead meanwhile and retried it
                log.warning(
                    "trial %d was failed by another worker while running; its retry counts instead", trial.number
                )
    bar.close()


class TrialFitter:
    """The search's side of the trainer contract: fits a batch of trials and returns their val values; keeps the
    best fit when the trainer says fits are worth keeping (an unfrozen trial is a whole fine-tune), so the
    final evaluation need not train it again."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.head = trainer.spec.head
        self.kept: FittedTrial | None = None

    def __call__(self, trials: list[Trial]) -> list[float]:
        values = []
        for fitted in self.trainer.fit(trials):
            value = fitted.result.val_metrics[self.head.main_metric]
            if self.trainer.keeps_models and (
                self.kept is None or self.head.better(value, self.kept.result.val_metrics[self.head.main_metric])
            ):
                fitted.model = fitted.model.cpu()
                self.kept = fitted
            values.append(value)
        return values

    def final(self, trials: tuple[Trial, ...]) -> list[FittedTrial]:
        """The best trial with its final seeds: kept fits reused, the others trained."""
        reused = {self.kept.trial: self.kept} if self.kept is not None else {}
        todo = [trial for trial in trials if trial not in reused]
        fresh = iter(self.trainer.fit(todo) if todo else [])
        return [reused[trial] if trial in reused else next(fresh) for trial in trials]


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **{f"param_{k}": v for k, v in sorted(trial.params.items())},
                "retry_of": trial.user_attrs.get("retry_of"),
                "surplus": trial.user_attrs.get("surplus"),
                "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
                if trial.datetime_complete and trial.datetime_start
                else None,
            }
        )
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
    makers = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "param_importances": optuna_plots.plot_param_importances,
    }
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


def search_identity(request: SearchRequest, inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that define a search."""
    settings = request.settings.identity()
    top = {name: settings.pop(name) for name in ("probe", "hidden")}
    search = identity(request, only=[f.name for f in fields(SearchSettings)])
    search["final_seeds"] = list(request.seeds_of_best)
    return {
        "kind": "search",
        "format_version": SEARCH_FORMAT_VERSION,
        "task": get_task(request.task).name,
        "mode": request.mode,
        "layer": request.layer,
        **top,
        **request.control_identity(),
        **search,
        "space": request.space.identity(),
        "settings": settings,
        "inputs": inputs,
    }


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Every trial as a CSV row (pandas, object columns: integers stay integers beside missing values)."""
    import pandas as pd

    columns = sorted({key for row in rows for key in row}, key=lambda k: (not k == "number", k))
    pd.DataFrame(rows, columns=columns, dtype=object).to_csv(path, index=False)


def run_search(request: SearchRequest) -> StageResult[SearchSummary]:
    """Search, then train the best trial once more and evaluate it on test; write `request.out`."""
    request.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DDP would pair processes that Optuna gives different trials: they would train each other's models
        raise ProbingError(
            "probing search runs one process per worker: start several `probing search` processes "
            "on one --storage instead of `accelerate launch` (which is for `probing train` and "
            "`probing extract`)"
        )
    train_request = request.train_request((), request.out / "best")  # its trials: the best one's, once known
    trainer = make_trainer(train_request)
    identity = search_identity(request, trainer.inputs)
    if existing_output_matches(request.out, identity, "search"):
        return StageResult(SearchSummary.read(request.out), request.out, "reused")
    study = create_study(request)
    fitter = TrialFitter(trainer)
    run_trials(study, request, fitter)
    best = study.best_trial
    final_trials = tuple(trial_from(best.params, seed) for seed in request.seeds_of_best)
    with staged_directory(request.out) as staging:
        best_run = write_run(
            replace(train_request, trials=final_trials), trainer, fitter.final(final_trials), out=staging / "best"
        ).value
        rows = trial_rows(study)
        write_trials_csv(rows, staging / "trials.csv")
        plots = _plots(study, staging / "plots")
        run = best_run.run_of(request.seed)
        summary = SearchSummary(
            task=trainer.spec.name,
            mode=request.mode,
            layer=request.layer,
            probe=request.settings.probe,
            metric=trainer.spec.head.main_metric,
            trials_complete=len(completed(study)),
            trials_total=len(rows),
            best={
                "number": best.number,
                "params": best.params,
                "val_search": best.value,
                **run.splits,
                "best_epoch": run.best_epoch,
                "seeds": best_run.summary,
            },
            trials=rows,
            plots=plots,
            study_name=request.study_name,
        )
        write_json(staging / "summary.json", summary.to_json())
        write_json(
            staging / "manifest.json",
            {
                **identity,
                "code_version": code_version(),
                "storage": redact(request.storage) if request.storage else None,
            },
        )
    return StageResult(summary, request.out, "built")
