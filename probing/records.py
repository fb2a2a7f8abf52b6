"""Typed records of the files stages write and read back, one per file kind, shared by the writer and every
reader; and `StageResult`, what every stage function returns.

- `MetricsRecord` is a run folder's `metrics.json`: per seed (`SeedRun`) the trial, best epoch, the metrics
  of every evaluated split (`val`, `test`, or `testA`/`testB` ...) and the epoch history; across seeds the
  mean and standard deviation of every metric; per-category training counts; the report label.
- `SearchSummary` is a search folder's `summary.json`: the trials and the best one, re-run and evaluated.
- `MdlRecord` is an MDL folder's `mdl.json` (`probing.mdl`): the online code of a task's train targets.

Their JSON forms are the files' formats: `to_json` writes exactly what earlier versions wrote, `read`
refuses a damaged file in one line naming the file and the field.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from probing.errors import ProbingError

T = TypeVar("T")
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
MDL_FILE = "mdl.json"

# The `mode` and `probe` a run folder's manifest records for the runs that train no probe: a model answering a prompt
# through its language model (InstructBLIP), a model's own image-text matching head (BLIP-2), and people's answers
# (`probing annotate score`, the human baseline).
ZERO_SHOT_PROMPT = "zero-shot prompt"
ITM_HEAD = "ITM head"
HUMAN = "human"
NO_PROBE = "none"


@dataclass(frozen=True)
class StageResult(Generic[T]):
    """What a stage returns: its value, its folder, and whether it was built now, reused from an earlier run,
    or is written by another process of the same launch (`elsewhere`: value None)."""

    value: T | None
    folder: Path
    status: Literal["built", "reused", "elsewhere"]

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def read_json_file(path: Path) -> Any:
    """A JSON file's content, or one line naming the file (and the line) when it is missing or damaged."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ProbingError(f"{path}: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ProbingError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None


