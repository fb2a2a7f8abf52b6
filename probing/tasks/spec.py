"""What a task is: one `TaskSpec` holds every fact about it that a stage needs, so that nothing else branches
on a task's name (the lm-evaluation-harness habit: a task owns its data, target, metric and direction).

- its data: a `DatasetReader` (which data options it needs, how a split's examples are read, which files
  define them), its splits and which of them are evaluated;
- its head (`probing.tasks.heads`): outputs, targets, loss, metrics, main metric and direction, prediction records;
- its search defaults (the paper's Table 4 for the paper's tasks) and early-stopping patience;
- what the report shows: title, what a category is, the order of categories, the chance level, whether
  Kendall correlations with box properties apply, which per-category table holds it;
- its control task (`probing.tasks.controls`): what an example's type is, of which the control targets are a fixed
  random function (its head draws them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from probing.core.errors import ProbingError
from probing.data.types import NO_CATEGORY, DataOptions, Example
from probing.tasks.heads import Head
from probing.tasks.search_space import SearchSpace

TRAIN, VAL = "train", "val"


class DatasetReader(Protocol):
    """How a task's examples are read from disk."""

    options: tuple[str, ...]  # the data options it needs (names of `DataOptions` fields)

    def read(self, options: DataOptions, split: str) -> list[Example]:
        """The examples of one split, in file order."""

    def sources(self, options: DataOptions, split: str) -> dict[str, Path]:
        """The files whose bytes define the split's examples (hashed into the dataset fingerprint; images are
        not hashed: too large)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the registry key, recorded in every manifest and used for folder names
    title: str  # how tables and figures name it
    reader: DatasetReader
    head: Head
    search_space: SearchSpace  # the default space (a config or YAML may override dimensions)
    splits: tuple[str, ...] = ("train", "val", "test")
    eval_splits: tuple[str, ...] = ("test",)  # reported splits beside val (val picks epochs and trials)
    patience: int | None = None  # early stopping after this many epochs without improvement; None: none
    chance: float | None = None  # the chance level drawn in figures; None: none drawn
    category: str = "category"  # what a category is, for table and figure titles
    category_order: tuple[str, ...] | None = None  # fixed column order (else sorted)
    kendall: bool = False  # Kendall tau of per-category accuracy against box properties (Table 5)
    category_table: str | None = None  # the report table of its per-category accuracies (default categories_<name>)
    description: str = ""
    source: str = "built-in"  # or the YAML file it was read from
    examples_from: str | None = None  # another task whose examples (and so stores) it shares, with another head
    stats_categories: Callable[[Sequence[Example]], dict[str, Any]] | None = None  # `data stats` (default: counts)
    control_type: Callable[[Example], Hashable] | None = None  # an example's type for its control task (None: none)
    # the words of an example's text its label hangs on (RCM: the claimed cell's name); extraction counts the
    # texts whose truncation to the model's token limit cuts them (None: not counted)
    key_words: Callable[[Example], str] | None = None

    @property
    def examples_name(self) -> str:
        """The name its examples go by in fingerprints and stores: its own, or the task it shares them with."""
        return self.examples_from or self.name

    @property
    def metric(self) -> str:
        return self.head.main_metric

    @property
    def evaluated_splits(self) -> tuple[str, ...]:
        """val, then the reported splits: the splits whose predictions a run writes."""
        return (VAL, *[split for split in self.eval_splits if split != VAL])

    @property
    def per_category_table(self) -> str:
        return self.category_table or f"categories_{self.name}"

    def check_split(self, split: str) -> str:
        """A split of this task (`dev` is `val`, as VSR names it); anything else names --split."""
        if split == "dev" and VAL in self.splits:
            return VAL
        if split not in self.splits:
            raise ProbingError(f"--split: unknown split '{split}' (choose {', '.join(self.splits)})")
        return split

    def check_options(self, options: DataOptions, need_images: bool = True) -> DataOptions:
        """The data options this task needs are given and exist; one ProbingError naming the option."""
        required = [name for name in self.reader.options if need_images or name != "images"]
        for option in required:
            value = getattr(options, option)
            if value is None:
                raise ProbingError(f"--{option} is required for --task {self.name}")
            if not Path(value).exists():
                raise ProbingError(f"--{option}: {value}: not found")
        for option in ("vsr", "rcm", "images"):
            value = getattr(options, option)
            if option in required and value is not None and not Path(value).is_dir():
                raise ProbingError(f"--{option}: {value}: not a directory")
        return options

    def category_counts(self, examples: Sequence[Example]) -> dict[str, Any]:
        if self.stats_categories is not None:
            return self.stats_categories(examples)
        return dict(sorted(Counter(e.category for e in examples if e.category != NO_CATEGORY).items()))

    def check_control(self, option: str = "--control") -> None:
        """A task without a control type is refused in one line naming it."""
        if self.control_type is None:
            raise ProbingError(
                f"{option}: task '{self.name}' has no control type (a YAML task names one with 'control_type')"
            )

    def control_targets(
        self, train: Sequence[Example], examples: Sequence[Example], seed: int, where: str
    ) -> torch.Tensor:
        """The control task's targets of `examples` (any split): each a fixed random function of the example's
        type and `seed`, drawn by the head from the `train` examples' targets of that type."""
        self.check_control()
        train_targets = self.head.targets(train, f"{where} (train)")
        train_types = [self.control_type(example) for example in train]
        types = [self.control_type(example) for example in examples]
        return self.head.control_targets(train_targets, train_types, types, seed)

    def describe(self) -> dict[str, Any]:
        """What `probing tasks` shows."""
        return {
            "name": self.name,
            "title": self.title,
            "head": self.head.kind,
            "metric": self.metric,
            "direction": self.head.direction,
            "splits": list(self.splits),
            "evaluated": list(self.eval_splits),
            "data_options": list(self.reader.options),
            "category": self.category,
            "patience": self.patience,
            "chance": self.chance,
            "search_space": self.search_space.identity(),
            "control_type": getattr(self.control_type, "title", None if self.control_type is None else "custom"),
            "source": self.source,
            "description": self.description,
        }
