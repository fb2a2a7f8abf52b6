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

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from probing.core.artifacts import (
    MANIFEST_NAME,
    code_version,
    existing_output_matches,
    first_difference,
    json_normalised,
    pid_alive,
    read_manifest,
    write_json,
)
from probing.core.errors import ProbingError
from probing.core.locks import FolderLock
from probing.core.records import MetricsRecord, SearchSummary, StageResult
from probing.core.settings import identity
from probing.probes.checkpoints import TrialCheckpoint
from probing.probes.run import make_trainer, write_run
from probing.probes.train import Trial
from probing.probes.trainers import FittedTrial, Trainer, TrialHooks
from probing.studies.settings import (  # noqa: F401 (their home was here)
    STUDY_JOURNAL,
    SearchRequest,
    SearchSettings,
    default_space,
)
from probing.studies.storages import claim_study, load_or_create_study, open_storage, redact
from probing.tasks import get_task
from probing.tasks.search_space import SearchSpace  # noqa: F401 (imported from here by scripts)

log = logging.getLogger(__name__)

SEARCH_FORMAT_VERSION = 1
LEGACY_STUDY = "search"  # the one name every search's own study had before studies were named after their search
HYPERBAND_REDUCTION = 4  # the reduction factor of hyperband and successive halving (see `pruner_of`)
PRUNERS = ("none", "median", "hyperband", "successive-halving")  # the kinds a study records (user attr "pruner")
CLAIM = "search.json"  # written first: what the folder's study and outputs are for (the manifest comes last)


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


def pruner_of(request: SearchRequest, kind: str | None = None):
    """Optuna's pruner of `kind` (default: the request's); the resource is the epoch, up to the space's longest run."""
    import optuna

    kind = kind or request.pruner_for(request.mode)
    if kind == "successive-halving":
        # The default of unfrozen searches: asynchronous successive halving (Li et al., 2020), rungs after epochs
        # 1, 4, 16 ... (reduction factor 4), each trial compared with every trial that reached the same rung.
        # Hyperband runs several such brackets with later first rungs, to hedge against judging too early; with
        # the ~10 trials of an unfrozen search each bracket gets too few trials to compare, and Optuna deals trials
        # to brackets by a hash of the study's name and the trial's number, so what is saved depends on the name:
        # the same 10-trial benchmark search (benchmarks/search.py) trained 49 epochs under the name "search" and
        # 40 under its current name. One bracket compares every trial with all the others, whatever the name.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=HYPERBAND_REDUCTION)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "hyperband":
        # Reduction factor 4 (Li et al. suggest 3 or 4): with the few trials of an unfrozen search, 3 makes one
        # bracket more (three for 9 epochs), and each bracket's first trials run to the end with nothing to be
        # compared with. On the 10-trial benchmark (benchmarks/search.py) 3 trained 1.36x fewer epochs than no
        # pruning and 4 trained 2.09x fewer, with the same pruned best value, inside the unpruned best's interval.
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(request.space.epochs), reduction_factor=HYPERBAND_REDUCTION
        )
    return optuna.pruners.NopPruner()


def study_pruner(study, request: SearchRequest) -> str:
    """The kind of pruner the study's trials are judged by: the request's, or the one an `auto` study began with."""
    recorded = study.user_attrs.get("pruner")
    if request.pruner == "auto" and recorded in PRUNERS:
        return recorded
    return request.pruner_for(request.mode)


