"""Scoring a study's answers as the paper does, written as a run folder the analysis and the report read.

- Exclusions (the paper's Appendix A), counted per rule: an answer marked "factually incorrect", and an
  answer that names several grid cells (the phrase is ambiguous to the annotator). An answer can meet both
  rules; it is then counted under each, and once in the total. Practice items are never scored.
- Accuracy: the share of the kept answers (of every annotator, finished or not) that agree with the label,
  every answer one unit, with the project's 95 % percentile bootstrap interval over answers
  (`probing.report.analysis.estimate`); per category likewise; per annotator.
- Agreement: Fleiss' kappa (statsmodels) of the yes/no answers on the shared items, over the annotators who
  answered every shared item, on the shared items that none of them had excluded (Fleiss' kappa needs the same
  raters for every item). Undefined (None, with the reason) with fewer than 2 such annotators, no such item,
  or a single answer given throughout.

The run folder (`probing analyze` and `probing report` read it unchanged; mode "human", probe "none",
layer 0, labelled "Human" in Table 1):

    RUN/manifest.json              the study's identity, a hash of the answers, mode, task, split
    RUN/metrics.json               `MetricsRecord`: one entry (seed 0) with the split's accuracy and kappa
    RUN/predictions/<split>.jsonl  one line per kept answer: id (the example's), seed 0, annotator (number),
                                   category, label, predicted, correct, cells, and the example's metadata
    RUN/human.json                 exclusions per rule, accuracy with interval, per category and annotator,
                                   the agreement and what it was computed over

Seed 0 for every record: the answers of all annotators form one set of predictions, because annotators
answer different items (with --overlap) and some answers are excluded, whereas the seeds of a run must share
their examples. The annotator is a field of its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from probing.baselines.annotate.store import AnnotationStore
from probing.core.artifacts import (
    PARTIAL_MARK,
    check_output,
    code_version,
    existing_output_matches,
    staged_directory,
    write_json,
)
from probing.core.errors import ProbingError
from probing.core.records import HUMAN, NO_PROBE, MetricsRecord, SeedRun, StageResult
from probing.report.analysis import estimate

HUMAN_RUN_VERSION = 1
HUMAN_FILE = "human.json"
EXCLUSION_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "marked_incorrect": lambda answer: answer["incorrect"],
    "several_cells": lambda answer: len(answer["cells"]) > 1,
}


def fleiss_agreement(
    answers: list[dict[str, Any]], shared_items: list[int], kept: set[tuple[int, int]]
) -> dict[str, Any]:
    """Fleiss' kappa of yes/no answers on the shared items (see the module docstring for which raters and
    items); `kept`: the (annotator, item) pairs that survived the exclusions."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    given: dict[int, dict[int, bool]] = defaultdict(dict)
    for answer in answers:
        given[answer["annotator"]][answer["item"]] = answer["answer"]
    raters = sorted(a for a, items in given.items() if set(shared_items) <= set(items))
    items = [item for item in shared_items if all((rater, item) in kept for rater in raters)]
    result: dict[str, Any] = {"kappa": None, "raters": raters, "items": items, "reason": None}
    if len(raters) < 2:
        result["reason"] = f"{len(raters)} annotator(s) answered every shared item; kappa needs 2"
        return result
    if not items:
        result["reason"] = "no shared item kept by every annotator who answered them all"
        return result
    matrix = np.array([[int(given[rater][item]) for rater in raters] for item in items])
    table, _ = aggregate_raters(matrix, n_cat=2)  # items x (no, yes) counts
    if (table.sum(axis=0) == 0).any():
        result["reason"] = "every answer was the same: agreement by chance is 1, kappa undefined"
        return result
    result["kappa"] = float(fleiss_kappa(table, method="fleiss"))
    return result


