"""`probing data stats`: is the data in place? Per split: examples, images, missing images, categories."""

from __future__ import annotations

from typing import Any

from probing.data.types import DataOptions, Example
from probing.tasks import TaskSpec, get_task, load_split


def split_stats(spec: TaskSpec, examples: list[Example]) -> dict[str, Any]:
    """Counts for one split; images are checked for existence only (decoding all of COCO takes hours)."""
    image_paths = {example.image_path for example in examples}
    missing = sorted(str(path) for path in image_paths if not path.is_file())
    stats: dict[str, Any] = {
        "examples": len(examples),
        "images": len(image_paths),
        "missing_images": len(missing),
        "categories": spec.category_counts(examples),
    }
    if missing:
        stats["first_missing_image"] = missing[0]
    if spec.head.kind == "binary":
        stats["labels"] = {"1": sum(e.label == 1 for e in examples), "0": sum(e.label == 0 for e in examples)}
    return stats


def data_stats(options: DataOptions, splits: list[str] | None = None) -> dict[str, Any]:
    """Stats of the requested splits (default: all of the task's) as one JSON-ready object."""
    spec = get_task(options.task)
    spec.check_options(options)
    chosen = [spec.check_split(split) for split in (splits or spec.splits)]
    result: dict[str, Any] = {"task": spec.name, "splits": {}}
    for split in chosen:
        data = load_split(options, split)
        result["splits"][split] = {"fingerprint": data.fingerprint, **split_stats(spec, data.examples)}
    return result
