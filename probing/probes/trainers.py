"""The trainer contract shared by `probing train` and `probing search`, with its two implementations.

A `Trainer` is prepared once for one task, layer, probe and input (stored features, or a model and its
data) and then:
- `inputs`: the identity of what it trains on (recorded in run and search manifests);
- `fit(trials) -> [FittedTrial]`: trains trials (frozen: all in one batched pass; unfrozen: one by one);
- `outputs(fitted, split)`: a fitted model's raw outputs on a split, in example order;
- `examples(split)`, `targets(split)`: what the outputs are judged against.

`probing train` fits its trials and writes the run; `probing search` fits batches of trials, then the best
one again with its final seeds (or keeps an unfrozen fit, `keeps_models`) and writes that run the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from probing.core.artifacts import PARTIAL_MARK, save_safetensors, write_json
from probing.core.settings import identity
from probing.data.types import DataOptions, Example
from probing.models import ModelSource
from probing.models.text import QFormerText
from probing.probes.checkpoints import TrialCheckpoint
from probing.probes.data import checked_stores, feature_identity, load_probe_splits, open_stores
from probing.probes.logreg import fit_logreg
from probing.probes.modules import probe_kind
from probing.probes.train import (
    EpochCallback,
    ProbeData,
    TrainSettings,
    Trial,
    TrialResult,
    probe_outputs,
    train_frozen,
    train_single,
)
from probing.tasks import TaskSpec, get_task


@dataclass
class TrialHooks:
    """What a search attaches to a trial: its pruner, told each epoch's val metric (True: stop the trial now), and
    where its epoch checkpoints go (unfrozen trials)."""

    prune: Callable[[int, float], bool] | None = None
    checkpoint: TrialCheckpoint | None = None


def epoch_callback(hooks: Sequence[TrialHooks] | None) -> EpochCallback | None:
    """The trainers' per-epoch callback for a list of trials' hooks."""
    if not hooks or all(hook.prune is None for hook in hooks):
        return None

    def on_epoch(epoch: int, values: list[float], running: list[bool]) -> list[bool]:
        return [
            bool(hook.prune is not None and active and hook.prune(epoch, value))
            for hook, value, active in zip(hooks, values, running, strict=True)
        ]

    return on_epoch


@dataclass
class FittedTrial:
    """A trained trial: its result, and the model `Trainer.outputs` evaluates (the best epoch's weights)."""

    result: TrialResult
    model: Any

    @property
    def trial(self) -> Trial:
        return self.result.trial


class Trainer(Protocol):
    spec: TaskSpec
    settings: TrainSettings
    layer: int
    keeps_models: bool  # a fit is worth keeping for the final evaluation (else it is cheaper to fit again)

    @property
    def inputs(self) -> dict[str, Any]: ...

    def sources(self) -> dict[str, Any]:
        """What the run manifest records besides its identity (paths, the model's source)."""

    def fit(self, trials: list[Trial], hooks: Sequence[TrialHooks] | None = None) -> list[FittedTrial]: ...

    def save_fitted(self, fitted: FittedTrial, folder: Path) -> None:
        """Keep a fit on disk (unfrozen: its trained weights), replacing the one kept before."""

    def load_fitted(self, folder: Path) -> FittedTrial | None:
        """The fit `save_fitted` kept, or None."""

    def outputs(self, fitted: FittedTrial, split: str) -> torch.Tensor: ...

    def examples(self, split: str) -> list[Example]: ...

    def targets(self, split: str) -> torch.Tensor: ...


class FrozenTrainer:
    """Probes on stored features: the stores are checked when it is made, read on the first fit (a reused
    search never reads them). `stores` hands over stores already open instead of a `features` folder (features
    extracted in memory, `probing.store.memory`: extracted on that first read)."""

    keeps_models = False

    def __init__(
        self,
        task: str,
        features: Path,
        layer: int,
        settings: TrainSettings,
        data: DataOptions | None = None,
        control_seed: int | None = None,
        shuffled_features: bool = False,
        stores: Mapping[str, Any] | None = None,
    ):
        self.spec, self.settings, self.layer, self.data = get_task(task), settings, layer, data
        self.control_seed = control_seed  # None: the task's targets; else its control's (`probing.tasks.controls`)
        self.shuffled_features = shuffled_features  # the floor: train and val rows permuted (`probing.tasks.controls`)
        if stores is not None:
            self.stores = checked_stores(dict(stores), self.spec, layer)
        else:
            self.stores = open_stores(features, self.spec, layer)
        self._splits: dict[str, ProbeData] | None = None

    @property
    def inputs(self) -> dict[str, Any]:
        return {"features": {split: feature_identity(store) for split, store in self.stores.items()}}

    def sources(self) -> dict[str, Any]:
        first = next(iter(self.stores.values()))
        if getattr(first, "in_memory", False):  # no folder to point at: the model they were extracted from
            return first.sources()
        return {"feature_paths": {split: str(store.path.resolve()) for split, store in self.stores.items()}}

    @property
    def splits(self) -> dict[str, ProbeData]:
        if self._splits is None:
            self._splits = load_probe_splits(
                self.stores,
                self.spec,
                self.layer,
                self.data,
                self.control_seed,
                self.shuffled_features,
                self.settings.latents,
            )
        return self._splits

    def fit(self, trials: list[Trial], hooks: Sequence[TrialHooks] | None = None) -> list[FittedTrial]:
        train, val = self.splits["train"], self.splits["val"]
        kind = probe_kind(self.settings.probe)
        on_epoch = epoch_callback(hooks)
        if kind.fit == "lbfgs":
            results = fit_logreg(train, val, trials, self.settings)
        elif kind.batched:  # K trials in one pass
            results = train_frozen(train, val, trials, self.settings, on_epoch)
        else:  # a probe of its own design: one trial at a time, in the standard loop
            results = [
                train_single(train, val, trial, self.settings, epoch_callback(hooks[i : i + 1] if hooks else None))
                for i, trial in enumerate(trials)
            ]
        return [FittedTrial(result, result.probe) for result in results]

    def save_fitted(self, fitted: FittedTrial, folder: Path) -> None:  # frozen fits are cheaper to train again
        pass

    def load_fitted(self, folder: Path) -> FittedTrial | None:
        return None

    def outputs(self, fitted: FittedTrial, split: str) -> torch.Tensor:
        return probe_outputs(fitted.model, self.splits[split], self.settings)

    def examples(self, split: str) -> list[Example]:
        return self.splits[split].examples

    def targets(self, split: str) -> torch.Tensor:
        return self.splits[split].targets


class UnfrozenTrainer:
    """The resampler trained with the probe: the checkpoint and data are read when it is made."""

    keeps_models = True

    def __init__(
        self,
        task: str,
        source: ModelSource,
        data: DataOptions,
        layer: int,
        settings: TrainSettings,
        features: Path | None = None,
        workers: int = 0,
        control_seed: int | None = None,
        text: QFormerText | None = None,
    ):
        from probing.probes.unfrozen import UnfrozenSetup

        self.settings, self.layer, self.data, self.features = settings, layer, data, features
        self.setup = UnfrozenSetup(
            task, source, data, settings, features=features, workers=workers, control_seed=control_seed, text=text
        )
        self.spec = self.setup.spec

    @property
    def inputs(self) -> dict[str, Any]:
        text = identity(self.setup.base.text)  # left out at its defaults: runs made before it keep their identity
        return {"model": self.setup.model_identity, "datasets": self.setup.fingerprints} | (
            {"text": text} if text else {}
        )

    def sources(self) -> dict[str, Any]:
        return {
            "model_source": self.setup.model_source,
            "vision_store": self.features is not None,
            "data_options": {k: str(v) for k, v in vars(self.data).items() if v is not None},
        }

    def fit(self, trials: list[Trial], hooks: Sequence[TrialHooks] | None = None) -> list[FittedTrial]:
        hooks = list(hooks) if hooks else [TrialHooks() for _ in trials]
        return [
            FittedTrial(*self.setup.fit(trial, self.layer, epoch_callback([hook]), hook.checkpoint))
            for trial, hook in zip(trials, hooks, strict=True)
        ]

    def save_fitted(self, fitted: FittedTrial, folder: Path) -> None:
        """The trained weights (safetensors) and the trial's result (JSON), written aside then renamed."""
        staging = folder.with_name(f".{folder.name}{PARTIAL_MARK}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trained = {
            name: p.detach().cpu().contiguous() for name, p in fitted.model.named_parameters() if p.requires_grad
        }
        save_safetensors(staging / "weights.safetensors", trained)
        result = fitted.result
        write_json(
            staging / "result.json",
            {
                "trial": asdict(result.trial),
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "val_metrics": result.val_metrics,
                "history": result.history,
            },
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)

    def load_fitted(self, folder: Path) -> FittedTrial | None:
        if not (folder / "result.json").is_file():
            return None
        saved = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        trial = Trial(**saved.pop("trial"))
        model = self.setup.model_for(trial, self.layer)
        model.load_state_dict(load_file(folder / "weights.safetensors"), strict=False)
        result = TrialResult(trial=trial, probe=model.probe, **saved)
        return FittedTrial(result, model)

    def outputs(self, fitted: FittedTrial, split: str) -> torch.Tensor:
        return self.setup.outputs(fitted.model, split)

    def examples(self, split: str) -> list[Example]:
        return self.setup.examples[split]

    def targets(self, split: str) -> torch.Tensor:
        return self.setup.targets[split]
