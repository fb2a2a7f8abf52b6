"""One entry point for every task: `load_split(options, split) -> SplitData`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from probing.artifacts import sha256_file
from probing.data.examples import DataOptions, SplitData, check_split
from probing.data.rcm import load_rcm
from probing.data.refcocog import load_refcocog
from probing.data.vsr import load_vsr, split_file

# Bump when a loader's output for the same files changes (fields, ids, normalization): it enters every
# dataset fingerprint, so artifacts made by an older loader are refused instead of silently mixed.
LOADER_FORMAT_VERSION = 1


def source_files(options: DataOptions, split: str) -> dict[str, Path]:
    """The input files whose bytes define a split's examples (images are not hashed: too large)."""
    if options.task == "refcocog":
        return {"refs": Path(options.refs), "instances": Path(options.instances)}
    if options.task == "vsr":
        return {"vsr": split_file(options.vsr, split)}
    return {"rcm": Path(options.rcm) / f"{split}.jsonl"}


def dataset_fingerprint(task: str, split: str, sources: dict[str, str]) -> str:
    """A hash of what defines a split's examples: task, split, loader version, input files' hashes."""
    payload = json.dumps(
        {"task": task, "split": split, "loader_format_version": LOADER_FORMAT_VERSION, "sources": sources},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def load_split(options: DataOptions, split: str) -> SplitData:
    """Load one split of a task through its real-format loader."""
    options = options.validated()
    split = check_split(split)
    if options.task == "refcocog":
        examples = load_refcocog(options.refs, options.instances, options.images, split)
    elif options.task == "vsr":
        examples = load_vsr(options.vsr, options.images, split)
    else:
        examples = load_rcm(options.rcm, options.images, split)
    sources = {name: sha256_file(path) for name, path in source_files(options, split).items()}
    return SplitData(
        task=options.task,
        split=split,
        examples=examples,
        fingerprint=dataset_fingerprint(options.task, split, sources),
        sources=sources,
    )
