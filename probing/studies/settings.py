"""The settings of the studies, declared apart from them (they need torch and Optuna) so that the commands'
options (`probing mdl --help`, `probing search --help`), configs and manifests read them without either:
`SearchSettings` and `SearchRequest` (one search), `MdlRequest` (one online code)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from probing.core.errors import ProbingError
from probing.core.settings import (
    FROZEN_MODE,
    check,
    check_as,
    check_scope,
    comma_separated,
    declared,
    from_cli,
    scoped,
    setting,
)
from probing.core.shared_settings import ModelLabel
from probing.data.types import DataOptions
from probing.models.source import ModelSource
from probing.probes.settings import ProbeInputs, ProbeTarget, TrainRequest, TrainSettings, Trial, probe_kind
from probing.tasks import get_task
from probing.tasks.controls import ControlInputs
from probing.tasks.search_space import SearchSpace


@dataclass(frozen=True, kw_only=True)
class MdlRequest(ProbeTarget, ModelLabel, ControlInputs):
    """One online code: a task (or its control), layer, probe and trial on stored features."""

    out: Path
    settings: TrainSettings
    trial: Trial
    features: Path = setting(help="Folder with one feature store per split (as for frozen probes).")
    shuffle_seed: int = setting(
        0, identity=True, low=0, help="Seed of the order the train examples are sent in (the blocks are its prefixes)."
    )
    data: DataOptions | None = None  # optional: else the paths the stores' manifests recorded

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> MdlRequest:
        """`probing mdl`'s request from its options, checked: the hyper-parameters from --lr and --epochs, or
        from the best trial of the search `--from-search` names (of the same task, layer and probe, on the same
        features and targets)."""
        from probing.core.records import SearchSummary

        check_as(Trial, "seed", values["seed"], "--seed")
        values = dict(values)
        search = values.pop("from_search", None)
        if search is None:
            return from_cli(cls, values)
        if values["lr"] is not None or values["epochs"] is not None:
            raise ProbingError("--from-search: give it or --lr and --epochs, not both")
        summary = SearchSummary.read(search)
        asked = (get_task(values["task"]).name, values["layer"], values["probe"])
        if (summary.task, summary.layer, summary.probe) != asked:
            raise ProbingError(
                f"--from-search: {search} searched {summary.task} layer {summary.layer} {summary.probe}, "
                f"not {asked[0]} layer {asked[1]} {asked[2]}"
            )
        params = summary.best["params"]
        if "lr" not in params:
            raise ProbingError(f"--from-search: {search} found no learning rate (a {summary.probe} search)")
        best = {name: params[name] for name in ("lr", "epochs", "giou_scale", "l1_scale") if name in params}
        request = from_cli(cls, values | best)
        from probing.studies.mdl import check_from_search  # reads the search's features: torch

        check_from_search(search, request.check())
        return request

    def check(self) -> MdlRequest:
        check(self)
        spec = get_task(self.task)
        self.settings.check_given()
        if not probe_kind(self.settings.probe).batched:
            raise ProbingError(
                f"mdl: --probe {self.settings.probe} is not a batched probe (linear, swiglu2, swiglu4 ...)"
            )
        self.trial.check(self.settings.probe, spec.head.kind)
        if spec.head.uniform_bits is None:
            raise ProbingError(
                f"mdl: task '{spec.name}' has a {spec.head.kind} head, which has no code for its targets"
            )
        if self.control:
            spec.check_control()
        return self


def default_space(task: str, probe: str = "linear") -> SearchSpace:
    """The task's default space (the paper's Table 4 for its tasks), as the probe kind searches it."""
    return get_task(task).search_space.for_probe(probe)


STUDY_JOURNAL = "study.log"  # the study of a search without --storage, in its folder


def _final_seeds(text: str, option: str) -> tuple[int, ...]:
    return comma_separated(int, what="integers")(text, option)


def _distinct(values: tuple[int, ...], where: str) -> None:
    """Each final seed once: a repeated seed would train and count the same probe twice."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ProbingError(f"{where}: seed {repeated[0]} is given twice (each seed once), got {list(values)}")


