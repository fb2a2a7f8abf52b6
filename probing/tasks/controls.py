"""Control tasks (Hewitt & Liang, 2019): what a probe can learn on its own, beside what the representation holds.

A control task keeps a task's examples, features and output space, and replaces each example's target by a
fixed random function of the example's *type*: something a probe can memorise from the features without any
spatial knowledge. The probe's accuracy on the control says how much of its accuracy on the task it could
have reached by memorising; selectivity = task accuracy - control accuracy (`probing.report.analysis`).

- A task says what an example's type is (`TaskSpec.control_type`, usually a `MetadataType`): for RefCOCOg
  (and the other REFER tasks) the referred object's COCO category; for VSR the (subject, object) pair of the
  caption; for RCM the (COCO category of the phrase's object, claimed cell); for a YAML task the record fields
  its `control_type` names.
- Its head draws the control target of a type (`Head.control_targets`): a box head one of the train boxes of
  that type, a binary head a label drawn with the train labels' rate of 1s.
- Every draw is `stable_uniform(seed, type)`: a number in [0, 1) from a hash of the control seed and the type.
  A type's control target is therefore the same in every split, process and run, whatever else the split
  holds and in whatever order its examples come; the control seed (`--control-seed`, default 0) draws
  another control task.

The floor of a task or of a control (`--shuffled-features`): the same probe, with the same hyper-parameters,
trained on the same targets with the train and val feature rows permuted (a fixed permutation), so that no
example's features tell its target or its type. It is what a probe reaches from the targets' distribution
alone: on features that carry nothing it is what the probe itself reaches, whatever box or label the control
drew, so a score minus its floor is comparable across control seeds (`probing.report.analysis.rigour_selectivity`).
Why not the best constant predictor: a box probe trained with L1 + GIoU does not reach the best constant box,
it settles near the coordinate-wise median of the targets, so a constant-predictor floor is not what the probe
gets on uninformative features (see docs/rigor.md for the numbers).

The ceiling of a binary control (`type_lookup`): the label of each test example's type looked up in train (the
majority label of the type's train examples; the train majority for a type train does not hold) -- what a probe
that memorised every train type would answer.

`ControlInputs` holds the settings (`--control`, `--control-seed`, `--shuffled-features`) that `probing train`,
`probing search` and `probing mdl` share; they enter an output's identity only when given, so outputs made
before they existed keep their identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probing.core.errors import ProbingError
from probing.core.settings import FROZEN_MODE, identity, scoped, setting
from probing.data.types import Example

if TYPE_CHECKING:
    import torch


def stable_uniform(seed: int, key: Hashable) -> float:
    """A number in [0, 1) that depends on `(seed, key)` alone.

    Written by hand (a SHA-256 of the pair's JSON) because the kept generators do not give this: Python's
    `hash` of a string changes from process to process, and a seeded generator's draws depend on how many
    draws came before, i.e. on which other types a split holds and in which order.
    """
    payload = json.dumps([seed, key], sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _hashable(value: Any) -> Hashable:
    """Metadata values as hashable keys (a list, e.g. a box, becomes a tuple)."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    return value


@dataclass(frozen=True)
class MetadataType:
    """An example's type for a control task: the values of some of its metadata fields (the value of one field,
    or the tuple of several)."""

    fields: tuple[str, ...]
    title: str  # how `probing tasks` and the README name it, e.g. "(subject, object)"

    def __call__(self, example: Example) -> Hashable:
        missing = next((name for name in self.fields if name not in example.metadata), None)
        if missing is not None:
            raise ProbingError(f"example {example.example_id}: no field '{missing}' to draw its control target from")
        values = tuple(_hashable(example.metadata[name]) for name in self.fields)
        return values[0] if len(values) == 1 else values


def example_types(kind: MetadataType, examples: Sequence[Example]) -> list[Hashable]:
    return [kind(example) for example in examples]


@scoped
@dataclass(frozen=True, kw_only=True)
class ControlInputs:
    """Whether a probe trains on its task's control targets, and which control (its seed)."""

    control: bool = setting(
        False,
        identity=True,
        omit_default=True,
        help="Train on the task's control targets (Hewitt & Liang): a fixed random function of each example's "
        "type (RefCOCOg: its COCO category; VSR: its (subject, object) pair; RCM: (category, claimed cell)).",
    )
    control_seed: int = setting(
        0, identity=True, omit_default=True, low=0, help="With --control: the seed of the control targets."
    )

    shuffled_features: bool = setting(
        False,
        identity=True,
        omit_default=True,
        applies=FROZEN_MODE,
        help="Frozen probes: the floor -- train on the same targets with the train and val feature rows permuted "
        "(a fixed permutation), so that the features tell nothing about the targets.",
    )

    @property
    def control_targets_seed(self) -> int | None:
        """The control seed when the targets are a control's, else None (the task's own targets)."""
        return self.control_seed if self.control else None

    def control_identity(self) -> dict[str, Any]:
        """The identity fields of the choice: none for the task's own targets (identities made before controls
        existed stay valid), else `control: true` (and the seed where it is not 0)."""
        chosen = identity(self, only=("control", "control_seed")) if self.control else {}
        return {**chosen, **identity(self, only=("shuffled_features",))}


FLOOR_PERMUTATION_SEED = 0  # one fixed permutation: a floor is a property of the targets, not of a draw


def shuffled_rows(examples: int, rows: torch.Tensor | None) -> torch.Tensor:
    """The feature rows a floor's examples read: example i reads the row of example perm[i] (a fixed
    permutation drawn from `FLOOR_PERMUTATION_SEED`)."""
    import torch  # here, not above: the control settings (`ControlInputs`) are read by --help without torch

    order = torch.randperm(examples, generator=torch.Generator().manual_seed(FLOOR_PERMUTATION_SEED))
    return order if rows is None else rows.index_select(0, order)


def type_lookup(train_types: Sequence[Hashable], train_labels: Sequence[float], types: Sequence[Hashable]) -> list[int]:
    """The ceiling of a binary control: each type's majority label among its train examples (ties and types
    train does not hold: the train majority label)."""
    counts: dict[Hashable, list[int]] = {}
    for kind, label in zip(train_types, train_labels, strict=True):
        counts.setdefault(kind, [0, 0])[int(label)] += 1
    ones = sum(int(label) for label in train_labels)
    majority = int(ones * 2 > len(train_labels))
    answers = []
    for kind in types:
        zeros_ones = counts.get(kind)
        if zeros_ones is None or zeros_ones[0] == zeros_ones[1]:
            answers.append(majority)
        else:
            answers.append(int(zeros_ones[1] > zeros_ones[0]))
    return answers