def create_study(request: SearchRequest, identity: dict[str, Any] | None = None, storage=None):
    """Create or join the request's study (in `storage`, opened from the request when not given). The worker
    that creates it samples with the search's seed (a search run alone is reproducible); workers that join or
    resume it draw from their own streams, or all of them would propose the same points."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage if storage is not None else open_storage(request.storage_url)
    name = request.study_name or _own_study_name(request, storage)
    direction = get_task(request.task).head.direction
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=direction,
            sampler=_sampler(request.seed),
            pruner=pruner_of(request),
        )
    except optuna.exceptions.DuplicatedStudyError:
        seed = hash((request.seed, os.getpid(), time.time_ns())) % (2**31)
        study = load_or_create_study(storage, name, direction, _sampler(seed), pruner_of(request))
        recorded = study.user_attrs.get("pruner")
        if request.pruner == "auto" and recorded in PRUNERS and recorded != request.pruner_for(request.mode):
            # begun when `auto` meant another pruner (hyperband before successive halving): its trials were judged
            # by that one, and the rest of them are too
            study.pruner = pruner_of(request, recorded)
    if identity is not None:
        claim_study(study, identity, str(request.out))
        describe_study(study, request, identity)
    return study


def default_study_name(request: SearchRequest) -> str:
    """The name of a search's own study (without --study-name): what it searches, so that optuna-dashboard opened
    on several journals tells them apart (e.g. "BLIP-2 frozen vsr layer 3 linear")."""
    parts = [request.label] if request.label else []
    parts += [request.mode, request.task, f"layer {request.layer}", request.settings.probe]
    return " ".join(parts + (["control"] if request.control else []))


def _own_study_name(request: SearchRequest, storage) -> str:
    """The study of a search without --study-name: the one its journal holds under the name it had before studies
    were named (a search started then resumes it), else `default_study_name`."""
    names = {study.study_name for study in storage.get_all_studies()}
    return LEGACY_STUDY if LEGACY_STUDY in names else default_study_name(request)


def _sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def describe_study(study, request: SearchRequest, identity: dict[str, Any]) -> None:
    """What optuna-dashboard shows of the study: the metric's name and what its trials train."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    spec = get_task(request.task)
    with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna 5: what it stores is not
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names([f"val {spec.head.main_metric}"])
    inputs = identity.get("inputs", {})  # the model's identity, or the stores' (which name their model)
    weights = inputs.get("model") or next(iter(inputs.get("features", {}).values()), {}).get("model", {})
    for key, value in {
        "task": spec.name,
        "model": request.label or request.model or f"{weights.get('family')} ({weights.get('init')})",
        "mode": request.mode,
        "layer": request.layer,
        "probe": request.settings.probe,
        "pruner": study_pruner(study, request),
        "store": identity.get("inputs"),
    }.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


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
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
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
        worker = trial.user_attrs.get("worker") or {}
        gone = (
            worker.get("host") == socket.gethostname()
            and worker.get("pid") not in (None, os.getpid())
            and (not pid_alive(worker["pid"]))
        )  # a worker of this machine that is gone: no need to wait for its beats
        if now - last <= GRACE_HEARTBEATS * interval and not gone:
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        origin = trial.user_attrs.get("retry_of", trial.number)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": origin})
        log.warning("trial %d stopped beating (worker gone?): failed and enqueued again", trial.number)
        retried.append(trial.number)
    return retried


def _counts_toward_budget(trial) -> bool:
    from optuna.trial import TrialState

    finished_or_running = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return trial.state in finished_or_running and "surplus" not in trial.user_attrs


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


def finished(study) -> list[Any]:
    """Trials that ran to their end or were stopped by the pruner: both spend the budget."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


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


@dataclass
class RunningTrial:
    """A trial of the study while a worker trains it: its hyper-parameters and its handle in the study."""

    trial: Trial
    handle: Any  # optuna's trial: reports per-epoch values, answers should_prune
    pruning: bool

    @property
    def origin(self) -> int:
        """The trial it retries, or its own number: the key of its checkpoints."""
        return self.handle.user_attrs.get("retry_of", self.handle.number)

    def report(self, epoch: int, value: float) -> bool:
        """Record the epoch's val metric (optuna-dashboard draws it); True when the pruner stops the trial."""
        self.handle.report(value, epoch)
        return self.pruning and self.handle.should_prune()


@dataclass
class Outcome:
    value: float
    pruned: bool = False


