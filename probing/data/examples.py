"""What every loader returns: task examples with ids, image paths, text, target and analysis metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probing.errors import ProbingError

TASKS: tuple[str, ...] = ("refcocog", "vsr", "rcm")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    """One probing example.

    example_id: stable id within its split: RefCOCOg `sent_id`; VSR and RCM the 0-based line number in the
        split file (design.md, FeatureStore ids).
    image_id: COCO image id (VSR: parsed from the `%012d.jpg` file name).
    image_path: resolved path of the image file (it may not exist; `data stats` counts missing ones).
    text: the text the Q-Former reads: a RefCOCOg sentence (raw), a VSR caption, an RCM caption.
    box: target box, normalized `xyxy` (RefCOCOg only).
    label: 1 = true / match, 0 = false (VSR, RCM only).
    category: the group used in per-category analysis: COCO supercategory (RefCOCOg, RCM) or VSR
        meta-category.
    metadata: everything else the analysis may need (category id, box area fraction, centre distance,
        relation, cells ...), JSON-serialisable.
    """

    example_id: int
    image_id: int
    image_path: Path
    text: str
    category: str
    box: tuple[float, float, float, float] | None = None
    label: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataOptions:
    """The data options shared by every command that reads data (design.md, Interfaces).

    RefCOCOg: refs + instances + images (holding `train2014/` and/or `train2017/`).
    VSR: vsr (holding train/dev/test.jsonl) + images (holding `trainval2017/` or `train2017/` + `val2017/`).
    RCM: rcm (a `probing build-rcm` output) + images (as RefCOCOg).
    """

    task: str
    images: Path | None = None
    refs: Path | None = None
    instances: Path | None = None
    vsr: Path | None = None
    rcm: Path | None = None

    def validated(self, need_images: bool = True) -> DataOptions:
        """Check that the options the task needs are given and exist; one ProbingError naming the option."""
        if self.task not in TASKS:
            raise ProbingError(f"--task: unknown task '{self.task}' (choose {', '.join(TASKS)})")
        required = {"refcocog": ("refs", "instances"), "vsr": ("vsr",), "rcm": ("rcm",)}[self.task]
        if need_images:
            required = (*required, "images")
        for option in required:
            value = getattr(self, option)
            if value is None:
                raise ProbingError(f"--{option} is required for --task {self.task}")
            if not Path(value).exists():
                raise ProbingError(f"--{option}: {value}: not found")
        for option in ("vsr", "rcm", "images"):
            value = getattr(self, option)
            if option in required and value is not None and not Path(value).is_dir():
                raise ProbingError(f"--{option}: {value}: not a directory")
        return self


@dataclass(frozen=True)
class SplitData:
    """The examples of one split plus what identifies them.

    fingerprint: a hash of the task, split, loader format version and the input files' hashes; stages record
        it in their manifests and refuse artifacts made from other data.
    sources: input file name -> sha256, for manifests.
    """

    task: str
    split: str
    examples: list[Example]
    fingerprint: str
    sources: dict[str, str]


def check_split(split: str) -> str:
    """Accept train/val/test (and VSR's `dev` as `val`); anything else is a ProbingError naming --split."""
    if split == "dev":
        return "val"
    if split not in SPLITS:
        raise ProbingError(f"--split: unknown split '{split}' (choose {', '.join(SPLITS)})")
    return split
