"""Task datasets in their real on-disk formats: RefCOCOg (REFER), VSR (jsonl), RCM (built from RefCOCOg)."""

from probing.data.examples import SPLITS, TASKS, DataOptions, Example, SplitData
from probing.data.loading import load_split

__all__ = ["SPLITS", "TASKS", "DataOptions", "Example", "SplitData", "load_split"]
