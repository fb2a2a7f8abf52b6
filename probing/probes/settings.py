"""The settings of a probe run, declared apart from training (which needs torch) so that the commands' options
(`probing train --help`, `probing search --help`), configs and manifests read them without importing torch:
`Trial` (one probe's hyper-parameters), `TrainSettings` (how every trial trains), `ProbeInputs` (what a probe
trains on) and `TrainRequest` (one `probing train`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from probing.core.errors import ProbingError
from probing.core.settings import (
    BOX_TASKS,
    HIDDEN_PROBES,
    LOGREG_PROBE,
    SGD_PROBES,
    check,
    check_as,
    check_scope,
    comma_separated,
    from_cli,
    identity,
    scoped,
    setting,
)
from probing.core.shared_settings import ModelLabel, Placement
from probing.data.types import DataOptions
from probing.models.source import ModelSource
from probing.models.text import QFormerText
from probing.tasks import get_task
from probing.tasks.controls import ControlInputs

if TYPE_CHECKING:
    from probing.tasks.heads import Head


def probe_kind(name: str):
    from probing.probes.modules import probe_kind as registered  # the probe registry imports torch

    return registered(name)


@scoped
@dataclass(frozen=True)
class Trial:
    """The hyper-parameters of one probe run (the paper's search space: lr, epochs, loss scales; C for logreg)."""

    lr: float | None = setting(None, identity=True, above=0, applies=SGD_PROBES, help="Peak learning rate (AdamW).")
    epochs: int | None = setting(
        None, identity=True, low=1, applies=SGD_PROBES, help="Epochs (the best epoch by val is kept)."
    )
    seed: int = setting(0, identity=True, low=0, cli=False, help="Initialisation seed of the probe.")
    giou_scale: float = setting(
        1.0, identity=True, low=0, applies=BOX_TASKS, help="Box tasks: weight of the GIoU loss."
    )
    l1_scale: float = setting(1.0, identity=True, low=0, applies=BOX_TASKS, help="Box tasks: weight of the L1 loss.")
    logreg_c: float | None = setting(
        None,
        identity=True,
        omit_default=True,
        above=0,
        applies=LOGREG_PROBE,
        help="logreg probe: inverse L2 regularisation strength C (default 1).",
    )

    def check(self, probe: str = "linear", head: str | None = None) -> Trial:
        """Ranges, the settings the probe needs, and (with `head`, where a user gave the trial) no setting given
        that the probe or the task's head would ignore."""
        check(self)
        if head is not None:
            check_scope(self, probe=probe, head=head)
        if probe_kind(probe).fit == "sgd":
            for name in ("lr", "epochs"):
                if getattr(self, name) is None:
                    raise ProbingError(f"--{name} is required for --probe {probe}")
        return self

    def identity(self) -> dict[str, Any]:
        return identity(self)


# How a probe reads one layer's latents `[B, Q, H]`: the paper flattens them (`Q x H` inputs); their mean over
# the Q latents (`H` inputs) gives every family a probe of the same size whatever its latent count.
LATENT_READINGS = ("flatten", "mean")


def check_latent_reading(value: str, where: str) -> None:
    if value not in LATENT_READINGS:
        raise ProbingError(f"{where}: unknown latent reading '{value}' (choose {' | '.join(LATENT_READINGS)})")


@scoped
@dataclass(frozen=True)
class TrainSettings(Placement):
    task: str = setting(cli=False, config=False, help="The task (a registered name or a task YAML file).")
    probe: str = setting(
        "linear",
        identity=True,
        config=False,
        help="A registered probe: linear | swiglu2 | swiglu4 (SGD) | logreg (L-BFGS, binary tasks, frozen) ...",
    )
    hidden: int = setting(
        768, identity=True, low=1, applies=HIDDEN_PROBES, help="Width of the SwiGLU probes' hidden layers."
    )
    batch_size: int = setting(128, identity=True, low=1, help="Training batch size.")
    warmup_fraction: float = setting(
        0.1, identity=True, low=0, high=1, help="Fraction of the steps of linear warm-up (0 to 1)."
    )
    weight_decay: float = setting(0.01, identity=True, low=0, help="AdamW weight decay (weight matrices only).")
    patience: int | None = setting(
        None,
        identity=True,
        low=0,
        config=False,
        help="Early-stopping patience in epochs; 0 = none (default: the task's, 10 for RCM, none otherwise).",
    )
    order_seed: int = setting(0, identity=True, low=0, help="Seed of the batch order.")
    latents: str = setting(
        "flatten",
        identity=True,
        omit_default=True,  # runs made before the setting existed read the flattened latents
        valid=lambda value, where: check_latent_reading(value, where),
        help="How the probe reads a layer's latents: flatten (the paper's Q x H inputs) | mean (their mean over "
        "the latents: H inputs, so families with different latent counts get probes of one size).",
    )

    @property
    def head(self) -> Head:
        return get_task(self.task).head

    @property
    def effective_patience(self) -> int | None:
        """None: the task's default; 0: no early stopping."""
        if self.patience is None:
            return get_task(self.task).patience
        return self.patience or None

    def check(self) -> TrainSettings:
        get_task(self.task)
        probe_kind(self.probe)
        return check(self)

    def check_given(self) -> TrainSettings:
        """`check`, and (for settings a user gave: requests, configs) no setting the probe or the task's head
        would ignore (`--hidden` with a linear probe ...)."""
        check_scope(self.check(), probe=self.probe, head=self.head.kind)
        return self

    def identity(self) -> dict[str, Any]:
        """The settings as run and search manifests record them (patience resolved)."""
        return identity(self) | {"patience": self.effective_patience}


Mode = Literal["frozen", "unfrozen"]


@dataclass(frozen=True, kw_only=True)
class TaskChoice:
    """The task a command reads: declared once for every command that takes `--task`."""

    task: str = setting(help="A registered task (`probing tasks`) or a task YAML file.")


@dataclass(frozen=True, kw_only=True)
class ProbeTarget(TaskChoice):
    """What one probe reads: a task and one layer of the resampler. Declared once here for `probing train`,
    `probing search` and `probing mdl` (their requests derive from it), and read from here by their options, by a
    config's planned runs and by the manifests those write."""

    layer: int = setting(
        low=0,
        help="Resampler layer to probe: 1..N (12 for the BLIP-2 Q-Former); 0 the layers' input (the embedded "
        "queries), where a family has one. The features must hold it.",
    )


@dataclass(frozen=True, kw_only=True)
class ProbeInputs(ModelLabel, ControlInputs, QFormerText):
    """What a probe trains on, shared by `probing train` and `probing search`: stored features (frozen), or the
    model itself trained with the probe (unfrozen, the `ModelSource` beside these fields, its texts read as
    `QFormerText` says); the task's targets or its control's (`ControlInputs`)."""

    mode: Mode = setting("frozen", help="frozen (probe on stored features) | unfrozen (resampler + probe).")
    features: Path | None = setting(
        None,
        help="Folder with one feature store per split (frozen); for unfrozen, "
        "optional stores made with --store-vision.",
    )
    workers: int = setting(0, low=0, help="Unfrozen: image decoding processes.")


@dataclass(frozen=True, kw_only=True)
class TrainRequest(ProbeTarget, ModelSource, ProbeInputs):
    """One probe configuration on one layer: what `probing train` runs (and a search's best trial)."""

    out: Path
    trials: tuple[Trial, ...]
    settings: TrainSettings
    data: DataOptions | None = None  # frozen: optional (else the stores' recorded paths); unfrozen: required
    # frozen: stores already open instead of --features (features extracted in memory, `probing.store.memory`)
    stores: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> ModelSource:
        return ModelSource(**{f.name: getattr(self, f.name) for f in fields(ModelSource)})

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> TrainRequest:
        """`probing train`'s request from its options, checked: one trial per seed of `--seeds`, each with the
        hyper-parameters the options give."""
        seeds = comma_separated(int, what="integers")(values["seeds"], "--seeds")
        for seed in seeds:
            check_as(Trial, "seed", seed, "--seeds")
        trial = from_cli(Trial, dict(values))
        return from_cli(cls, dict(values), trials=tuple(replace(trial, seed=seed) for seed in seeds))

    def check(self) -> TrainRequest:
        if self.mode not in ("frozen", "unfrozen"):
            raise ProbingError(f"--mode: unknown mode '{self.mode}' (choose frozen or unfrozen)")
        if self.mode == "frozen" and self.features is None and self.stores is None:
            raise ProbingError("--features is required for --mode frozen")
        if self.mode == "unfrozen" and (self.model is None or self.data is None):
            raise ProbingError("--mode unfrozen needs --model and the task's data options")
        if self.mode == "frozen" and self.text_settings != QFormerText():
            option = "--instruction" if self.instruction is not None else "--text-preprocessing"
            raise ProbingError(f"{option}: unfrozen only (a frozen probe reads the texts as its stores were extracted)")
        self.check_text()
        if self.mode == "unfrozen" and probe_kind(self.settings.probe).fit != "sgd":
            raise ProbingError(
                "--probe logreg: frozen only (an L-BFGS fit has no gradient steps to share with the resampler)"
            )
        spec = get_task(self.task)
        if self.control:
            spec.check_control()
        check_scope(self, mode=self.mode)  # --shuffled-features: frozen only (a floor permutes stored rows)
        if self.data is not None and get_task(self.data.task).name != spec.name:
            raise ProbingError(f"--task {self.task}: the data options are for '{self.data.task}'")
        seeds = [t.seed for t in self.trials]
        if len(set(seeds)) != len(seeds):
            raise ProbingError("--seeds: each seed once")
        self.settings.check_given()
        for trial in self.trials:
            trial.check(self.settings.probe, spec.head.kind)
        return self
