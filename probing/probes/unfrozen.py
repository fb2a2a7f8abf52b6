"""Unfrozen probing: the Q-Former (and query tokens, BLIP-2's text embeddings) trained jointly with the probe.

The ViT stays frozen and in eval mode; the Q-Former's dropout is on while training. ViT outputs come from
a vision store (`probing extract --store-vision`) when one is given, so the ViT is never recomputed;
otherwise images are decoded in DataLoader workers and the ViT runs under `no_grad` for each batch.
The checkpoint is read once; each trial trains the resampler's truncated copy (`Resampler.truncated`):
layers above the probed one cannot influence the probe, so they are dropped for the run (no wasted
compute, no parameters without gradient under DDP), and every trial starts from the same weights.
Parameters that still receive no gradient signal (the probed layer's text FFN, whose output no query reads)
get no weight decay. Training itself is `train.train_module`: the same schedule, early stopping and
evaluation as the frozen path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from probing.core.device_copies import to_device, to_device_chunked
from probing.core.devices import resolve_device
from probing.core.errors import ProbingError
from probing.data.images import load_rgb_image
from probing.data.types import DataOptions, Example
from probing.models import ModelSource, Resampler, load_resampler
from probing.models.text import QFormerText
from probing.probes.checkpoints import TrialCheckpoint
from probing.probes.modules import Probe, new_probe
from probing.probes.train import (
    EpochCallback,
    EpochOrder,
    ModuleRun,
    TrainSettings,
    Trial,
    TrialResult,
    compute_dtype,
    parameter_groups,
    probe_input_size,
    probe_inputs,
    train_module,
)
from probing.store.features import FeatureStore, VisionStore
from probing.tasks import get_task, load_split
from probing.tasks.heads import Head


class UnfrozenProbe(nn.Module):
    """Resampler + probe: `forward(vision, input_ids, attention_mask) -> [B, out]`.

    `vision` is pixel values (the ViT runs under no_grad) or ViT outputs from a vision store.
    """

    def __init__(self, resampler: Resampler, probe: Probe, layer: int, from_pixels: bool, latents: str = "flatten"):
        super().__init__()
        self.resampler, self.probe, self.layer, self.from_pixels = resampler, probe, layer, from_pixels
        self.latents = latents  # how the probe reads them (`probing.probes.train.LATENT_READINGS`)

    def forward(
        self, vision: torch.Tensor, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.from_pixels:
            with torch.no_grad():
                vision = self.resampler.encode_images(vision)
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask} if input_ids is not None else None
        states = self.resampler.query_states(vision, tokens, [self.layer])[:, 0]
        return self.probe(probe_inputs(states, self.latents))


class VisionTable:
    """ViT outputs by image id, read once from a vision store. On the GPU when the table fits with room to
    spare (then a batch is one gather on the device and nothing crosses the bus: ~0.7 MB per example), else in
    CPU memory and batches go over in page-locked memory."""

    def __init__(self, store: VisionStore, device: torch.device | None = None):
        embeds = store.load()
        self.embeds = to_device_chunked(embeds, device, embeds.dtype) if _fits_on(device, embeds) else embeds
        self.row = {image_id: row for row, image_id in enumerate(store.ids)}
        self.path = store.path

    @property
    def on_gpu(self) -> bool:
        return self.embeds.device.type == "cuda"

    def row_of(self, image_id: int) -> int:
        if image_id not in self.row:
            raise ProbingError(f"{self.path}: no ViT output for image {image_id}")
        return self.row[image_id]

    def gather(self, rows: Sequence[int]) -> torch.Tensor:
        return self.embeds[to_device(torch.tensor(rows), self.embeds.device)]


def _fits_on(device: torch.device | None, table: torch.Tensor) -> bool:
    if device is None or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return table.nbytes < 0.4 * free  # the rest stays for the Q-Former's activations, gradients and AdamW state


class _Examples(Dataset):
    """(pixel values, or the example's row in the vision table; text; target) per example."""

    def __init__(
        self, examples: Sequence[Example], targets: torch.Tensor, resampler: Resampler, vision: VisionTable | None
    ):
        self.examples, self.targets, self.vision = list(examples), targets, vision
        self.pixels = resampler.pixels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        example = self.examples[index]
        if self.vision is not None:
            vision = self.vision.row_of(example.image_id)
        else:
            image = load_rgb_image(example.image_path)
            vision = self.pixels.host_pixels(image)  # uint8 where exact: normalised on the device
        return vision, example.text, self.targets[index]


def _collate(resampler: Resampler, table: VisionTable | None):
    def collate(items):
        tokens = resampler.tokenize([text for _, text, _ in items])
        vision = table.gather([v for v, _, _ in items]) if table is not None else torch.stack([v for v, _, _ in items])
        return {"vision": vision, **tokens, "targets": torch.stack([t for _, _, t in items])}  # no tokens: no text

    return collate


def _loader(dataset: _Examples, resampler: Resampler, batch_size: int, workers: int, sampler=None) -> DataLoader:
    table = dataset.vision
    # Page-locked batches cross the bus at full speed; a table already on the GPU has nothing to send.
    pin = resampler.device.type == "cuda" and not (table is not None and table.on_gpu)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=_collate(resampler, table),
        num_workers=0 if table is not None else workers,
        pin_memory=pin,
    )