def run_trials(study, request: SearchRequest, fitter) -> None:
    """Ask, train, tell until `request.trials` trials of the study are finished (shared with other workers).

    `fitter` is a `TrialFitter`, or any function from a list of Trials to their val values."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    fit = fitter if isinstance(fitter, TrialFitter) else _ValuesOnly(fitter)
    distributions = request.space.distributions()
    pruning = request.pruner_for(request.mode) != "none"
    # disable=None: a bar on a terminal only (logs and one-line errors stay clean)
    bar = tqdm(
        total=request.trials,
        initial=min(len(finished(study)), request.trials),
        unit="trial",
        desc=f"search {request.task} {request.mode} layer {request.layer}",
        disable=None,
        leave=False,
    )
    while len(finished(study)) < request.trials:
        bar.n = min(len(finished(study)), request.trials)
        bar.refresh()
        retry_stale_trials(study, request.heartbeat)
        taken = sum(1 for t in study.get_trials(deepcopy=False) if _counts_toward_budget(t))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        free = request.trials - taken
        if free <= 0 and not waiting:
            time.sleep(request.poll)  # other workers hold the remaining trials; they may still die
            continue
        batch = request.batch if request.mode == "frozen" else 1  # unfrozen trials train (and are told) one by one
        asked = _ask_batch(study, request, distributions, max(1, min(free, batch)) if free > 0 else 1)
        if not asked:
            time.sleep(request.poll)
            continue
        running = [RunningTrial(trial_from(t.params, request.seed), t, pruning) for t in asked]
        with Heartbeat(asked, request.heartbeat):
            try:
                outcomes = fit.fit(running)
            except BaseException:
                for trial in asked:  # failed now, and asked again so that another run resumes it from its checkpoints
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    study.enqueue_trial(
                        trial.params, user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number)}
                    )
                raise
        for trial, outcome in zip(asked, outcomes, strict=True):
            if outcome.pruned:
                told = study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            else:
                told = study.tell(trial, outcome.value, skip_if_finished=True)
            if told.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                # another worker took it for dead meanwhile and retried it
                log.warning(
                    "trial %d was failed by another worker while running; its retry counts instead", trial.number
                )
    bar.close()


@dataclass
class _ValuesOnly:
    """A plain function from trials to their val values, as a fitter (no pruning, no checkpoints)."""

    train_batch: Callable[[list[Trial]], list[float]]

    def fit(self, running: list[RunningTrial]) -> list[Outcome]:
        return [Outcome(value) for value in self.train_batch([r.trial for r in running])]


class TrialFitter:
    """The search's side of the trainer contract: fits a batch of running trials (reporting each epoch to the
    pruner, checkpointing unfrozen trials in `folder/checkpoints/trial-<n>`) and returns their outcomes.

    An unfrozen trial is a whole fine-tune: the best one so far is kept (in memory, and its best epoch's weights
    in `folder/checkpoints/best/`), so the final evaluation needs no second training, even after a restart."""

    def __init__(self, trainer: Trainer, folder: Path | None = None):
        self.trainer = trainer
        self.head = trainer.spec.head
        self.folder = folder
        self.kept: FittedTrial | None = None

    def _checkpoint(self, running: RunningTrial) -> TrialCheckpoint | None:
        if self.folder is None or not self.trainer.keeps_models:
            return None
        return TrialCheckpoint(self.folder / "checkpoints" / f"trial-{running.origin}")

    def fit(self, running: list[RunningTrial]) -> list[Outcome]:
        hooks = [TrialHooks(prune=r.report, checkpoint=self._checkpoint(r)) for r in running]
        outcomes = []
        for fitted, hook in zip(self.trainer.fit([r.trial for r in running], hooks), hooks, strict=True):
            value = fitted.result.val_metrics[self.head.main_metric]
            if self.trainer.keeps_models and not fitted.result.pruned:
                self._keep(fitted, value)
            if hook.checkpoint is not None:
                hook.checkpoint.clear()  # the trial ended: its epochs are no longer needed
            outcomes.append(Outcome(value, fitted.result.pruned))
        return outcomes

    def _keep(self, fitted: FittedTrial, value: float) -> None:
        if self.kept is not None and not self.head.better(value, self.kept.result.val_metrics[self.head.main_metric]):
            return
        fitted.model = fitted.model.cpu()
        self.kept = fitted
        if self.folder is not None:
            self.trainer.save_fitted(fitted, self.folder / "checkpoints" / "best")

    def final(self, trials: tuple[Trial, ...]) -> list[FittedTrial]:
        """The best trial with its final seeds: a kept fit (in memory, or on disk) reused, the others trained."""
        if self.kept is None and self.folder is not None and self.trainer.keeps_models:
            self.kept = self.trainer.load_fitted(self.folder / "checkpoints" / "best")
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
        with plt.rc_context():  # Optuna's plots switch matplotlib to its ggplot style: kept inside this block
            if name == "param_importances":  # fANOVA (scikit-learn), seeded: the same study gives the same plot
                from optuna.importance import FanovaImportanceEvaluator

                try:
                    axes = make(study, evaluator=FanovaImportanceEvaluator(seed=0))
                except RuntimeError as error:  # e.g. every trial scored the same: no variance to attribute
                    log.debug("no parameter importances: %s", error)  # the summary lists the plots made
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


def study_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """What a study's trials train (task, mode, layer, probe, space, settings, inputs): workers and resumed
    searches that join the study must agree on it. The budget, batch and seeds may differ between them."""
    return {key: identity[key] for key in ("task", "mode", "layer", "probe", "hidden", "space", "settings", "inputs")}


def claim_folder(out: Path, identity: dict[str, Any]) -> str:
    """'complete' when `out` holds this search finished (its manifest matches), 'open' when it is this search
    begun (its claim matches) or new; another search there is refused, naming the differing field."""
    if read_manifest(out) is not None:
        existing_output_matches(out, identity, "search")  # refuses, naming the field, when it differs
        return "complete"
    claim = out / CLAIM
    expected = json_normalised(identity)
    if out.exists() and not claim.is_file() and any(p.name != STUDY_JOURNAL for p in out.iterdir()):
        raise ProbingError(f"{out}: not empty and has no {MANIFEST_NAME}; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(claim, "x", encoding="utf-8") as handle:  # O_EXCL: one worker writes it, the others read it
            handle.write(json.dumps(expected, indent=2, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        return "open"
    except FileExistsError:
        pass
    for _ in range(50):  # a claim being written by another worker at this moment
        try:
            recorded = json.loads(claim.read_text(encoding="utf-8"))
            break
        except json.JSONDecodeError:
            time.sleep(0.1)
    else:
        raise ProbingError(f"{claim}: not valid JSON")
    differing = first_difference(expected, recorded)
    if differing is not None:
        raise ProbingError(
            f"{out}: holds a search begun with a different '{differing}'; choose another output directory or remove it"
        )
    return "open"


def run_search(request: SearchRequest, stores: dict[str, Any] | None = None) -> StageResult[SearchSummary]:
    """Search (resuming the study where it stopped), then train the best trial once more and evaluate it on
    test; write `request.out`. Several workers may run the same search: they share its trials, one writes the
    result, the others reuse it. With `request.in_memory` the features are extracted in memory (`stores`: ones
    already extracted, e.g. by `probing run` for several searches of one model and task)."""
    request.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DDP would pair processes that Optuna gives different trials: they would train each other's models
        raise ProbingError(
            "probing search runs one process per worker: start several `probing search` processes "
            "on one --storage instead of `accelerate launch` (which is for `probing train` and "
            "`probing extract`)"
        )
    out = request.out
    if request.in_memory and stores is None:
        stores = request.memory_stores()  # the model and data read now (their identity); a split extracted when read
    # its trials: the best one's, once known
    train_request = request.train_request((), out / "best", stores if request.in_memory else None)
    trainer = make_trainer(train_request)
    identity = search_identity(request, trainer.inputs)
    # A storage given with --storage is opened (and refused in one line) before anything is written into --out;
    # the default one is a journal inside --out, opened once the folder is claimed.
    storage = open_storage(request.storage_url) if request.storage is not None else None
    if claim_folder(out, identity) == "complete":
        MetricsRecord.relabel(out / "best", request.label)  # a new label names the reused best run
        return StageResult(SearchSummary.read(out), out, "reused")
    study = create_study(request, study_identity(identity), storage)
    fitter = TrialFitter(trainer, out)
    run_trials(study, request, fitter)
    with FolderLock(out / "result", heartbeat=min(request.heartbeat, 10.0)):
        if read_manifest(out) is not None and existing_output_matches(out, identity, "search"):
            return StageResult(SearchSummary.read(out), out, "reused")  # another worker wrote it meanwhile
        summary = _write_result(request, study, trainer, fitter, train_request, identity)
    return StageResult(summary, out, "built")


def _write_result(request, study, trainer, fitter, train_request, identity) -> SearchSummary:
    """The search's outputs; the manifest last, so that a folder with a manifest is whole."""
    out = request.out
    best = study.best_trial
    final_trials = tuple(trial_from(best.params, seed) for seed in request.seeds_of_best)
    best_request = replace(train_request, trials=final_trials)
    best_folder = out / "best"
    if best_folder.exists():  # left by an attempt that stopped before its manifest: the same run is reused
        from probing.probes.run import run_identity

        if (
            read_manifest(best_folder) is not None
            and read_manifest(best_folder).get("trials")
            == json_normalised(run_identity(best_request, trainer.inputs))["trials"]
        ):
            best_run = MetricsRecord.read(best_folder)
        else:
            shutil.rmtree(best_folder)
            best_run = write_run(best_request, trainer, fitter.final(final_trials), out=best_folder).value
    else:
        best_run = write_run(best_request, trainer, fitter.final(final_trials), out=best_folder).value
    rows = trial_rows(study)
    write_trials_csv(rows, out / "trials.csv")
    plots = _plots(study, out / "plots")
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
    write_json(out / "summary.json", summary.to_json())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json(
        out / MANIFEST_NAME,
        {
            **identity,
            "code_version": code_version(),
            "storage": redact(request.storage) if request.storage else None,
            # not part of the identity: a search in memory gives the numbers of the same search on a store
            **({"features_in_memory": True} if request.in_memory else {}),
            "study": {
                "storage": redact(request.storage_url),
                "name": study.study_name,
                "pruner": study_pruner(study, request),
            },
        },
    )
    return summary
