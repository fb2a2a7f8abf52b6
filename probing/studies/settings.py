"""The settings of the studies, declared apart from them (they need torch and Optuna) so that the commands'
options (`probing mdl --help`, `probing search --help`), configs and manifests read them without either:
`MdlRequest` (one online code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from probing.core.errors import ProbingError
from probing.core.settings import check, setting
from probing.data.types import DataOptions
from probing.probes.settings import TrainSettings, Trial, probe_kind
from probing.tasks import get_task
from probing.tasks.controls import ControlInputs


@dataclass(frozen=True, kw_only=True)
class MdlRequest(ControlInputs):
    """One online code: a task (or its control), layer, probe and trial on stored features."""

    task: str
    layer: int
    out: Path
    settings: TrainSettings
    trial: Trial
    features: Path = setting(help="Folder with one feature store per split (as for frozen probes).")
    shuffle_seed: int = setting(
        0, identity=True, low=0, help="Seed of the order the train examples are sent in (the blocks are its prefixes)."
    )
    label: str | None = setting(None, help="How reports name the model (default: its family and init).")
    data: DataOptions | None = None  # optional: else the paths the stores' manifests recorded

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