@scoped
@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How a search runs: the `search` section of a config's experiment and the options of `probing search`."""

    trials: int = setting(10, identity=True, low=1, help="Trials to finish (shared by every worker of a study).")
    batch: int = setting(
        8, identity=True, low=1, cli="--trials-per-batch", help="Frozen: trials trained together in one pass."
    )
    seed: int = setting(0, identity=True, low=0, help="Seed of the sampler and of every trial's probe.")
    final_seeds: tuple[int, ...] | None = setting(
        None,
        identity=True,
        low=0,
        parse=_final_seeds,
        valid=_distinct,
        help="Seeds the best trial is evaluated with (default: --seed).",
    )
    storage: str | None = setting(
        None,
        help="journal:PATH | sqlite:///file.db | postgresql://user:pass@host/db (default: a journal file in the "
        "search folder, so a killed search resumes).",
    )
    study_name: str | None = setting(None, identity=True, config=False, help="Study to create or resume in --storage.")
    pruner: Literal["auto", "none", "median", "hyperband", "successive-halving"] = setting(
        "auto",
        identity=True,
        omit_default=True,
        help="Stops hopeless trials from their per-epoch val metric: Optuna's median, hyperband or successive-halving "
        "pruner; auto: successive-halving for unfrozen searches (a study begun with another keeps it), none for "
        "frozen ones (their trials train together in one pass).",
    )
    in_memory: bool = setting(
        False,
        applies=FROZEN_MODE,
        help="Extract the layer from --model straight into device memory (GPU if present) and train there: no "
        "feature store is written or read (the same values as one; the manifests say features_in_memory).",
    )
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

    def pruner_for(self, mode: str) -> str:
        if self.pruner == "auto":
            return "successive-halving" if mode == "unfrozen" else "none"
        return self.pruner


@dataclass(frozen=True, kw_only=True)
class SearchRequest(ProbeTarget, ModelSource, SearchSettings, ProbeInputs):
    """One search: a task, layer and probe; its space; what it trains on; how it runs."""

    out: Path
    settings: TrainSettings
    space: SearchSpace
    data: DataOptions | None = None

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> SearchRequest:
        """`probing search`'s request from its options, checked: the search-space options given replace those
        dimensions of the task's default space (no dimension the probe or the task's head would ignore), and the
        search's batch order is its seed."""
        task, probe = values["task"], values["probe"]
        given = [f.name for f, _ in declared(SearchSpace) if values.get(f.name) is not None]
        parsed = from_cli(SearchSpace, {name: values[name] for name in given})  # the options' text, checked
        check_scope(parsed, probe=probe, head=get_task(task).head.kind)
        space = default_space(task, probe).overridden({name: getattr(parsed, name) for name in given}, None)
        return from_cli(cls, {**values, "order_seed": values["seed"]}, space=space)

    def check(self) -> SearchRequest:
        check(self)
        check_scope(self, mode=self.mode)  # --in-memory: frozen only (unfrozen trials train the resampler itself)
        final = self.seeds_of_best
        if len(set(final)) != len(final):
            raise ProbingError(f"final seeds must be distinct, got {list(final)}")
        self.space.check()
        if self.in_memory:
            self.check_in_memory()
        # in memory, the stores are extracted once the request is checked (`run_search`): an empty mapping stands
        # for them here
        self.train_request((), self.out, stores={} if self.in_memory else None).check()
        if self.storage is not None and self.study_name is None:
            raise ProbingError("--storage needs --study-name (the study that workers share)")
        return self

    def check_in_memory(self) -> None:
        """`--in-memory` reads the features from the model, in this one process."""
        if self.features is not None:
            raise ProbingError("--in-memory: extracts the features from --model itself; leave out --features")
        if self.model is None or self.data is None:
            raise ProbingError("--in-memory: needs --model and the task's data options (the features come from them)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ProbingError(
                "--in-memory: the features live in one process's device memory; run one process (several "
                "`probing search --in-memory` workers on one --storage each extract their own), not `accelerate launch`"
            )

    @property
    def storage_url(self) -> str:
        """Where the study lives: --storage, or a journal file in the search folder."""
        return self.storage or f"journal:{self.out / STUDY_JOURNAL}"

    def train_request(self, trials: tuple[Trial, ...], out: Path, stores=None) -> TrainRequest:
        """The `probing train` request of some trials of this search (`stores`: open ones, e.g. in memory)."""
        shared = {f.name: getattr(self, f.name) for f in (*fields(ModelSource), *fields(ProbeInputs))}
        return TrainRequest(
            task=self.task,
            layer=self.layer,
            out=out,
            trials=trials,
            settings=self.settings,
            data=self.data,
            stores=stores,
            **shared,
        )

    def memory_stores(self) -> dict[str, Any]:
        """`--in-memory`: the searched layer extracted from the model into the training device's memory, as
        `probing extract` with its default settings would store it (`probing.store.memory`)."""
        from probing.store.memory import memory_stores

        return memory_stores(self, self.data, [self.layer], device=self.settings.device)
