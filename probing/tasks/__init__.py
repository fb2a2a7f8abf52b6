"""The task registry: every task by name, built-in or read from a YAML file, and reading a task's splits.

`get_task(reference)` takes a registered name or the path of a task YAML file (`probing.tasks.yaml_task`);
an unknown name is refused in one line listing the known ones. `register_task` adds a task defined in Python
(a new dataset reader, or a new head: see docs/extending.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probing.core.artifacts import sha256_file
from probing.core.errors import ProbingError
from probing.core.registry import Registry
from probing.data.types import DataOptions, SplitData

if TYPE_CHECKING:
    from probing.tasks.spec import TaskSpec

__all__ = [
    "TaskSpec",
    "dataset_fingerprint",
    "get_task",
    "load_split",
    "register_task",
    "registered_tasks",
    "task_reference",
]

# Bump when a loader's output for the same files changes (fields, ids, normalization): it enters every
# dataset fingerprint, so artifacts made by an older loader are refused instead of silently mixed.
LOADER_FORMAT_VERSION = 1


def __getattr__(name: str) -> Any:
    # `TaskSpec` (and through it the heads, which need torch) is imported on first use, so that the search space
    # and the commands' options (`probing search --help`) read this package without torch.
    if name == "TaskSpec":
        from probing.tasks.spec import TaskSpec

        return TaskSpec
    raise AttributeError(f"module 'probing.tasks' has no attribute {name!r}")


def _register_builtins() -> None:
    # imported on first use: the built-in tasks' readers import modules that import this package
    from probing.tasks.builtin import BUILTIN_TASKS

    for spec in BUILTIN_TASKS:
        TASKS.register(spec.name, spec)


# Installed packages may add tasks through the entry-point group `probing.tasks` (a `TaskSpec`).
TASKS: Registry[TaskSpec] = Registry(
    "task", "probing.tasks", builtins=_register_builtins, origin=lambda spec: spec.source
)


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add a task to the registry. A second registration under the same name must be the same task, or the same
    task file read again after a change (it replaces its earlier version), or say `replace`."""
    existing = TASKS.get(spec.name) if spec.name in TASKS else None
    return TASKS.register(spec.name, spec, replace=replace or (existing is not None and existing.source == spec.source))


def registered_tasks() -> list[TaskSpec]:
    """Every registered task, built-ins first, in registration order."""
    return TASKS.values()


def is_task_file(reference: str) -> bool:
    return str(reference).endswith((".yaml", ".yml"))


def get_task(reference: str | TaskSpec | None, option: str = "--task") -> TaskSpec:
    """The task a name or a YAML path stands for; `option` names where it came from in messages."""
    from probing.tasks.spec import TaskSpec  # torch-bound (heads): imported when a task is looked up

    if isinstance(reference, TaskSpec):
        return reference
    if reference is None:
        raise ProbingError(f"{option}: no task given")
    if reference in TASKS:
        return TASKS.get(reference)
    if is_task_file(reference):
        from probing.tasks.yaml_task import load_task_file

        return register_task(load_task_file(Path(reference)))
    return TASKS.get(reference, option, hint="; or the path of a task .yaml file")


def task_reference(reference: str | None) -> str | None:
    """How a task reference is recorded so that another process can find it again: a YAML path made absolute."""
    if reference is not None and is_task_file(reference):
        return str(Path(reference).resolve())
    return reference


def dataset_fingerprint(task: str, split: str, sources: dict[str, str], limit: int | None = None) -> str:
    """A hash of what defines a split's examples: task, split, loader version, input files' hashes, and the limit
    to the first examples when there is one (left out otherwise, so that unlimited fingerprints stay as they were)."""
    fields = {"task": task, "split": split, "loader_format_version": LOADER_FORMAT_VERSION, "sources": sources}
    payload = json.dumps(fields | ({"limit": limit} if limit is not None else {}), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_split(options: DataOptions, split: str) -> SplitData:
    """Read one split of `options.task` through its reader, with the fingerprint of its input files."""
    spec = get_task(options.task)
    spec.check_options(options)
    split = spec.check_split(split)
    examples = spec.reader.read(options, split)
    if options.limit is not None:
        examples = examples[: options.limit]
    sources = {name: sha256_file(path) for name, path in spec.reader.sources(options, split).items()}
    return SplitData(
        task=spec.examples_name,
        split=split,
        examples=examples,
        fingerprint=dataset_fingerprint(spec.examples_name, split, sources, options.limit),
        sources=sources,
    )
