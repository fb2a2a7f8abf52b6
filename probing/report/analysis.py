"""Analysis of run folders: accuracies with bootstrap confidence intervals, per-category breakdowns, and the
paper's Table 5 (Kendall correlations between per-category accuracy and properties of the data).

- Every accuracy is the mean over seeds of the per-example correctness on an evaluated split (test for the
  paper's tasks; by the task head's rule: Acc@IoU>=0.5 for boxes, accuracy for binary matching), with a 95 %
  percentile bootstrap interval over its examples (the examples are resampled; all seeds are evaluated on
  each resample), seeded so that a report is reproducible, and, when several seeds were run, the standard
  deviation across seeds. The paper reports single runs.
- Categories: what the task calls one (COCO supercategory for RefCOCOg and RCM, VSR meta-category ...).
- Kendall tau (scipy) across categories between accuracy and (1) the number of train examples of the
  category, (2) the mean box area (fraction of the image) of its test examples, (3) the mean distance of its
  test boxes' centres from the image centre; p > 0.05 is marked as not significant. For tasks whose
  examples carry boxes (the task says so).
- ROC-AUC (scikit-learn) of binary tasks, from the predicted probabilities, beside the accuracy.
- Rigour (`probing.tasks.controls`, `probing.studies.mdl`): a run on a task's control targets rides on its task run
  (`attach_rigour`); selectivity = task accuracy - control accuracy, with a *paired* bootstrap interval (the
  same resampled test examples for both runs, `paired_difference`); an online code's codelength with a
  bootstrap interval over the coded examples, resampled within each block (`codelength_interval`).
- `probing analyze` runs every registered analysis that applies to the run's task (`register_analysis`).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from probing.core.artifacts import read_manifest
from probing.core.errors import ProbingError, shown
from probing.core.records import NO_PROBE, MdlRecord, RunFolder, SearchSummary, read_json_file, read_predictions
from probing.core.registry import Registry
from probing.data.types import NO_CATEGORY
from probing.tasks import TaskSpec, get_task

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
KENDALL_PROPERTIES = ("train_examples", "mean_area", "mean_centre_distance")
MIN_KENDALL_CATEGORIES = 3


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
        return {
            "mean": self.mean,
            "ci_low": self.low,
            "ci_high": self.high,
            "seed_std": self.seed_std,
            "seeds": self.seeds,
            "examples": self.examples,
        }


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
    split: str = "test"  # the evaluated split these results are of
    task_file: str | None = None  # where a task defined by a file is defined
    control: bool = False  # trained and judged on the task's control targets (`probing.tasks.controls`)
    control_seed: int = 0  # which control (with `control`)
    shuffled: bool = False  # a floor: trained with the train and val feature rows permuted (`probing.tasks.controls`)
    control_run: RunResults | None = None  # the same configuration on the control targets (`attach_rigour`)
    control_runs: list[RunResults] = field(default_factory=list)  # on every control seed, by seed (`attach_rigour`)
    floor_run: RunResults | None = None  # the same configuration on shuffled features: the floor (`attach_rigour`)
    lookup_correct: np.ndarray | None = None  # binary: per example, is the train-type lookup right (the ceiling)
    searched_control: bool = False  # a control run with a search of its own (`control_search`), not the task's
    mdl: MdlResults | None = None  # the online code of its train targets (`attach_rigour`)
    mdl_floor: MdlResults | None = None  # the same code with shuffled feature rows: the noise floor (`attach_rigour`)
    model_id: str | None = None  # where the weights came from (hub id, local folder, lavis:.pth), when recorded
    weights: dict[str, Any] = field(default_factory=dict)  # the model's identity (family, init, weights hash ...)
    # binary heads: the smallest, over seeds, of the share of examples given the seed's most frequent answer
    majority_share: float | None = None
    # (latents, width) of the features a frozen probe read, when readable (`run_latents`); False: not read yet
    latents: tuple[int, int] | None | bool = field(default=False, repr=False, compare=False)
    validation: RunResults | None | bool = field(default=False, repr=False, compare=False)  # False: not read yet

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task) if self.task_file is None else get_task(self.task_file)

    @property
    def column(self) -> str:
        """The task and split as a table column: the task's title, and the split when it has several."""
        spec = self.spec
        return spec.title if len(spec.eval_splits) == 1 else f"{spec.title} {self.split}"

    @property
    def key(self) -> tuple[str, str, str, str, int, str, bool, int, bool]:
        """What a report row stands for: model label, task, split, mode, layer, probe, whether on the control
        targets (and which control seed), whether a floor (shuffled features)."""
        return (*self.configuration, self.control, self.control_seed if self.control else 0, self.shuffled)

    @property
    def configuration(self) -> tuple[str, str, str, str, int, str]:
        """Model label, task, split, mode, layer and probe: what a task run, its controls and floors share."""
        return (self.label, self.task, self.split, self.mode, self.layer, self.probe)


