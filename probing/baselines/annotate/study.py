"""What an annotation study asks: the design (`StudyDesign`, declared once for the command line), the balanced
seeded sample of items, each annotator's sequence, and how an item is shown.

- Scored items: n/2 true and n/2 false examples of one evaluated split, drawn without replacement by one
  seeded generator. By default every annotator answers the same n items. With `overlap` K, K of them
  (K/2 true, K/2 false) are shared by all and each of at most `annotators` annotators gets a block of n - K
  items of their own, disjoint from every other block: agreement is measured on the shared items.
- Practice items (`intro`, half true, half false, drawn from the same split but never scored) come first,
  in the same order for everybody, and the page tells the right answer after each.
- Each annotator sees the practice items, then their scored items in an order of their own (seeded by the
  study's seed and the annotator's slot, the order in which names were first given), so that order effects
  do not line up across annotators.
- An item whose example carries a `phrase` and a claimed `cell` (RCM) is shown as the paper's interface
  shows it: the image without a grid, the phrase, the claimed cell, and the question whether the phrase
  matches that location; any other binary example (VSR, a YAML task) shows its text and asks whether it is
  true of the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from probing.core.errors import ProbingError
from probing.core.settings import identity, setting
from probing.data.types import CELL_NAMES, DataOptions, Example
from probing.tasks import get_task, load_split, task_reference

if TYPE_CHECKING:
    from probing.tasks.spec import TaskSpec

STUDY_FORMAT_VERSION = 1
MAX_CELLS = 4  # the paper's interface: up to 4 grid cells, ranked by priority
CELL_QUESTION = "Does the phrase match the location in the image?"
TEXT_QUESTION = "Is the text true of the image?"
Role = Literal["intro", "shared", "own"]


@dataclass(frozen=True)
class StudyDesign:
    """The settings that define a study (recorded in its database; a restart must give the same)."""

    task: str = setting(help="A binary task: rcm, vsr, or a task YAML file of kind binary.")
    split: str = setting("test", help="The evaluated split the items are drawn from.", identity=True)
    n: int = setting(100, help="Scored items per annotator: n/2 true, n/2 false (even).", identity=True, low=2)
    seed: int = setting(0, help="Seed of the sample and of each annotator's order.", identity=True)
    overlap: int | None = setting(
        None,
        help="Items shared by all annotators (even); each also gets n - overlap of their own. Needs --annotators. "
        "Default: all n shared.",
        identity=True,
        low=0,
    )
    annotators: int | None = setting(
        None, help="At most this many annotators (required with --overlap).", identity=True, low=1
    )
    intro: int = setting(4, help="Practice items shown first, not scored.", identity=True, low=0)
    data: DataOptions = field(default_factory=DataOptions)

    @property
    def shared(self) -> int:
        """Scored items every annotator answers."""
        return self.n if self.overlap is None else self.overlap

    @property
    def own(self) -> int:
        """Scored items of each annotator's own block."""
        return self.n - self.shared

    def check(self) -> StudyDesign:
        if self.n % 2:
            raise ProbingError(f"--n: must be even (n/2 true, n/2 false), got {self.n}")
        if self.overlap is not None:
            if self.overlap % 2 or self.overlap > self.n:
                raise ProbingError(f"--overlap: must be even and at most --n {self.n}, got {self.overlap}")
            if self.annotators is None:
                raise ProbingError("--overlap needs --annotators (how many blocks of own items to draw)")
        return self


@dataclass(frozen=True)
class StudyItem:
    """One item of a study: its number (what the page and the API call it), role, and example."""

    item: int
    role: Role
    slot: int | None  # own items: the annotator slot whose block holds it
    example: Example


@dataclass(frozen=True)
class Study:
    """A design resolved against its data: the task, the split's fingerprint, the items."""

    design: StudyDesign
    spec: TaskSpec
    fingerprint: str
    items: list[StudyItem]

    @property
    def identity(self) -> dict[str, Any]:
        """What the study's database records and a restart must match."""
        return {
            "kind": "annotation-study",
            "format_version": STUDY_FORMAT_VERSION,
            "task": self.spec.name,
            "dataset": self.fingerprint,
            **identity(self.design),
        }

    @property
    def description(self) -> dict[str, Any]:
        """What the page and the scorer need beside the items (not part of the identity)."""
        reference = task_reference(self.design.task)
        return {
            "task": self.spec.name,
            "title": self.spec.title,
            "split": self.design.split,
            "task_file": reference if reference != self.spec.name else None,
            "category": self.spec.category,
        }


