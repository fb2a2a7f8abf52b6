"""Typed records of the files stages write and read back, one per file kind, shared by the writer and every
reader; and `StageResult`, what every stage function returns.

- `MetricsRecord` is a run folder's `metrics.json`: per seed (`SeedRun`) the trial, best epoch, the metrics
  of every evaluated split (`val`, `test`, or `testA`/`testB` ...) and the epoch history; across seeds the
  mean and standard deviation of every metric; per-category training counts; the report label.
- `SearchSummary` is a search folder's `summary.json`: the trials and the best one, re-run and evaluated.
- `MdlRecord` is an MDL folder's `mdl.json` (`probing.studies.mdl`): the online code of a task's train targets.

Their JSON forms are the files' formats: `to_json` writes exactly what earlier versions wrote, `read`
refuses a damaged file in one line naming the file and the field.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from probing.core.errors import ProbingError
from probing.core.yaml_files import read_text

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
    return _parsed_json(read_text(path), str(path), None)


def _parsed_json(text: str, path: str, line: int | None) -> Any:
    """`text` as JSON; damage (also integers of thousands of digits, which Python refuses to convert, and
    nesting past the recursion limit) is one line naming the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ProbingError(f"{path}: line {line or error.lineno}: not valid JSON ({error.msg})") from None
    except ValueError as error:
        where = f"line {line}: " if line is not None else ""
        raise ProbingError(f"{path}: {where}not valid JSON ({str(error).split(':')[0]})") from None
    except RecursionError:
        where = f"line {line}: " if line is not None else ""
        raise ProbingError(f"{path}: {where}not valid JSON (nested too deeply)") from None


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
        """The run's record, with the report label `label` when one is given (`relabel_json`'s rule)."""
        from probing.core.artifacts import relabel_json

        relabel_json(Path(folder) / METRICS_FILE, label)
        return cls.read(folder)


MANIFEST_FILE = "manifest.json"
PREDICTIONS_FOLDER = "predictions"
# What a reader of a run folder relies on: its manifest's mode, layer and probe, and per prediction record the
# seed, the example id, its category and whether the prediction was correct.
_RUN_MANIFEST_FIELDS = (("mode", str), ("layer", int), ("probe", str))
_PREDICTION_FIELDS = (("seed", int), ("id", int), ("category", str), ("correct", (bool, int, float)))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """A predictions file's records (one JSON object a line), each with the fields readers rely on; an empty
    file, a blank or damaged line, a non-UTF-8 byte or a record without a field is one line naming the file
    and the line."""
    path = Path(path)
    records = []
    try:
        handle = open(path, "rb")  # bytes, decoded line by line: a decoding error can then name its line
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}: line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProbingError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                raise ProbingError(f"{where}: a blank line (a predictions file has one record a line)")
            record = _parsed_json(line, str(path), number)
            if not isinstance(record, dict):
                raise ProbingError(f"{where}: expected a JSON object")
            for name, kind in _PREDICTION_FIELDS:
                _field(record, name, kind, where)
            records.append(record)
    if not records:
        raise ProbingError(f"{path}: no predictions (an empty file)")
    return records


@dataclass
class RunFolder:
    """A run folder read back (`probing train`, `probing zeroshot`, `probing annotate score`): its manifest,
    its `metrics.json` and its predictions per split, each refused in one line naming the file (and the line)
    when damaged. The one reader of run folders."""

    path: Path
    manifest: dict[str, Any]
    metrics: MetricsRecord

    @classmethod
    def read(cls, path: Path | str) -> RunFolder:
        path = Path(path)
        for name in (MANIFEST_FILE, METRICS_FILE):
            if not (path / name).is_file():
                raise ProbingError(f"{path}: not a run folder ({name} missing)")
        where = str(path / MANIFEST_FILE)
        manifest = read_json_file(path / MANIFEST_FILE)
        if not isinstance(manifest, dict):
            raise ProbingError(f"{where}: expected a JSON object")
        for name, kind in _RUN_MANIFEST_FIELDS:
            _field(manifest, name, kind, where)
        return cls(path=path, manifest=manifest, metrics=MetricsRecord.read(path))

    def predictions_file(self, split: str) -> Path:
        return self.path / PREDICTIONS_FOLDER / f"{split}.jsonl"

    def has_predictions(self, split: str) -> bool:
        return self.predictions_file(split).is_file()

    def predictions(self, split: str) -> list[dict[str, Any]]:
        if not self.has_predictions(split):
            raise ProbingError(f"{self.path}: not a run folder ({PREDICTIONS_FOLDER}/{split}.jsonl missing)")
        return read_predictions(self.predictions_file(split))


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
    metric: str  # what the prefix probes' epochs were kept by: "val_loss" (older codes: the task's main metric)
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