def random_counterpart(run: RunResults, runs: Sequence[RunResults]) -> RunResults | None:
    """The same configuration on the random-weights model of the run's family (`init: random`), if any."""
    if run.init == "random":
        return None
    same = [
        other
        for other in runs
        if other.init == "random"
        and other.family == run.family
        and (other.task, other.split, other.mode, other.layer, other.probe) == run.configuration[1:]
    ]
    return min(same, key=lambda other: str(other.path)) if same else None


@dataclass(frozen=True)
class FamilyRow:
    """One trained model of the families comparison: its family, the latent shape its probe read, and per task
    column its last-layer frozen linear run beside the same run on its family's random-weights model."""

    label: str
    family: str
    latents: tuple[int, int] | None
    runs: dict[str, tuple[RunResults, RunResults | None]]  # column -> (run, random-weights run or None)


def family_rows(runs: list[RunResults]) -> list[FamilyRow]:
    """The families comparison (the report's `families` table and figure): per trained model, the frozen linear
    probe on its last layer per task column; nothing unless two resampler families are present. Ordered by the
    number of latents, then label, so that a reader sees compression grow or shrink down the table."""
    frozen = [run for run in runs if run.mode == "frozen" and run.probe == "linear"]
    trained = {key: run for key, run in last_layer_runs(frozen).items() if run.init != "random"}
    if len({run.family for run in trained.values()}) < 2:
        return []
    by_label: dict[str, dict[str, tuple[RunResults, RunResults | None]]] = defaultdict(dict)
    for (label, _, column), run in trained.items():
        by_label[label][column] = (run, random_counterpart(run, frozen))
    rows = []
    for label, columns in by_label.items():
        first = next(iter(columns.values()))[0]
        shape = next((shape for run, _ in columns.values() if (shape := run_latents(run)) is not None), None)
        rows.append(FamilyRow(label, first.family, shape, columns))
    return sorted(rows, key=lambda row: (row.latents is None, row.latents or (0, 0), row.label))


def deduplicate(runs: list[RunResults]) -> tuple[list[RunResults], list[RunResults]]:
    """One run per (model, task, mode, layer, probe, control): the one with most seeds, then the first by path.

    A shared workspace can hold the same configuration twice (e.g. layer 12 in a per-layer experiment and in
    Table 1's); reports keep one deterministically and list the others. Returns (kept, dropped).
    """
    chosen: dict[tuple, RunResults] = {}
    for run in sorted(runs, key=lambda r: (-len(r.seeds), str(r.path))):
        chosen.setdefault(run.key, run)
    kept = sorted(chosen.values(), key=lambda r: str(r.path))
    return kept, [run for run in runs if chosen[run.key] is not run]


def last_layer_runs(runs: list[RunResults], probe: str = "linear") -> dict[tuple[str, str, str], RunResults]:
    """(model, mode, column) -> the run of the highest layer with this probe (runs already deduplicated); runs
    made without a probe (human answers) stand beside every probe's."""
    chosen: dict[tuple[str, str, str], RunResults] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.probe not in (probe, NO_PROBE):
            continue
        key = (run.label, run.mode, run.column)
        if key not in chosen or run.layer > chosen[key].layer:
            chosen[key] = run
    return chosen