def check_vision_store(store: VisionStore, resampler: Resampler) -> None:
    """A vision store is only usable with the ViT that made it."""
    made_by = store.manifest["request"]["model"]
    if made_by != resampler.weights_identity():
        raise ProbingError(
            f"{store.path}: ViT outputs made by another model ({made_by}); extract them with "
            "this model or leave out --features"
        )


def forward_batch(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["vision"], batch.get("input_ids"), batch.get("attention_mask"))


def without_gradient(model: nn.Module, batch: dict, head: Head) -> tuple[set[str], set[str]]:
    """(parameters that get no gradient, parameters whose gradient is all zeros) on one batch."""
    model.zero_grad(set_to_none=True)
    head.loss(forward_batch(model, batch), batch["targets"]).backward()
    none = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    zero = {n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()}
    model.zero_grad(set_to_none=True)
    return none, zero


def unfrozen_model(
    base: Resampler, layer: int, trial: Trial, settings: TrainSettings, from_pixels: bool
) -> UnfrozenProbe:
    """A truncated copy of `base` with a fresh probe of the trial's seed; what trains is what requires grad."""
    resampler = base.truncated(layer)
    trainable = {name for name, _ in resampler.trainable_parameters()}
    for name, parameter in resampler.named_parameters():
        parameter.requires_grad_(name in trainable)
    # Drawn on the CPU (the same weights for a seed on every device), then put beside the resampler.
    probe = new_probe(
        settings.probe,
        probe_input_size(resampler.num_latents, resampler.hidden_size, settings.latents),
        settings.head.outputs,
        settings.hidden,
        trial.seed,
    ).to(resampler.device)
    return UnfrozenProbe(resampler, probe, layer, from_pixels=from_pixels, latents=settings.latents)


def unfrozen_run(
    base: Resampler,
    layer: int,
    train: tuple[Sequence[Example], torch.Tensor],
    val: tuple[Sequence[Example], torch.Tensor],
    trial: Trial,
    settings: TrainSettings,
    vision: dict[str, VisionTable] | None = None,
    workers: int = 0,
) -> ModuleRun:
    """The ModuleRun of one unfrozen trial, on a truncated copy of `base` (which stays as it is)."""
    head = settings.head
    model = unfrozen_model(base, layer, trial, settings, from_pixels=vision is None)
    resampler = model.resampler
    train_set = _Examples(train[0], train[1], resampler, vision["train"] if vision else None)
    val_set = _Examples(val[0], val[1], resampler, vision["val"] if vision else None)
    # Stored ViT outputs are indexed in memory (no decoding to hide): no loader workers for them.
    train_loader = _loader(
        train_set, resampler, settings.batch_size, workers, sampler=EpochOrder(len(train_set), settings.order_seed)
    )
    val_loader = _loader(val_set, resampler, settings.batch_size, workers)
    first = train_loader.collate_fn([train_set[i] for i in range(min(len(train_set), settings.batch_size))])
    none, zero = without_gradient(model, {k: v.to(resampler.device) for k, v in first.items()}, head)
    for name, parameter in model.named_parameters():
        if name in none:
            parameter.requires_grad_(False)
    torch.manual_seed(trial.seed)  # dropout draws of the run depend on the trial's seed only
    return ModuleRun(
        model=model,
        forward=forward_batch,
        targets=lambda batch: batch["targets"],
        train_loader=train_loader,
        val_loader=val_loader,
        groups=parameter_groups(model.named_parameters(), settings.weight_decay, without_gradient=zero),
        probe=lambda unwrapped: unwrapped.probe,
    )


