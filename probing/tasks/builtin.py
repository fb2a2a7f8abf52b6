"""The built-in tasks: the paper's three (RefCOCOg umd, VSR random, RCM) and their siblings in the same formats
(RefCOCOg google, RefCOCO and RefCOCO+ unc, VSR zero-shot). Each is one reader plus one registration.

Their control tasks (`probing.tasks.controls`) draw targets per type, a type being what a probe could memorise
without knowing where anything is:
- REFER tasks: the referred object's COCO category (so a control box is one of the train boxes of that
  category: it keeps the category's typical sizes and places, which the probe may learn from the category);
- VSR: the caption's (subject, object) pair (a label per pair: the objects named, not their relation);
- RCM: the (COCO category of the phrase's object, claimed cell) pair (a label per category and cell: what the
  phrase names and which cell is asked about, not where the object is).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from probing.data.boxes import CELL_NAMES
from probing.data.rcm import load_rcm
from probing.data.refer import load_refer
from probing.data.types import DataOptions, Example
from probing.data.vsr import META_CATEGORIES, load_vsr, split_file
from probing.tasks.controls import MetadataType
from probing.tasks.heads import BinaryHead, BoxHead
from probing.tasks.search_space import LOSS_SCALES, SearchSpace
from probing.tasks.spec import TaskSpec

log = logging.getLogger(__name__)

COCO_SUPERCATEGORY = "COCO supercategory"


@dataclass(frozen=True)
class ReferReader:
    """REFER pickles + COCO instances; `refs_name` is the file the dataset ships (checked softly: a user may
    have renamed it, but a umd file given for RefCOCO would read the wrong splits)."""

    refs_name: str
    options: tuple[str, ...] = ("refs", "instances", "images")

    def read(self, options: DataOptions, split: str) -> list[Example]:
        if Path(options.refs).name != self.refs_name:
            log.warning("--refs %s: this task's splits are in %s", options.refs, self.refs_name)
        return load_refer(options.refs, options.instances, options.images, split)

    def sources(self, options: DataOptions, split: str) -> dict[str, Path]:
        return {"refs": Path(options.refs), "instances": Path(options.instances)}


@dataclass(frozen=True)
class VsrReader:
    options: tuple[str, ...] = ("vsr", "images")

    def read(self, options: DataOptions, split: str) -> list[Example]:
        return load_vsr(options.vsr, options.images, split)

    def sources(self, options: DataOptions, split: str) -> dict[str, Path]:
        return {"vsr": split_file(options.vsr, split)}


@dataclass(frozen=True)
class RcmReader:
    options: tuple[str, ...] = ("rcm", "images")

    def read(self, options: DataOptions, split: str) -> list[Example]:
        return load_rcm(options.rcm, options.images, split)

    def sources(self, options: DataOptions, split: str) -> dict[str, Path]:
        return {"rcm": Path(options.rcm) / f"{split}.jsonl"}


def rcm_cell_counts(examples: Sequence[Example]) -> dict[str, Any]:
    """RCM's data stats: claimed cell x label (its balance is by construction)."""
    counts: dict[str, dict[str, int]] = {name: {"positive": 0, "negative": 0} for name in CELL_NAMES}
    for example in examples:
        counts[CELL_NAMES[example.metadata["cell"]]]["positive" if example.label else "negative"] += 1
    return counts


def rcm_cell_words(example: Example) -> str:
    """The words of an RCM caption that claim its cell (what a text cut before them no longer says)."""
    return example.metadata["cell_name"]


BOX_SPACE = SearchSpace(epochs=(20, 30, 40), giou_scale=LOSS_SCALES, l1_scale=LOSS_SCALES)  # the paper's RefCOCOg
VSR_SPACE = SearchSpace(epochs=(3, 5, 10, 15, 20))
RCM_SPACE = SearchSpace(epochs=(50, 100, 150))
COCO_CATEGORY_TYPE = MetadataType(("category_id",), "COCO category")
VSR_TYPE = MetadataType(("subject", "object"), "(subject, object)")
RCM_TYPE = MetadataType(("category_id", "cell"), "(COCO category, claimed cell)")


def _referring(
    name: str, title: str, refs_name: str, splits: tuple[str, ...], eval_splits: tuple[str, ...], description: str
) -> TaskSpec:
    return TaskSpec(
        name=name,
        title=title,
        reader=ReferReader(refs_name),
        head=BoxHead(),
        search_space=BOX_SPACE,
        splits=splits,
        eval_splits=eval_splits,
        category=COCO_SUPERCATEGORY,
        kendall=True,
        description=description,
        control_type=COCO_CATEGORY_TYPE,
    )


VSR = TaskSpec(
    name="vsr",
    title="VSR",
    reader=VsrReader(),
    head=BinaryHead(),
    search_space=VSR_SPACE,
    chance=0.5,
    category="meta-category",
    category_order=META_CATEGORIES,
    category_table="table2",
    description="VSR random split: is this spatial caption true of the image?",
    control_type=VSR_TYPE,
)

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    _referring(
        "refcocog",
        "RefCOCOg",
        "refs(umd).p",
        ("train", "val", "test"),
        ("test",),
        "RefCOCOg umd: regress the referred object's box (the paper's explicit probe).",
    ),
    VSR,
    TaskSpec(
        name="rcm",
        title="RCM",
        reader=RcmReader(),
        head=BinaryHead(),
        search_space=RCM_SPACE,
        patience=10,
        chance=0.5,
        category=COCO_SUPERCATEGORY,
        kendall=True,
        stats_categories=rcm_cell_counts,
        control_type=RCM_TYPE,
        key_words=rcm_cell_words,
        description="Region Cell Matching (built from RefCOCOg umd): does the phrase refer to this 3x3 cell?",
    ),
    _referring(
        "refcocog-google",
        "RefCOCOg (google)",
        "refs(google).p",
        ("train", "val"),
        ("val",),
        "RefCOCOg google split (train, val; its test split was never released): evaluated on val, which "
        "also picks epochs and trials, so its numbers are optimistic.",
    ),
    _referring(
        "refcoco",
        "RefCOCO",
        "refs(unc).p",
        ("train", "val", "testA", "testB"),
        ("testA", "testB"),
        "RefCOCO unc: testA holds people, testB other objects.",
    ),
    _referring(
        "refcoco+",
        "RefCOCO+",
        "refs(unc).p",
        ("train", "val", "testA", "testB"),
        ("testA", "testB"),
        "RefCOCO+ unc (no absolute location words in its sentences): testA people, testB other objects.",
    ),
    replace(
        VSR,
        name="vsr-zeroshot",
        title="VSR (zero-shot)",
        category_table=None,
        description="VSR zero-shot split (no concept shared between train and test): --vsr names the folder of "
        "its train.jsonl, dev.jsonl, test.jsonl.",
    ),
)
