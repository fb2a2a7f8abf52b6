"""`probing data stats`: is the data in place? Per split: examples, images, missing images, categories."""

from __future__ import annotations

from collections import Counter
from typing import Any

from probing.data.boxes import CELL_NAMES
from probing.data.examples import SPLITS, DataOptions, Example, check_split
from probing.data.loading import load_split


def category_counts(task: str, examples: list[Example]) -> dict[str, Any]:
    """COCO supercategory (RefCOCOg), VSR meta-category, or RCM claimed cell x label."""
    if task == "rcm":
        counts: dict[str, dict[str, int]] = {name: {"positive": 0, "negative": 0} for name in CELL_NAMES}
        for example in examples:
            counts[CELL_NAMES[example.metadata["cell"]]]["positive" if example.label else "negative"] += 1
        return counts
    return dict(sorted(Counter(example.category for example in examples).items()))


def split_stats(task: str, examples: list[Example]) -> dict[str, Any]:
    """Counts for one split; images are checked for existence only (decoding all of COCO takes hours)."""
    image_paths = {example.image_path for example in examples}
    missing = sorted(str(path) for path in image_paths if not path.is_file())
    stats: dict[str, Any] = {
        "examples": len(examples),
        "images": len(image_paths),
        "missing_images": len(missing),
        "categories": category_counts(task, examples),
    }
    if missing:
        stats["first_missing_image"] = missing[0]
    if task in ("vsr", "rcm"):
        stats["labels"] = {"1": sum(e.label == 1 for e in examples), "0": sum(e.label == 0 for e in examples)}
    return stats


def data_stats(options: DataOptions, splits: list[str] | None = None) -> dict[str, Any]:
    """Stats of the requested splits (default: all three) as one JSON-ready object."""
    options = options.validated()
    chosen = [check_split(split) for split in (splits or SPLITS)]
    result: dict[str, Any] = {"task": options.task, "splits": {}}
    for split in chosen:
        data = load_split(options, split)
        result["splits"][split] = {"fingerprint": data.fingerprint, **split_stats(options.task, data.examples)}
    return result