def _answers_hash(answers: list[dict[str, Any]]) -> str:
    fields = ("annotator", "item", "answer", "cells", "incorrect")
    payload = json.dumps([[answer[name] for name in fields] for answer in answers], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def human_run_identity(identity: dict[str, Any], description: dict[str, Any], answers, label: str) -> dict[str, Any]:
    return {
        "kind": "human-run",
        "format_version": HUMAN_RUN_VERSION,
        "mode": HUMAN,
        "task": description["task"],
        "split": description["split"],
        "layer": 0,  # no resampler layer is read
        "probe": NO_PROBE,
        "label": label,
        "inputs": {"model": {"family": HUMAN}, "study": identity, "answers": _answers_hash(answers)},
    }


def score(db: Path, out: Path, label: str = "Human") -> StageResult[dict[str, Any]]:
    """Score the study in `db` into the run folder `out` (reused when it holds the same answers)."""
    store = AnnotationStore.open(db)
    identity, description = store.value("identity"), store.value("description")
    answers = store.answers()
    scored = [answer for answer in answers if answer["role"] != "intro"]
    if not scored:
        raise ProbingError(f"--db {db}: no scored answers yet (practice answers are not scored)")
    run_identity = human_run_identity(identity, description, scored, label)
    if existing_output_matches(out, run_identity, "human run"):
        return StageResult(json.loads((Path(out) / HUMAN_FILE).read_text(encoding="utf-8")), Path(out), "reused")

    kept = _apply_exclusions(db, scored)
    correct = [answer["answer"] == bool(answer["label"]) for answer in kept]
    summary, overall, agreement = _human_summary(store, description, scored, kept, correct)
    split = description["split"]
    record = _human_record(description, scored, overall.mean, agreement, label)
    predictions = [
        {
            **answer["metadata"],
            "id": answer["example_id"],
            "item": answer["item"],
            "split": split,
            "seed": 0,
            "annotator": answer["annotator"],
            "category": answer["category"],
            "label": answer["label"],
            "predicted": int(answer["answer"]),
            "correct": right,
            "cells": answer["cells"],
        }
        for answer, right in zip(kept, correct, strict=True)
    ]
    extra = {"task_file": description["task_file"]} if description.get("task_file") else {}
    with staged_directory(out) as staging:
        (staging / "predictions").mkdir()
        with open(staging / "predictions" / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for line in predictions:
                handle.write(json.dumps(line) + "\n")
        write_json(staging / HUMAN_FILE, summary)
        write_json(staging / "metrics.json", record.to_json())
        write_json(staging / "manifest.json", {**run_identity, "code_version": code_version(), **extra})
    return StageResult(summary, Path(out), "built")


def _apply_exclusions(db: Path, scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each scored answer with the exclusion rules it meets (`excluded_by`); the answers no rule excludes."""
    for answer in scored:
        answer["excluded_by"] = [rule for rule, applies in EXCLUSION_RULES.items() if applies(answer)]
    kept = [answer for answer in scored if not answer["excluded_by"]]
    if not kept:
        raise ProbingError(f"--db {db}: every one of the {len(scored)} scored answers is excluded")
    return kept


def _human_summary(
    store: AnnotationStore,
    description: dict[str, Any],
    scored: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    correct: list[bool],
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """`human.json`'s content (exclusions, accuracy overall and per category, agreement, annotators), with the
    overall estimate and the agreement that the metrics record repeats."""
    overall = estimate(np.array([correct], dtype=float))
    by_category: dict[str, list[bool]] = defaultdict(list)
    for answer, right in zip(kept, correct, strict=True):
        by_category[answer["category"]].append(right)
    shared_items = [item["item"] for item in store.items() if item["role"] == "shared"]
    agreement = fleiss_agreement(scored, shared_items, {(a["annotator"], a["item"]) for a in kept})
    annotators = []
    for annotator in store.annotators():
        mine = [a for a in scored if a["annotator"] == annotator["annotator"]]
        mine_kept = [a for a in mine if not a["excluded_by"]]
        annotators.append(
            {
                "annotator": annotator["annotator"],
                "answered": len(mine),
                "kept": len(mine_kept),
                "accuracy": (
                    sum(a["answer"] == bool(a["label"]) for a in mine_kept) / len(mine_kept) if mine_kept else None
                ),
            }
        )
    summary = {
        "task": description["task"],
        "split": description["split"],
        "answers": len(scored),
        "kept": len(kept),
        "excluded": {
            **{rule: sum(rule in a["excluded_by"] for a in scored) for rule in EXCLUSION_RULES},
            "total": len(scored) - len(kept),
        },
        "accuracy": overall.as_dict(),
        "per_category": {
            category: estimate(np.array([values], dtype=float)).as_dict()
            for category, values in sorted(by_category.items())
        },
        "fleiss_kappa": agreement,
        "annotators": annotators,
    }
    return summary, overall, agreement


def _human_record(
    description: dict[str, Any], scored: list[dict[str, Any]], accuracy: float, agreement: dict[str, Any], label: str
) -> MetricsRecord:
    """The run's `metrics.json`: one entry (seed 0) holding the split's accuracy and, when defined, kappa."""
    metrics = {"accuracy": accuracy}
    if agreement["kappa"] is not None:
        metrics["fleiss_kappa"] = agreement["kappa"]
    return MetricsRecord(
        task=description["task"],
        metric="accuracy",
        runs=[
            SeedRun(
                seed=0,
                trial={"annotators": len({a["annotator"] for a in scored}), "answers": len(scored)},
                best_epoch=0,
                epochs_run=0,
                stopped_early=False,
                splits={description["split"]: metrics},
            )
        ],
        train_categories={},
        label=label,
    )


def export(db: Path, out: Path) -> int:
    """Every answer (practice ones too, marked by role) as one JSON object per line, written atomically;
    returns how many."""
    out = Path(out)
    if out.is_file() and Path(db).exists() and os.path.samefile(out, db):  # the export would replace the study
        raise ProbingError(f"--out {out}: is the study's own --db file (give another .jsonl file)")
    check_output(out, file=True, inputs=(db,))
    if out.exists() and not _is_export(out):
        raise ProbingError(f"--out {out}: an existing file that is not an export of answers; not ours to replace")
    store = AnnotationStore.open(db)
    answers = store.answers()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}{PARTIAL_MARK}{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for answer in answers:
            handle.write(json.dumps(answer, sort_keys=True) + "\n")
    os.replace(temporary, out)
    return len(answers)


EXPORT_KEYS = {"annotator", "item", "answer", "seconds", "answered"}


def _is_export(path: Path) -> bool:
    """Whether `path` is an earlier export (empty, or its first line an answer), which a new export may replace."""
    with open(path, "rb") as handle:
        first = handle.readline(1 << 20)
    if not first.strip():
        return path.stat().st_size == 0
    try:
        answer = json.loads(first)
    except ValueError:
        return False
    return isinstance(answer, dict) and EXPORT_KEYS <= answer.keys()


def percent(value: float | None) -> str:
    return "undefined" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
