"""Analysis of run folders: accuracies with bootstrap confidence intervals, per-category breakdowns, and the
paper's Table 5 (Kendall correlations between per-category accuracy and properties of the data).

- Every accuracy is the mean over seeds of the per-example correctness on test (Acc@IoU>=0.5 for RefCOCOg,
  accuracy for VSR and RCM), with a 95 % percentile bootstrap interval over test examples (the examples are
  resampled; all seeds are evaluated on each resample), seeded so that a report is reproducible, and, when
  several seeds were run, the standard deviation across seeds. The paper reports single runs.
- Categories: COCO supercategory (RefCOCOg, RCM), VSR meta-category.
- Kendall tau (scipy) across supercategories between accuracy and (1) the number of train examples of the
  supercategory, (2) the mean box area (fraction of the image) of its test examples, (3) the mean distance
  of its test boxes' centres from the image centre; p > 0.05 is marked as not significant.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from probing.errors import ProbingError

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
FAMILY_NAMES = {"blip2": "BLIP-2", "instructblip": "InstructBLIP"}
KENDALL_PROPERTIES = ("train_examples", "mean_area", "mean_centre_distance")


@dataclass
class Estimate:
    """A seed-averaged accuracy on test with its bootstrap interval (all as fractions)."""

    mean: float
    low: float
    high: float
    seed_std: float | None
    seeds: int
    examples: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "seed_std": self.seed_std,
                "seeds": self.seeds, "examples": self.examples}


@dataclass
class RunResults:
    """One run folder (`probing train`, or a search's `best/`) as the analysis sees it."""

    path: Path
    task: str
    mode: str
    layer: int
    probe: str
    family: str
    init: str
    label: str
    metric: str
    seeds: list[int]
    ids: list[int]  # test example ids, in file order
    categories: list[str]  # per test example
    correct: np.ndarray  # [seeds, examples] of 0/1
    metadata: list[dict[str, Any]]  # per test example
    train_categories: dict[str, int] = field(default_factory=dict)
    search: dict[str, Any] | None = None  # the search summary when the run is a search's best trial

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        """What a report row stands for: model label, task, mode, layer, probe."""
        return (self.label, self.task, self.mode, self.layer, self.probe)


def deduplicate(runs: list[RunResults]) -> tuple[list[RunResults], list[RunResults]]:
    """One run per (model, task, mode, layer, probe): the one with most seeds, then the first by path.

    A shared workspace can hold the same configuration twice (e.g. layer 12 in a per-layer experiment and in
    Table 1's); reports keep one deterministically and list the others. Returns (kept, dropped).
    """
    chosen: dict[tuple, RunResults] = {}
    for run in sorted(runs, key=lambda r: (-len(r.seeds), str(r.path))):
        chosen.setdefault(run.key, run)
    kept = sorted(chosen.values(), key=lambda r: str(r.path))
    return kept, [run for run in runs if chosen[run.key] is not run]


def last_layer_runs(runs: list[RunResults], probe: str = "linear") -> dict[tuple[str, str, str], RunResults]:
    """(model, mode, task) -> the run of the highest layer with this probe (runs already deduplicated)."""
    chosen: dict[tuple[str, str, str], RunResults] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.probe != probe:
            continue
        key = (run.label, run.mode, run.task)
        if key not in chosen or run.layer > chosen[key].layer:
            chosen[key] = run
    return chosen


def _model_of(manifest: dict[str, Any]) -> dict[str, Any]:
    inputs = manifest.get("inputs", {})
    if "model" in inputs:
        return inputs["model"]
    features = inputs.get("features", {})
    if features:
        return next(iter(features.values()))["model"]
    raise ProbingError(f"manifest of kind {manifest.get('kind')}: no model identity")


def load_run(path: Path | str) -> RunResults:
    """Read a run folder, or a search folder (its `best/` run, labelled with the search)."""
    path = Path(path)
    search = None
    if (path / "summary.json").is_file() and (path / "best").is_dir():
        search = json.loads((path / "summary.json").read_text())
        path = path / "best"
    for name in ("manifest.json", "metrics.json", "predictions/test.jsonl"):
        if not (path / name).is_file():
            raise ProbingError(f"{path}: not a run folder ({name} missing)")
    manifest = json.loads((path / "manifest.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text())
    model = _model_of(manifest)
    family, init = model["family"], model.get("init", "pretrained")
    label = metrics.get("label") or FAMILY_NAMES.get(family, family) + (" (random)" if init == "random" else "")
    records_by_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
    with open(path / "predictions" / "test.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            records_by_seed[record["seed"]].append(record)
    seeds = sorted(records_by_seed)
    first = records_by_seed[seeds[0]]
    ids = [r["id"] for r in first]
    for seed in seeds:
        if [r["id"] for r in records_by_seed[seed]] != ids:
            raise ProbingError(f"{path}: seeds were evaluated on different test examples")
    correct = np.array([[float(r["correct"]) for r in records_by_seed[seed]] for seed in seeds])
    return RunResults(path=path, task=manifest["task"], mode=manifest["mode"], layer=manifest["layer"],
                      probe=manifest["probe"], family=family, init=init, label=label, metric=metrics["metric"],
                      seeds=seeds, ids=ids, categories=[r["category"] for r in first], correct=correct,
                      metadata=first, train_categories=metrics.get("train_categories", {}), search=search)


def estimate(correct: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
             confidence: float = CONFIDENCE) -> Estimate:
    """Seed-averaged accuracy of `correct` ([seeds, examples] of 0/1) with a percentile bootstrap interval."""
    correct = np.atleast_2d(np.asarray(correct, dtype=float))
    seeds, examples = correct.shape
    if examples == 0:
        raise ProbingError("no test examples to estimate an accuracy from")
    per_example = correct.mean(axis=0)  # the seed average of each example
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, examples, size=(resamples, examples))
    means = per_example[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    per_seed = correct.mean(axis=1)
    return Estimate(mean=float(per_example.mean()), low=float(np.quantile(means, tail)),
                    high=float(np.quantile(means, 1 - tail)),
                    seed_std=float(statistics.stdev(per_seed)) if seeds > 1 else None, seeds=seeds,
                    examples=examples)


def overall(run: RunResults, seed: int = 0) -> Estimate:
    return estimate(run.correct, seed=seed)


def per_category(run: RunResults, seed: int = 0) -> dict[str, Estimate]:
    """Accuracy per category (supercategory or VSR meta-category), each with its own interval."""
    columns: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(run.categories):
        columns[category].append(index)
    return {category: estimate(run.correct[:, indices], seed=seed) for category, indices in sorted(columns.items())}


@dataclass
class Correlation:
    tau: float
    p_value: float
    categories: int

    @property
    def significant(self) -> bool:
        return self.p_value <= SIGNIFICANCE


def category_properties(run: RunResults) -> dict[str, dict[str, float]]:
    """Per supercategory: train examples, mean box area and mean centre distance of its test examples."""
    if run.task not in ("refcocog", "rcm"):
        raise ProbingError(f"{run.path}: Kendall correlations need boxes (RefCOCOg or RCM), not {run.task}")
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for category, record in zip(run.categories, run.metadata, strict=True):
        grouped[category].append(record)
    return {category: {"train_examples": float(run.train_categories.get(category, 0)),
                       "mean_area": float(np.mean([r["area_fraction"] for r in records])),
                       "mean_centre_distance": float(np.mean([r["centre_distance"] for r in records]))}
            for category, records in sorted(grouped.items())}


def category_accuracies(run: RunResults) -> dict[str, float]:
    """Seed-averaged accuracy per category (no interval)."""
    columns: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(run.categories):
        columns[category].append(index)
    return {category: float(run.correct[:, indices].mean()) for category, indices in sorted(columns.items())}


def kendall(run: RunResults) -> dict[str, Correlation]:
    """Kendall tau of per-supercategory accuracy against each property (the paper's Table 5)."""
    accuracies = category_accuracies(run)
    properties = category_properties(run)
    categories = sorted(accuracies)
    result = {}
    for name in KENDALL_PROPERTIES:
        if len(categories) < 3:
            raise ProbingError(f"{run.path}: Kendall needs at least 3 categories, found {len(categories)}")
        tau, p_value = kendalltau([accuracies[c] for c in categories], [properties[c][name] for c in categories])
        result[name] = Correlation(tau=float(tau), p_value=float(p_value), categories=len(categories))
    return result


def analyse(run: RunResults) -> dict[str, Any]:
    """Everything the analysis says about one run, JSON-ready (`probing analyze`)."""
    result: dict[str, Any] = {
        "path": str(run.path), "task": run.task, "mode": run.mode, "layer": run.layer, "probe": run.probe,
        "model": run.label, "metric": run.metric, "test": overall(run).as_dict(),
        "per_category": {c: e.as_dict() for c, e in per_category(run).items()},
    }
    if run.task in ("refcocog", "rcm"):
        result["kendall"] = {name: {"tau": _finite(c.tau), "p_value": _finite(c.p_value),
                                    "significant": c.significant} for name, c in kendall(run).items()}
        result["category_properties"] = category_properties(run)
    return result


def _finite(value: float) -> float | None:
    """NaN (Kendall on a constant column) as None: JSON has no NaN."""
    return None if value != value else value
