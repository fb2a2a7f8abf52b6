"""The data types every reader returns and every stage passes on: examples, data options, one split's data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probing.core.settings import setting

# The category of an example that belongs to none (a VSR relation missing from the meta-category table): it counts
# in every overall metric and is left out of every per-category breakdown (as VSR's official evaluation script does).
NO_CATEGORY = ""


@dataclass(frozen=True)
class Example:
    """One probing example.

    example_id: stable id within its split: REFER `sent_id`; VSR, RCM and YAML tasks the 0-based line number
        in the split file (unless a YAML task names an id field).
    image_id: COCO image id (VSR: parsed from the `%012d.jpg` file name; YAML tasks: a field, or a stable hash
        of the image path).
    image_path: resolved path of the image file (it may not exist; `data stats` counts missing ones).
    text: the text the Q-Former reads: a referring sentence (raw), a VSR caption, an RCM caption ...
    box: target box, normalized `xyxy` (box tasks only).
    label: 1 = true / match, 0 = false (binary tasks only).
    category: the group used in per-category analysis (COCO supercategory, VSR meta-category, a YAML field).
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
    """The data options shared by every command that reads data; which ones a task needs is its reader's say
    (`probing tasks` lists them). `task` is a registered name or the path of a task YAML file."""

    task: str | None = setting(None, cli=False, config=False, help="A registered task or a task YAML file.")
    images: Path | None = setting(
        None,
        help="Image root: train2014/ and/or train2017/ (REFER tasks, RCM); "
        "trainval2017/ or train2017/ + val2017/ (VSR)",
    )
    refs: Path | None = setting(None, help="REFER tasks: refs(umd).p, refs(google).p or refs(unc).p")
    instances: Path | None = setting(None, help="REFER tasks: COCO instances.json")
    vsr: Path | None = setting(None, help="VSR: folder with train.jsonl, dev.jsonl, test.jsonl")
    rcm: Path | None = setting(None, help="RCM: folder written by `probing build-rcm`")
    # Not an identity field of its own: a limit is folded into each split's data fingerprint (`load_split`), which
    # every stage records and checks, so a limited output is never taken for a full one (nor the reverse).
    limit: int | None = setting(
        None, low=1, help="Read only the first N examples of each split (a quick smoke run).", show_default=False
    )

    def given(self) -> dict[str, Path]:
        """The path options that are set, by name."""
        return {
            name: Path(value)
            for name, value in vars(self).items()
            if name not in ("task", "limit") and value is not None
        }


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


# RCM's 3 x 3 grid of an image, its cells in reading order (torch-free here: the annotation page's options read it).
GRID_SIZE = 3

CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "middle",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
