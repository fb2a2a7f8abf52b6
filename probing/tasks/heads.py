"""Task heads: what a probe predicts and how it is judged. Two kinds, each owning its outputs, targets, loss,
metrics, main metric with its direction, per-example correctness and prediction records:

- `BoxHead` (RefCOCOg and other referring-expression tasks): 4 outputs -> sigmoid `cxcywh` (a valid box by
  construction), loss `giou_scale * (1 - GIoU) + l1_scale * L1` (`probing.tasks.losses`), Acc@IoU>=0.5 and mean IoU;
- `BinaryHead` (VSR, RCM, matching tasks from YAML): 1 logit, BCE with logits, accuracy (logit > 0 is "true").

A head also says how a control task draws its targets (`control_targets`, `probing.tasks.controls`) and how the
online code of `probing.studies.mdl` transmits a target (`uniform_bits` per example without a probe, `code_bits` with
one, `code` naming the likelihood in manifests).

Every function takes a leading probe axis where given (`[K, N, ...]` -> `[K]`), so K probes trained together
are judged separately.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torchvision.ops import box_convert

from probing.core.errors import ProbingError
from probing.core.registry import Registry
from probing.data.types import Example
from probing.tasks.controls import stable_uniform
from probing.tasks.losses import binary_loss, box_loss
from probing.tasks.metrics import (
    BOX_CODE_BINS,
    IOU_THRESHOLD,
    bernoulli_bits,
    binary_correct,
    box_ious,
    discretised_laplace_bits,
    laplace_scales,
    predicted_boxes,
)

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Head:
    kind: ClassVar[str]
    outputs: ClassVar[int]
    metric_names: ClassVar[tuple[str, ...]]
    main_metric: ClassVar[str]  # picks the best epoch and the best trial
    direction: ClassVar[Direction] = "maximize"
    metric_label: ClassVar[str]  # how table headers name the main metric, briefly
    metric_title: ClassVar[str]  # ... and how titles name it
    loss_weights: ClassVar[tuple[str, ...]] = ()  # trial fields that weigh the loss terms
    uniform_bits: ClassVar[float | None] = None  # bits of one target under the uniform code (None: no code)
    code: ClassVar[dict[str, Any] | None] = None  # the likelihood of `code_bits`, as manifests record it

    def better(self, value: float, than: float) -> bool:
        """Strictly better by the main metric's direction."""
        return value > than if self.direction == "maximize" else value < than

    @property
    def worst(self) -> float:
        return -float("inf") if self.direction == "maximize" else float("inf")

    def targets(self, examples: Sequence[Example], where: str) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, trials: Sequence[Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The loss weights of K trials as `[K]` tensors (empty for heads whose loss has no weights)."""
        return {
            name: torch.tensor([float(getattr(t, name)) for t in trials], device=device) for name in self.loss_weights
        }

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, weights: dict[str, Any] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example correctness `[..., N]` (1.0 / 0.0) by the main metric's rule."""
        raise NotImplementedError

    def records(
        self, split: str, seed: int, examples: Sequence[Example], outputs: torch.Tensor, targets: torch.Tensor
    ) -> list[dict[str, Any]]:
        """One JSON-ready prediction record per example: id, category, target, prediction, correctness, metadata."""
        raise NotImplementedError

    def control_targets(
        self, train_targets: torch.Tensor, train_types: Sequence[Hashable], types: Sequence[Hashable], seed: int
    ) -> torch.Tensor:
        """The control task's targets of examples of `types` (`probing.tasks.controls`): for each type a fixed random
        draw from `stable_uniform(seed, type)`, shaped by the train targets (`train_targets` of `train_types`)."""
        raise ProbingError(f"--control: the {self.kind} head draws no control targets")

    def code_bits(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        reference_outputs: torch.Tensor,
        reference_targets: torch.Tensor,
    ) -> torch.Tensor:
        """-log2 p(target | probe outputs) per example `[N]`: the bits of the online code. `reference_*` are the
        probe's outputs and targets on held-out data (val), from which a likelihood may fit its free parameters."""
        raise ProbingError(f"mdl: the {self.kind} head has no code for its targets")


@dataclass(frozen=True)
class BoxHead(Head):
    kind = "box"
    outputs = 4
    metric_names = ("acc@0.5", "mean_iou")
    main_metric = "acc@0.5"
    metric_label = "Acc@0.5"
    metric_title = "Acc@0.5"
    loss_weights = ("giou_scale", "l1_scale")
    uniform_bits = 4 * math.log2(BOX_CODE_BINS)  # each cxcywh coordinate one of the code's bins
    code = {"likelihood": "discretised-laplace", "coordinates": "cxcywh", "bins": BOX_CODE_BINS, "scale": "val-mle"}

    def targets(self, examples: Sequence[Example], where: str) -> torch.Tensor:
        missing = next((e for e in examples if e.box is None), None)
        if missing is not None:
            raise ProbingError(f"{where}: example {missing.example_id} has no target box")
        return torch.tensor([e.box for e in examples], dtype=torch.float32).reshape(-1, 4)

    def loss(self, outputs, targets, weights=None):
        weights = weights or {}
        return box_loss(outputs, targets, weights.get("giou_scale", 1.0), weights.get("l1_scale", 1.0))

    def metrics(self, outputs, targets):
        ious = box_ious(outputs, targets)
        return {"acc@0.5": (ious >= IOU_THRESHOLD).float().mean(-1), "mean_iou": ious.mean(-1)}

    def correct(self, outputs, targets):
        return (box_ious(outputs, targets) >= IOU_THRESHOLD).float()

    def control_targets(self, train_targets, train_types, types, seed):
        """For each type, one of the train boxes of that type, chosen by the draw; a type no train example has
        draws from all train boxes. The boxes of a type are sorted first, so the choice does not depend on the
        order of the train examples."""
        by_type: dict[Hashable, list[tuple[float, ...]]] = defaultdict(list)
        boxes = [tuple(box) for box in train_targets.tolist()]
        for kind, box in zip(train_types, boxes, strict=True):
            by_type[kind].append(box)
        every_box = sorted(boxes)
        chosen: dict[Hashable, tuple[float, ...]] = {}
        for kind in types:
            if kind not in chosen:
                pool = sorted(by_type[kind]) if kind in by_type else every_box
                chosen[kind] = pool[min(int(stable_uniform(seed, kind) * len(pool)), len(pool) - 1)]
        return torch.tensor([chosen[kind] for kind in types], dtype=torch.float32).reshape(-1, 4)

    def code_bits(self, outputs, targets, reference_outputs, reference_targets):
        """Each `cxcywh` coordinate of the target box, coded to one of 100 bins of [0, 1] under a Laplace
        centred on the probe's coordinate (`probing.tasks.metrics.discretised_laplace_bits`). The Laplace is the
        distribution whose negative log-likelihood the L1 term of the loss is; its scale per coordinate is the
        maximum-likelihood one on the reference (val) outputs."""
        locations = outputs.double().sigmoid()
        values = box_convert(targets.double().to(outputs.device), in_fmt="xyxy", out_fmt="cxcywh")
        reference = box_convert(reference_targets.double(), in_fmt="xyxy", out_fmt="cxcywh")
        scales = laplace_scales(reference_outputs.double().sigmoid(), reference.to(reference_outputs.device))
        return discretised_laplace_bits(values, locations, scales.to(locations.device)).sum(-1)

    def records(self, split, seed, examples, outputs, targets):
        boxes = predicted_boxes(outputs.float())
        ious = box_ious(outputs, targets)
        return [
            {
                "id": example.example_id,
                "split": split,
                "seed": seed,
                "category": example.category,
                "target_xyxy": target,
                "predicted_xyxy": box,
                "iou": iou,
                "correct": iou >= IOU_THRESHOLD,
                **dict(example.metadata),
            }
            for example, box, target, iou in zip(examples, boxes.tolist(), targets.tolist(), ious.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class BinaryHead(Head):
    kind = "binary"
    outputs = 1
    metric_names = ("accuracy",)
    main_metric = "accuracy"
    metric_label = "acc"
    metric_title = "accuracy"
    uniform_bits = 1.0  # one of two labels
    code = {"likelihood": "bernoulli"}

    def targets(self, examples: Sequence[Example], where: str) -> torch.Tensor:
        missing = next((e for e in examples if e.label is None), None)
        if missing is not None:
            raise ProbingError(f"{where}: example {missing.example_id} has no label")
        return torch.tensor([e.label for e in examples], dtype=torch.float32)

    def loss(self, outputs, targets, weights=None):
        return binary_loss(outputs, targets)

    def metrics(self, outputs, targets):
        return {"accuracy": binary_correct(outputs, targets).mean(-1)}

    def correct(self, outputs, targets):
        return binary_correct(outputs, targets)

    def control_targets(self, train_targets, train_types, types, seed):
        """For each type, 1 where its draw falls below the train labels' rate of 1s, else 0: a label drawn
        for the type from the train labels' distribution."""
        rate = float(train_targets.float().mean())
        return torch.tensor([float(stable_uniform(seed, kind) < rate) for kind in types], dtype=torch.float32)

    def code_bits(self, outputs, targets, reference_outputs, reference_targets):
        """The label under Bernoulli(sigmoid(logit)): the probe's binary cross-entropy, in bits."""
        return bernoulli_bits(outputs, targets)

    def records(self, split, seed, examples, outputs, targets):
        probabilities = outputs.float().squeeze(-1).sigmoid().tolist()
        correct = binary_correct(outputs, targets).tolist()  # the metric's own rule (logit > 0), not a re-derivation
        records = []
        for example, probability, label, right in zip(examples, probabilities, targets.tolist(), correct, strict=True):
            predicted = int(label) if right else 1 - int(label)
            records.append(
                {
                    "id": example.example_id,
                    "split": split,
                    "seed": seed,
                    "category": example.category,
                    "label": int(label),
                    "probability": probability,
                    "predicted": predicted,
                    "correct": bool(right),
                    **dict(example.metadata),
                }
            )
        return records


# A head's kind is what a task YAML's `kind` names; installed packages may add heads through the entry-point
# group `probing.tasks.heads` (a `Head`).
HEADS: Registry[Head] = Registry("head", "probing.tasks.heads")


def register_head(head: Head, *, replace: bool = False) -> Head:
    """Add a head under its `kind`; another under a registered kind is refused unless `replace`."""
    return HEADS.register(head.kind, head, replace=replace)


register_head(BoxHead())
register_head(BinaryHead())