def _field(data: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or name not in data:
        raise ProbingError(f"{where}: field '{name}' is missing")
    value = data[name]
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise ProbingError(f"{where}: field '{name}' has the wrong type")
    return value


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


_SEED_FIELDS = ("seed", "trial", "best_epoch", "epochs_run", "stopped_early", "history")


@dataclass
class SeedRun:
    """One seed of a run: its trial, best epoch and the metrics of each evaluated split at that epoch."""

    seed: int
    trial: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    splits: dict[str, dict[str, float]]  # split -> metric -> value ("val" first)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "trial": self.trial,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            **self.splits,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> SeedRun:
        splits = (
            {key: value for key, value in data.items() if key not in _SEED_FIELDS} if isinstance(data, dict) else {}
        )
        # a run evaluates val and its task's reported splits; a zero-shot run may score any of them alone
        if not splits or not all(isinstance(v, dict) for v in splits.values()):
            raise ProbingError(f"{where}: no metrics per split")
        return cls(
            seed=_field(data, "seed", int, where),
            trial=_field(data, "trial", dict, where),
            best_epoch=_field(data, "best_epoch", int, where),
            epochs_run=_field(data, "epochs_run", int, where),
            stopped_early=_field(data, "stopped_early", bool, where),
            splits=splits,
            history=_field(data, "history", list, where),
        )


def summarise(runs: list[SeedRun]) -> dict[str, Any]:
    """Mean and sample standard deviation across seeds of every metric of every split."""
    summary: dict[str, Any] = {}
    for split in runs[0].splits:
        names = runs[0].splits[split].keys()
        summary[split] = {
            name: {
                "mean": statistics.fmean(r.splits[split][name] for r in runs),
                "std": _std([r.splits[split][name] for r in runs]),
                "seeds": len(runs),
            }
            for name in names
        }
    return summary


@dataclass
class MetricsRecord:
    """A run folder's `metrics.json`."""

    task: str
    metric: str
    runs: list[SeedRun]
    train_categories: dict[str, int]
    label: str | None = None

    @property
    def summary(self) -> dict[str, Any]:
        return summarise(self.runs)

    @property
    def splits(self) -> list[str]:
        return list(self.runs[0].splits)

    def run_of(self, seed: int) -> SeedRun:
        """The run of `seed`, else the first."""
        return next((run for run in self.runs if run.seed == seed), self.runs[0])

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "runs": [run.to_json() for run in self.runs],
            "summary": self.summary,
            "train_categories": self.train_categories,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> MetricsRecord:
        runs = _field(data, "runs", list, where)
        if not runs:
            raise ProbingError(f"{where}: field 'runs' is empty")
        return cls(
            task=_field(data, "task", str, where),
            metric=_field(data, "metric", str, where),
            runs=[SeedRun.from_json(run, f"{where}: runs[{i}]") for i, run in enumerate(runs)],
            train_categories=data.get("train_categories") or {},
            label=data.get("label"),
        )

    @classmethod
    def read(cls, folder: Path) -> MetricsRecord:
        path = Path(folder) / METRICS_FILE
        return cls.from_json(read_json_file(path), str(path))

    @classmethod
    def relabel(cls, folder: Path, label: str | None) -> MetricsRecord:
        """The run's record, its report label replaced by `label` (rewritten atomically) when one is given and
        differs: a label is how reports name the model, not part of what was computed, so a run reused under a
        new label takes the new one instead of being recomputed; no label given keeps the stored one."""
        from probing.artifacts import write_json

        record = cls.read(folder)
        if label is not None and record.label != label:
            record.label = label
            write_json(Path(folder) / METRICS_FILE, record.to_json())
        return record


@dataclass
class SearchSummary:
    """A search folder's `summary.json`: every trial, and the best one re-run with its final seeds."""

    task: str
    mode: str
    layer: int
    probe: str
    metric: str
    trials_complete: int
    trials_total: int
    best: dict[str, Any]  # number, params, val_search, the evaluated splits' metrics, best_epoch, seeds
    trials: list[dict[str, Any]]
    plots: list[str]
    study_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "mode": self.mode,
            "layer": self.layer,
            "probe": self.probe,
            "metric": self.metric,
            "trials_complete": self.trials_complete,
            "trials_total": self.trials_total,
            "best": self.best,
            "trials": self.trials,
            "plots": self.plots,
            "study_name": self.study_name,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> SearchSummary:
        best = _field(data, "best", dict, where)
        for name in ("params", "val_search", "val"):
            _field(best, name, (dict, int, float), f"{where}: best")
        return cls(
            task=_field(data, "task", str, where),
            mode=_field(data, "mode", str, where),
            layer=_field(data, "layer", int, where),
            probe=_field(data, "probe", str, where),
            metric=_field(data, "metric", str, where),
            trials_complete=_field(data, "trials_complete", int, where),
            trials_total=_field(data, "trials_total", int, where),
            best=best,
            trials=_field(data, "trials", list, where),
            plots=_field(data, "plots", list, where),
            study_name=data.get("study_name"),
        )

    @classmethod
    def read(cls, folder: Path) -> SearchSummary:
        path = Path(folder) / SUMMARY_FILE
        return cls.from_json(read_json_file(path), str(path))


@dataclass
class MdlRecord:
    """An MDL folder's `mdl.json`: the online codelength of a task's (or its control's) train targets."""

    task: str
    metric: str  # the main metric the prefix probes' epochs were kept by
    control: bool
    layer: int
    probe: str
    examples: int  # train examples sent
    ends: list[int]  # where the blocks end (the first block is sent uniformly)
    uniform_bits_per_example: float
    online_bits: float
    uniform_bits: float
    blocks: list[dict[str, Any]]  # per coded block: trained_on, start, end, bits, best_epoch, epochs_run, val
    example_bits: list[list[float]]  # per coded block, the bits of each of its examples
    label: str | None = None

    @property
    def compression(self) -> float:
        return self.uniform_bits / self.online_bits

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "control": self.control,
            "layer": self.layer,
            "probe": self.probe,
            "examples": self.examples,
            "ends": self.ends,
            "uniform_bits_per_example": self.uniform_bits_per_example,
            "online_bits": self.online_bits,
            "uniform_bits": self.uniform_bits,
            "compression": self.compression,
            "blocks": self.blocks,
            "example_bits": self.example_bits,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> MdlRecord:
        record = cls(
            task=_field(data, "task", str, where),
            metric=_field(data, "metric", str, where),
            control=_field(data, "control", bool, where),
            layer=_field(data, "layer", int, where),
            probe=_field(data, "probe", str, where),
            examples=_field(data, "examples", int, where),
            ends=_field(data, "ends", list, where),
            uniform_bits_per_example=_field(data, "uniform_bits_per_example", (int, float), where),
            online_bits=_field(data, "online_bits", (int, float), where),
            uniform_bits=_field(data, "uniform_bits", (int, float), where),
            blocks=_field(data, "blocks", list, where),
            example_bits=_field(data, "example_bits", list, where),
            label=data.get("label"),
        )
        if len(record.example_bits) != len(record.ends) - 1 or record.online_bits <= 0:
            raise ProbingError(f"{where}: field 'example_bits' does not match field 'ends'")
        return record

    @classmethod
    def read(cls, folder: Path) -> MdlRecord:
        path = Path(folder) / MDL_FILE
        return cls.from_json(read_json_file(path), str(path))