class UnfrozenSetup:
    """What every unfrozen trial of one configuration shares, prepared once: the resampler read from its
    checkpoint, examples and targets of the task's splits, ViT outputs from the vision stores (when given),
    and the model's identity. `fit` trains one trial on a truncated copy; `outputs` evaluates a trained model
    on a split."""

    def __init__(
        self,
        task: str,
        source: ModelSource,
        data: DataOptions,
        settings: TrainSettings,
        features: Path | None = None,
        workers: int = 0,
        control_seed: int | None = None,
        text: QFormerText | None = None,
    ):
        self.spec = get_task(task)
        self.source, self.settings, self.workers = source, settings, workers
        self.device = resolve_device(settings.device)
        vision_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.base = load_resampler(source, device=self.device, vision_dtype=vision_dtype)
        self.base.set_text(text or QFormerText())  # truncated copies keep it: every trial reads the same texts
        loaded = {split: load_split(data, split) for split in self.spec.splits}
        self.examples = {split: loaded[split].examples for split in self.spec.splits}
        self.targets = {
            split: self.spec.head.targets(self.examples[split], f"{split} data") for split in self.spec.splits
        }
        if control_seed is not None:  # the control task's targets (`probing.tasks.controls`)
            self.targets = {
                split: self.spec.control_targets(self.examples["train"], examples, control_seed, f"{split} data")
                for split, examples in self.examples.items()
            }
        self.fingerprints = {split: loaded[split].fingerprint for split in self.spec.splits}
        self.model_identity = self.base.weights_identity()
        self.model_source = self.base.identity
        self.features = features
        if features is not None:  # checked now, read on first use: a reused search never needs them
            for split in self.spec.splits:
                check_vision_store(FeatureStore(Path(features) / split).vision, self.base)
        self._vision: dict[str, VisionTable] | None = None

    @property
    def vision(self) -> dict[str, VisionTable] | None:
        """ViT outputs per split, read into memory on first use (tens of GB for real RefCOCOg)."""
        if self.features is not None and self._vision is None:
            from accelerate import PartialState

            # under `accelerate launch` each process keeps its table on its own GPU
            device = PartialState().device if self.device.type == "cuda" else None
            self._vision = {
                split: VisionTable(FeatureStore(Path(self.features) / split).vision, device)
                for split in self.spec.splits
            }
        return self._vision

    def model_for(self, trial: Trial, layer: int) -> UnfrozenProbe:
        """The model a trial trains, untrained (weights kept by a search are loaded into it)."""
        return unfrozen_model(self.base, layer, trial, self.settings, from_pixels=self.features is None)

    def fit(
        self, trial: Trial, layer: int, on_epoch: EpochCallback | None = None, checkpoint: TrialCheckpoint | None = None
    ) -> tuple[TrialResult, UnfrozenProbe]:
        """Train one trial from the checkpoint's weights (resuming from `checkpoint` when it holds epochs)."""
        run = unfrozen_run(
            self.base,
            layer,
            (self.examples["train"], self.targets["train"]),
            (self.examples["val"], self.targets["val"]),
            trial,
            self.settings,
            self.vision,
            self.workers,
        )
        return train_module(run, trial, self.settings, on_epoch=on_epoch, checkpoint=checkpoint), run.model

    def outputs(self, model: UnfrozenProbe, split: str) -> torch.Tensor:
        """Raw outputs `[N, out]` of a trained model on a split, in example order (one process)."""
        dataset = _Examples(
            self.examples[split], self.targets[split], model.resampler, self.vision[split] if self.vision else None
        )
        loader = _loader(dataset, model.resampler, self.settings.batch_size, self.workers)
        dtype = compute_dtype(self.device)
        model = model.to(self.device).eval()
        outputs = []
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            for batch in loader:
                inputs = {key: to_device(value, self.device) for key, value in batch.items() if key != "targets"}
                outputs.append(forward_batch(model, inputs).float())
        return torch.cat(outputs).cpu()  # one copy back, at the end