def check_task(design: StudyDesign) -> TaskSpec:
    """The design's task, which must be binary, and its split, which must be evaluated."""
    spec = get_task(design.task)
    if spec.head.kind != "binary":
        raise ProbingError(
            f"--task {design.task}: annotation asks true/false questions, so it needs a binary task; "
            f"{spec.name} is a {spec.head.kind} task"
        )
    split = spec.check_split(design.split)
    if split not in spec.eval_splits:
        raise ProbingError(
            f"--split: {split} is not an evaluated split of {spec.name} (choose {', '.join(spec.eval_splits)}): "
            "the human run is reported beside the probes' evaluated splits"
        )
    return spec


def prepare_study(design: StudyDesign) -> Study:
    """Read the split and draw the study's items; every sampled image must exist."""
    design = design.check()
    spec = check_task(design)
    split = spec.check_split(design.split)
    data = load_split(DataOptions(**{**vars(design.data), "task": design.task}), split)
    items = sample_items(data.examples, design)
    missing = next((item for item in items if not item.example.image_path.is_file()), None)
    if missing is not None:
        raise ProbingError(
            f"--images: {missing.example.image_path}: not found (example {missing.example.example_id} of {split})"
        )
    return Study(design=design, spec=spec, fingerprint=data.fingerprint, items=items)


def sample_items(examples: Sequence[Example], design: StudyDesign) -> list[StudyItem]:
    """Practice items, shared items, then each slot's own block; balanced, disjoint, seeded."""
    positives = [example for example in examples if example.label == 1]
    negatives = [example for example in examples if example.label == 0]
    slots = design.annotators if design.own else 0
    wanted = {
        "intro": (design.intro - design.intro // 2, design.intro // 2),
        "shared": (design.shared // 2, design.shared // 2),
        **{f"own {slot}": (design.own // 2, design.own // 2) for slot in range(slots or 0)},
    }
    need_true = sum(true for true, _ in wanted.values())
    need_false = sum(false for _, false in wanted.values())
    for need, have, what in ((need_true, positives, "true"), (need_false, negatives, "false")):
        if need > len(have):
            raise ProbingError(
                f"--n: the study needs {need} {what} examples (practice, shared and own items), "
                f"the split has {len(have)}"
            )
    rng = np.random.default_rng(design.seed)
    true_order = [positives[i] for i in rng.permutation(len(positives))[:need_true]]
    false_order = [negatives[i] for i in rng.permutation(len(negatives))[:need_false]]
    items: list[StudyItem] = []
    for group, (true, false) in wanted.items():
        drawn = true_order[:true] + false_order[:false]
        true_order, false_order = true_order[true:], false_order[false:]
        if group == "intro":  # everybody's first items: true and false mixed, in one seeded order
            drawn = [drawn[i] for i in rng.permutation(len(drawn))]
        else:
            drawn.sort(key=lambda example: example.example_id)
        role, slot = ("own", int(group.split()[1])) if group.startswith("own") else (group, None)
        items += [StudyItem(len(items) + index, role, slot, example) for index, example in enumerate(drawn)]
    return items


def sequence_of(roles: Sequence[tuple[int, str, int | None]], slot: int, seed: int) -> list[int]:
    """The item numbers an annotator in `slot` answers, in order: practice items first, then their shared and
    own items in an order seeded by (seed, slot). `roles`: (item, role, slot) of every item of the study."""
    intro = [item for item, role, _ in roles if role == "intro"]
    scored = [item for item, role, owner in roles if role == "shared" or (role == "own" and owner == slot)]
    order = np.random.default_rng([seed, slot]).permutation(len(scored))
    return intro + [scored[i] for i in order]


def claimed_cell(metadata: Mapping[str, Any]) -> int | None:
    """The grid cell an example claims (RCM: its `cell` with a `phrase`), else None."""
    cell, phrase = metadata.get("cell"), metadata.get("phrase")
    if isinstance(cell, int) and not isinstance(cell, bool) and 0 <= cell < len(CELL_NAMES) and isinstance(phrase, str):
        return cell
    return None


def shown(text: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What the page shows of an example besides its image."""
    cell = claimed_cell(metadata)
    if cell is None:
        return {"claims_cell": False, "text": text, "question": TEXT_QUESTION}
    return {
        "claims_cell": True,
        "phrase": metadata["phrase"],
        "cell": cell,
        "cell_name": CELL_NAMES[cell],
        "question": CELL_QUESTION,
    }
