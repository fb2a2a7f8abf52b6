"""Datasets in their real on-disk formats (REFER pickles + COCO instances, VSR jsonl, RCM built from RefCOCOg,
jsonl tasks from YAML) and the types their readers return. Which reader a task uses is its `TaskSpec`'s say
(`probing.tasks`); `probing.tasks.load_split` reads a split through it."""

from probing.data.types import DataOptions, Example, SplitData

__all__ = ["DataOptions", "Example", "SplitData"]