def _model_of(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    inputs = manifest.get("inputs", {})
    model = None
    if isinstance(inputs, dict) and "model" in inputs:
        model = inputs["model"]
    elif isinstance(inputs, dict) and isinstance(inputs.get("features"), dict) and inputs["features"]:
        store = next(iter(inputs["features"].values()))
        model = store.get("model") if isinstance(store, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("family"), str):
        raise ProbingError(f"{where}: manifest of kind {shown(manifest.get('kind'))}: no model identity")
    return model


def model_label(model: dict[str, Any]) -> str:
    """The default report label of a model: its family's title, marked when its weights are random."""
    from probing.models.registry import families

    titles = {family.name: family.title for family in families()}
    family = model.get("family", "?")
    return titles.get(family, family) + (" (random)" if model.get("init") == "random" else "")


def _store_manifests(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests of a frozen run's feature stores that can still be read (stores may have moved since)."""
    found = []
    for store in (manifest.get("feature_paths") or {}).values():
        try:
            found.append(json.loads((Path(store) / "manifest.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found


def run_latents(run: RunResults) -> tuple[int, int] | None:
    """(latents, width) of one layer's features in a frozen run's first readable feature store, from its files'
    headers (no tensor is read, nothing verified); None for runs without stores or whose stores have moved. Read on
    first use (the families table and figure), once per run: loading a run opens no store."""
    if run.latents is not False:
        return run.latents
    from safetensors import SafetensorError

    from probing.store.features import FeatureStore  # torch: only reports of frozen runs get here

    run.latents = None
    manifest = (read_manifest(run.path) or {}) if run.mode == "frozen" else {}
    for store in (manifest.get("feature_paths") or {}).values():
        try:
            run.latents = FeatureStore(store, verify=False).latent_shape(run.layer)
            break
        except (OSError, ValueError, KeyError, IndexError, SafetensorError, ProbingError):  # moved or unreadable
            continue
    return run.latents


def _store_label(stores: list[dict[str, Any]]) -> str | None:
    """The report label a frozen run's feature stores were given (`probing extract --label`), if any."""
    return next((s["label"] for s in stores if isinstance(s.get("label"), str) and s["label"]), None)


def _model_id(manifest: dict[str, Any], stores: list[dict[str, Any]]) -> str | None:
    """The source the run's model was read from: in the run's manifest (`model_source` of unfrozen runs, the
    model identity of zero-shot runs) or in its feature stores' (frozen runs); None when none records it (moved
    stores)."""
    in_stores = [store.get("model_source") for store in stores]
    for source in (manifest.get("model_source"), manifest.get("inputs", {}).get("model"), *in_stores):
        if isinstance(source, dict) and source.get("source"):  # zero-shot runs: `inputs.model`
            return str(source["source"])
    return None


def _run_folder(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """A run folder, or a search folder's `best/` run with its summary."""
    path = Path(path)
    if (path / "summary.json").is_file() and (path / "best").is_dir():
        return path / "best", SearchSummary.read(path).to_json()
    return path, None


def load_run(path: Path | str, split: str | None = None) -> RunResults:
    """Read a run folder, or a search folder (its `best/` run, labelled with the search), for one evaluated
    split (default: the task's first, `test` for the paper's tasks)."""
    run_path, search = _run_folder(Path(path))
    folder = RunFolder.read(run_path)
    manifest, metrics = folder.manifest, folder.metrics
    task_file = manifest.get("task_file")
    spec = get_task(task_file or metrics.task)
    # a human run holds the one split its annotators saw: the first evaluated split it has, by default
    split = split or next((name for name in spec.eval_splits if folder.has_predictions(name)), spec.eval_splits[0])
    model = _model_of(manifest, run_path)
    family, init = model["family"], model.get("init", "pretrained")
    stores = _store_manifests(manifest)  # read once: the label and the model id may both come from them
    label = metrics.label or _store_label(stores) or model_label(model)
    records_by_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in folder.predictions(split):
        records_by_seed[record["seed"]].append(record)
    seeds = sorted(records_by_seed)
    first = records_by_seed[seeds[0]]
    ids = [r["id"] for r in first]
    for seed in seeds:
        if [r["id"] for r in records_by_seed[seed]] != ids:
            raise ProbingError(f"{run_path}: seeds were evaluated on different {split} examples")
    correct = np.array([[float(r["correct"]) for r in records_by_seed[seed]] for seed in seeds])
    majority_share = None
    if spec.head.kind == "binary" and all("predicted" in r for r in first):
        shares = [
            Counter(json.dumps(r["predicted"]) for r in records).most_common(1)[0][1] / len(records)
            for records in records_by_seed.values()
        ]
        majority_share = min(shares)
    lookup_correct = None
    if all("lookup_correct" in r for r in first):
        lookup_correct = np.array([float(r["lookup_correct"]) for r in first])
    return RunResults(
        path=run_path,
        task=spec.name,
        mode=manifest["mode"],
        layer=manifest["layer"],
        probe=manifest["probe"],
        family=family,
        init=init,
        label=label,
        metric=metrics.metric,
        seeds=seeds,
        ids=ids,
        categories=[r["category"] for r in first],
        correct=correct,
        metadata=first,
        train_categories=metrics.train_categories,
        search=search,
        split=split,
        task_file=task_file,
        control=bool(manifest.get("control", False)),
        control_seed=int(manifest.get("control_seed", 0)),
        shuffled=bool(manifest.get("shuffled_features", False)),
        lookup_correct=lookup_correct,
        searched_control=bool(manifest.get("control", False)) and search is not None,
        model_id=_model_id(manifest, stores),
        weights=dict(model),
        majority_share=majority_share,
    )


def load_run_splits(path: Path | str) -> list[RunResults]:
    """One RunResults per evaluated split of a run (RefCOCO's testA and testB; `test` alone for most)."""
    first = load_run(path)
    others = first.spec.eval_splits[first.spec.eval_splits.index(first.split) + 1 :]
    if first.probe == NO_PROBE:  # a human run holds only the splits its annotators saw
        others = [split for split in others if (first.path / "predictions" / f"{split}.jsonl").is_file()]
    return [first] + [load_run(path, split) for split in others]


def estimate(
    correct: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE
) -> Estimate:
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
    return Estimate(
        mean=float(per_example.mean()),
        low=float(np.quantile(means, tail)),
        high=float(np.quantile(means, 1 - tail)),
        seed_std=float(statistics.stdev(per_seed)) if seeds > 1 else None,
        seeds=seeds,
        examples=examples,
    )


def overall(run: RunResults, seed: int = 0) -> Estimate:
    return estimate(run.correct, seed=seed)


def paired_difference(
    first: np.ndarray, second: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, confidence=CONFIDENCE
) -> Estimate:
    """Seed-averaged accuracy of `first` minus that of `second` ([seeds, examples] of 0/1 each, the same
    examples in the same order), with a paired percentile bootstrap interval: each resample draws examples
    once and takes both accuracies on them, so what the two runs share (which examples are hard) cancels."""
    first, second = (np.atleast_2d(np.asarray(values, dtype=float)) for values in (first, second))
    if first.shape[1] != second.shape[1]:
        raise ProbingError(f"a paired difference needs the same examples, got {first.shape[1]} and {second.shape[1]}")
    difference = first.mean(axis=0) - second.mean(axis=0)  # per example
    examples = len(difference)
    if examples == 0:
        raise ProbingError("no test examples to estimate a difference from")
    draws = np.random.default_rng(seed).integers(0, examples, size=(resamples, examples))
    means = difference[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    return Estimate(
        mean=float(difference.mean()),
        low=float(np.quantile(means, tail)),
        high=float(np.quantile(means, 1 - tail)),
        seed_std=None,
        seeds=min(len(first), len(second)),
        examples=examples,
    )


def validation_run(run: RunResults) -> RunResults | None:
    """The same run on its validation split (the best trial's final seeds evaluated on val), when the run wrote
    val predictions and val is not already one of the task's evaluated splits; else None."""
    if run.validation is not False:  # read once per report (Table 1 and results.csv both show it)
        return run.validation
    run.validation = None
    if "val" not in run.spec.eval_splits and (run.path / "predictions" / "val.jsonl").is_file():
        run.validation = load_run(run.path, "val")
        run.validation.label, run.validation.search = run.label, run.search
    return run.validation


def chance_level(run: RunResults) -> float | None:
    """The majority-class rate of the run's split labels (binary heads: 0.5 when balanced); None for heads with
    no single chance level (box regression: a guessed box's IoU depends on the distribution of boxes)."""
    if run.spec.head.kind != "binary" or not run.metadata or "label" not in run.metadata[0]:
        return None
    positives = float(np.mean([record["label"] for record in run.metadata]))
    return max(positives, 1 - positives)


# A probe answering one class for at least this share of the examples, in every seed, counts as predicting a
# single class: fewer than 1 answer in 100 differs, so its per-category accuracy is each category's label rate.
SINGLE_CLASS_SHARE = 0.99


def single_class(run: RunResults) -> bool:
    """Whether a binary probe predicted one class for (nearly) every example of every seed (its per-category
    accuracy is then the category's label rate, and a correlation of it says nothing about the probe)."""
    return run.majority_share is not None and run.majority_share >= SINGLE_CLASS_SHARE


@dataclass
class Paired:
    """Two runs on the same examples: the accuracy difference (first - second) with a paired bootstrap interval,
    and McNemar's exact test on the per-example correctness of each run's first seed."""

    difference: Estimate
    first_only: int  # examples the first run gets right and the second wrong
    second_only: int
    p_value: float


def aligned(first: RunResults, second: RunResults) -> np.ndarray | None:
    """Indices into `second`'s examples in `first`'s order, or None unless both hold exactly the same ids."""
    position = {example_id: index for index, example_id in enumerate(second.ids)}
    if len(first.ids) != len(second.ids) or any(example_id not in position for example_id in first.ids):
        return None
    return np.array([position[example_id] for example_id in first.ids])


def paired_comparison(first: RunResults, second: RunResults, seed: int = 0) -> Paired | None:
    """`first` against `second` on their shared examples (None unless both were evaluated on the same ones).
    McNemar's test needs one 0/1 outcome per example and run: each run's first seed gives it."""
    from statsmodels.stats.contingency_tables import mcnemar

    order = aligned(first, second)
    if order is None:
        return None
    other = second.correct[:, order]
    difference = paired_difference(first.correct, other, seed=seed)
    one, two = first.correct[0].astype(bool), other[0].astype(bool)
    counts = [[int(np.sum(one & two)), int(np.sum(one & ~two))], [int(np.sum(~one & two)), int(np.sum(~one & ~two))]]
    test = mcnemar(counts, exact=True)
    return Paired(difference, counts[0][1], counts[1][0], float(test.pvalue))


def selectivity(run: RunResults, seed: int = 0) -> Estimate | None:
    """Task accuracy - control accuracy on the same test examples (paired bootstrap), or None without a control
    run. Examples are matched by id (both runs read the same stores, so normally in the same order)."""
    control = run.control_run
    if control is None:
        return None
    return paired_difference(run.correct, _aligned(run, control), seed=seed)


def _aligned(run: RunResults, other: RunResults, values: np.ndarray | None = None) -> np.ndarray:
    """`other.correct` (or `values`, per example of `other`) with its examples in `run`'s order (matched by id)."""
    position = {example_id: index for index, example_id in enumerate(other.ids)}
    if len(other.ids) != len(run.ids) or any(example_id not in position for example_id in run.ids):
        raise ProbingError(f"{other.path}: evaluated on other {run.split} examples than {run.path}")
    order = [position[example_id] for example_id in run.ids]
    values = other.correct if values is None else values
    return values[..., order]


def seeds_and_examples(
    per_seed: np.ndarray,
    shift: np.ndarray | None = None,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """mean(shift) + the mean over rows (control seeds) of `per_seed` [S, N] (per example values), with a 95 %
    percentile bootstrap interval that resamples both the examples (the same draw for `shift` and every row,
    paired) and the rows (control seeds, with replacement): it covers the example noise and the spread over
    control seeds. `seed_std` is the standard deviation of the rows' means."""
    per_seed = np.atleast_2d(np.asarray(per_seed, dtype=float))
    rows, examples = per_seed.shape
    shift = np.zeros(examples) if shift is None else np.asarray(shift, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = 100  # resamples drawn at once: bounds the memory of the draws
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        draws = rng.integers(0, examples, size=(count, examples))
        picked = rng.integers(0, rows, size=(count, rows))
        row_means = per_seed[:, draws].mean(axis=2)  # [S, count]: each row on each resample's examples
        means[start : start + count] = shift[draws].mean(axis=1) + np.take_along_axis(row_means.T, picked, 1).mean(1)
    tail = (1 - confidence) / 2
    row_means = per_seed.mean(axis=1)
    return Estimate(
        mean=float(shift.mean() + row_means.mean()),
        low=float(np.quantile(means, tail)),
        high=float(np.quantile(means, 1 - tail)),
        seed_std=float(statistics.stdev(row_means)) if rows > 1 else None,
        seeds=rows,
        examples=examples,
    )


@dataclass
class Rigour:
    """A task run's rigour numbers (`rigour`): each an Estimate, None where its runs are missing."""

    floor: Estimate | None  # the task's floor: the same probe on shuffled features
    control: Estimate | None  # control accuracy, over control seeds
    control_floor: Estimate | None  # the controls' floors, over control seeds
    ceiling: Estimate | None  # binary controls: the train-type lookup, over control seeds
    selectivity: Estimate | None  # (task - floor) - (control - control floor), over control seeds
    control_seeds: int


def rigour(run: RunResults, seed: int = 0) -> Rigour:
    """Floors, ceiling and selectivity of a task run (`attach_rigour` first). Selectivity against the floors:
    (task accuracy - its floor) - mean over control seeds of (control accuracy - its floor), every term on the
    same test examples; its interval resamples the examples and the control seeds (`seeds_and_examples`). A
    floor missing (runs made without one) counts as 0, so the selectivity is then Hewitt & Liang's plain
    difference."""
    task = run.correct.mean(axis=0)
    floor = _aligned(run, run.floor_run).mean(axis=0) if run.floor_run is not None else None
    controls = run.control_runs or ([run.control_run] if run.control_run is not None else [])
    if not controls:
        return Rigour(None if floor is None else estimate(floor[None], seed=seed), None, None, None, None, 0)
    control = np.stack([_aligned(run, c).mean(axis=0) for c in controls])
    with_floors = all(c.floor_run is not None for c in controls)
    control_floor = np.stack([_aligned(run, c.floor_run).mean(axis=0) for c in controls]) if with_floors else None
    lookups = [c.lookup_correct for c in controls]
    ceiling = (
        np.stack([_aligned(run, c, v) for c, v in zip(controls, lookups, strict=True)])
        if all(v is not None for v in lookups)
        else None
    )
    above = control - control_floor if control_floor is not None else control
    return Rigour(
        floor=None if floor is None else estimate(floor[None], seed=seed),
        control=seeds_and_examples(control, seed=seed),
        control_floor=None if control_floor is None else seeds_and_examples(control_floor, seed=seed),
        ceiling=None if ceiling is None else seeds_and_examples(ceiling, seed=seed),
        selectivity=seeds_and_examples(-above, task - (floor if floor is not None else 0), seed=seed),
        control_seeds=len(controls),
    )


@dataclass
class MdlResults:
    """An MDL folder (`probing mdl`) as the report sees it."""

    path: Path
    label: str
    record: MdlRecord
    control_seed: int = 0
    shuffled: bool = False  # the noise-feature floor: the code with shuffled feature rows

    @property
    def key(self) -> tuple[str, str, int, str, bool, int, bool]:
        """Model label, task, layer, probe, whether on the control targets (which seed), whether a floor."""
        record = self.record
        return (self.label, record.task, record.layer, record.probe, record.control, self.control_seed, self.shuffled)


def load_mdl(path: Path | str) -> MdlResults:
    path = Path(path)
    manifest = read_json_file(path / "manifest.json")
    record = MdlRecord.read(path)
    return MdlResults(
        path=path,
        label=record.label or model_label(_model_of(manifest, path)),
        record=record,
        control_seed=int(manifest.get("control_seed", 0)) if record.control else 0,
        shuffled=bool(manifest.get("shuffled_features", False)),
    )


def codelength_interval(
    record: MdlRecord, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """A percentile bootstrap interval of the online codelength (bits): each coded block's examples resampled
    within the block (its size kept), the first block's uniform bits fixed; the probes are not retrained."""
    rng = np.random.default_rng(seed)
    totals = np.full(resamples, record.ends[0] * record.uniform_bits_per_example)
    chunk = 100  # resamples drawn at once: bounds the memory of a large block's draws
    for bits in record.example_bits:
        values = np.asarray(bits, dtype=float)
        for start in range(0, resamples, chunk):
            count = min(chunk, resamples - start)
            totals[start : start + count] += values[rng.integers(0, len(values), size=(count, len(values)))].sum(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(totals, tail)), float(np.quantile(totals, 1 - tail))


def attach_rigour(runs: list[RunResults], codes: list[MdlResults]) -> tuple[list[RunResults], list[RunResults]]:
    """Control runs ride on their task runs (`control_runs`, by control seed; `control_run` the first), floors
    (shuffled features) on the runs of the same targets (`floor_run`), and online codes on the runs of the same
    model, task, layer, probe and targets (`mdl`; the noise-feature floor's code: `mdl_floor`). Returns (the task
    runs, control runs and floors without a task run)."""
    tasks = [run for run in runs if not run.control and not run.shuffled]
    by_configuration = {run.configuration: run for run in tasks}
    floors = {run.key[:-1]: run for run in runs if run.shuffled}
    unpaired = []
    for control in sorted((run for run in runs if run.control and not run.shuffled), key=lambda r: r.control_seed):
        task_run = by_configuration.get(control.configuration)
        if task_run is None:
            unpaired.append(control)
        else:
            task_run.control_runs.append(control)
    for run in tasks:
        run.control_run = run.control_runs[0] if run.control_runs else None
    targets = tasks + [control for run in tasks for control in run.control_runs]
    attached = set()
    for run in targets:
        run.floor_run = floors.get(run.key[:-1])
        if run.floor_run is not None:
            attached.add(id(run.floor_run))
    unpaired += [floor for floor in floors.values() if id(floor) not in attached]
    by_code = {code.key: code for code in sorted(codes, key=lambda c: str(c.path), reverse=True)}  # first path wins
    for run in targets:
        key = (run.label, run.task, run.layer, run.probe, run.control, run.control_seed if run.control else 0)
        frozen = run.mode == "frozen"
        run.mdl = by_code.get((*key, False)) if frozen else None
        run.mdl_floor = by_code.get((*key, True)) if frozen else None
    return tasks, unpaired


def per_category(run: RunResults, seed: int = 0) -> dict[str, Estimate]:
    """Accuracy per category (supercategory or VSR meta-category), each with its own interval."""
    return {category: estimate(run.correct[:, indices], seed=seed) for category, indices in category_rows(run).items()}


def category_rows(run: RunResults) -> dict[str, list[int]]:
    """The test examples of each category, by category name (sorted); examples of no category left out."""
    columns: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(run.categories):
        if category != NO_CATEGORY:
            columns[category].append(index)
    return dict(sorted(columns.items()))


@dataclass
class Correlation:
    tau: float
    p_value: float
    categories: int

    @property
    def significant(self) -> bool:
        return self.p_value <= SIGNIFICANCE


def category_properties(run: RunResults) -> dict[str, dict[str, float]]:
    """Per category: train examples, mean box area and mean centre distance of its test examples."""
    if not run.spec.kendall:
        raise ProbingError(f"{run.path}: Kendall correlations need examples with boxes, which {run.task} has not")
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for category, record in zip(run.categories, run.metadata, strict=True):
        if category != NO_CATEGORY:
            grouped[category].append(record)
    return {
        category: {
            "train_examples": float(run.train_categories.get(category, 0)),
            "mean_area": float(np.mean([r["area_fraction"] for r in records])),
            "mean_centre_distance": float(np.mean([r["centre_distance"] for r in records])),
        }
        for category, records in sorted(grouped.items())
    }


def category_accuracies(run: RunResults) -> dict[str, float]:
    """Seed-averaged accuracy per category (no interval)."""
    return {category: float(run.correct[:, indices].mean()) for category, indices in category_rows(run).items()}


def kendall(run: RunResults) -> dict[str, Correlation]:
    """Kendall tau of per-supercategory accuracy against each property (the paper's Table 5)."""
    accuracies = category_accuracies(run)
    properties = category_properties(run)
    categories = sorted(accuracies)
    result = {}
    for name in KENDALL_PROPERTIES:
        if len(categories) < MIN_KENDALL_CATEGORIES:
            raise ProbingError(
                f"{run.path}: Kendall needs at least {MIN_KENDALL_CATEGORIES} categories, found {len(categories)}"
            )
        tau, p_value = kendalltau([accuracies[c] for c in categories], [properties[c][name] for c in categories])
        result[name] = Correlation(tau=float(tau), p_value=float(p_value), categories=len(categories))
    return result


def roc_auc(run: RunResults) -> dict[str, float | None] | None:
    """ROC-AUC (scikit-learn) of a binary run's probabilities, mean and std over seeds; None for other heads
    or runs whose records carry no probability."""
    from sklearn.metrics import roc_auc_score

    if run.spec.head.kind != "binary" or not run.metadata or "probability" not in run.metadata[0]:
        return None
    labels = [record["label"] for record in run.metadata]
    if len(set(labels)) < 2:
        return None
    values = []
    for seed in run.seeds:
        records = [r for r in read_predictions(run.path / "predictions" / f"{run.split}.jsonl") if r["seed"] == seed]
        values.append(float(roc_auc_score([r["label"] for r in records], [r["probability"] for r in records])))
    return {
        "mean": float(np.mean(values)),
        "seed_std": float(statistics.stdev(values)) if len(values) > 1 else None,
        "seeds": len(values),
    }


@dataclass(frozen=True)
class Analysis:
    """One per-run analysis of `probing analyze`: its name, when it applies, what it computes (JSON-ready)."""

    name: str
    applies: Callable[[RunResults], bool]
    compute: Callable[[RunResults], Any]


# Installed packages may add analyses through the entry-point group `probing.analyses` (an `Analysis`).
ANALYSES: Registry[Analysis] = Registry("analysis", "probing.analyses")


def register_analysis(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add an analysis; another under a registered name is refused unless `replace`."""
    return ANALYSES.register(analysis.name, analysis, replace=replace)


def _kendall_json(run: RunResults) -> dict[str, Any]:
    return {
        name: {"tau": _finite(c.tau), "p_value": _finite(c.p_value), "significant": c.significant}
        for name, c in kendall(run).items()
    }


register_analysis(Analysis("test", lambda run: True, lambda run: overall(run).as_dict()))
register_analysis(
    Analysis("per_category", lambda run: True, lambda run: {c: e.as_dict() for c, e in per_category(run).items()})
)
register_analysis(Analysis("roc_auc", lambda run: run.spec.head.kind == "binary", roc_auc))


def _has_kendall(run: RunResults) -> bool:
    # against train counts: what a probe learned; people's answers are not trained
    return run.spec.kendall and run.probe != NO_PROBE and len(category_rows(run)) >= MIN_KENDALL_CATEGORIES


register_analysis(Analysis("kendall", _has_kendall, _kendall_json))
register_analysis(Analysis("category_properties", lambda run: run.spec.kendall, category_properties))


def analyse(run: RunResults) -> dict[str, Any]:
    """Everything the registered analyses say about one run, JSON-ready (`probing analyze`)."""
    result: dict[str, Any] = {
        "path": str(run.path),
        "task": run.task,
        "split": run.split,
        "mode": run.mode,
        "layer": run.layer,
        "probe": run.probe,
        "model": run.label,
        "metric": run.metric,
        "control": run.control,
        "shuffled_features": run.shuffled,
        # a probe that answers one class (the reports' mark ‡): its accuracy is the label rate, not the task's
        "single_class": run.probe != NO_PROBE and single_class(run),
    }
    for analysis in ANALYSES.values():
        if analysis.applies(run):
            result[analysis.name] = analysis.compute(run)
    return result


def _finite(value: float) -> float | None:
    """NaN (Kendall on a constant column) as None: JSON has no NaN."""
    return None if value != value else value
