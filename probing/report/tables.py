"""`probing report RUN... --out DIR`: tables (Markdown + CSV) and figures in the paper's shapes.

Tables register themselves (`register_table`) and the report builds every registered table that the given
runs allow (a table whose runs are absent is left out); a config's `report.tables` names some of them:
- Table 1: accuracy per model x mode (frozen / unfrozen) x task (and split, for tasks evaluated on several),
  linear probe on the last layer given.
- Table 2 and the per-category tables: accuracy per category of each task (Table 2 is VSR's, per
  meta-category; `categories_<task>` the others', e.g. per COCO supercategory), same runs.
- Table 3: probe sizes (linear, SwiGLU 2 / 4 layers, logistic regression), frozen, last layer.
- Table 4: the paper's layout, a row per task and hyper-parameter, a column per model and mode, each cell the
  value the best trial chose; `searches` lists every search with its trials, val and test.
- Table 5: Kendall tau between per-category accuracy and the number of train examples, the mean box area
  and the mean centre distance (tasks with boxes); p > 0.05 marked with a dagger.
- Per layer: frozen linear probes, every layer given.
- Rigour: per model, task and layer, the accuracy beside its control task's accuracy, the selectivity
  (paired bootstrap), the MDL codelength and compression of the task and of its control, and the accuracy
  of the random-weights model of the same family (`init: random`), for runs that have any of them.
Cells read `mean [95% CI]` in percent, with `+- std` over seeds where several seeds were run. With
`--compare-paper` the paper's Table 1 numbers appear in their own rows, labelled "(paper)"; the paper
reports single runs without intervals. CSV files are written by pandas from the numbers behind the cells, and
`results.csv` holds every number the tables show, one row each (`results_frame`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probing.core.artifacts import staged_directory, write_json
from probing.core.errors import ProbingError
from probing.core.locks import one_writer
from probing.core.records import HUMAN, ITM_HEAD, MDL_FILE, NO_PROBE, ZERO_SHOT_PROMPT
from probing.core.registry import Registry
from probing.probes.modules import PROBES
from probing.report.analysis import (
    KENDALL_PROPERTIES,
    MIN_KENDALL_CATEGORIES,
    SIGNIFICANCE,
    SINGLE_CLASS_SHARE,
    Correlation,
    Estimate,
    FamilyRow,
    MdlResults,
    Paired,
    RunResults,
    attach_rigour,
    category_rows,
    chance_level,
    codelength_interval,
    deduplicate,
    family_rows,
    kendall,
    last_layer_runs,
    load_mdl,
    load_run,
    load_run_splits,
    overall,
    paired_comparison,
    per_category,
    random_counterpart,
    rigour,
    roc_auc,
    single_class,
    validation_run,
)
from probing.report.plots import category_figure, families_figure, learning_curve_figure, per_layer_figure
from probing.tasks import TaskSpec, registered_tasks

MODES = ("frozen", "unfrozen", ZERO_SHOT_PROMPT, ITM_HEAD, HUMAN)  # Table 1's rows per model, in this order
PROPERTY_NAMES = {
    "train_examples": "train examples",
    "mean_area": "mean box area",
    "mean_centre_distance": "mean centre distance",
}
# The paper's Table 1 (test, %), for --compare-paper: (model, mode) -> task -> value.
PAPER_TABLE1 = {
    ("BLIP-2", "frozen"): {"refcocog": 30.26, "vsr": 64.97, "rcm": 69.49},
    ("BLIP-2", "unfrozen"): {"refcocog": 71.72, "vsr": 80.50, "rcm": 81.35},
    ("InstructBLIP", "frozen"): {"refcocog": 19.92, "vsr": 55.72, "rcm": 63.08},
    ("InstructBLIP", "unfrozen"): {"refcocog": 69.34, "vsr": 76.99, "rcm": 80.86},
    ("Human", "human"): {"vsr": 95.40, "rcm": 92.29},  # VSR's from its authors
}
# The checkpoints the paper probed (by the source a run's model was read from): its rows are shown only beside
# runs of these, under the paper's model name.
PAPER_CHECKPOINTS = {
    "Salesforce/blip2-itm-vit-g": "BLIP-2",
    "Salesforce/instructblip-vicuna-7b": "InstructBLIP",
}
NOT_SIGNIFICANT = "†"
SINGLE_CLASS_MARK = "‡"
CSV_LABELS = ["model", "mode", "probe", "layer", "task", "split", "category", "property"]


def cell(estimate: Estimate | None, run: RunResults | None = None) -> str:
    """`mean [95% CI] ±std` in percent; marked when `run` is a probe that answers a single class."""
    if estimate is None:
        return "–"
    text = f"{100 * estimate.mean:.1f} [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"
    if estimate.seed_std is not None:
        text += f" ±{100 * estimate.seed_std:.1f}"
    if run is not None and run.probe != NO_PROBE and single_class(run):
        text += SINGLE_CLASS_MARK
    return text


SINGLE_CLASS_NOTE = (
    f"{SINGLE_CLASS_MARK} the probe answers one class for at least {SINGLE_CLASS_SHARE:.0%} of the examples "
    "in every seed: it learned the majority label, not the task"
)


def mark_single_class(table: Table) -> None:
    """The note explaining the mark `cell` gives a single-class probe, on a table whose cells carry it."""
    if any(SINGLE_CLASS_MARK in text for row in table.rows for text in row):
        table.notes.append(SINGLE_CLASS_NOTE)


def single_class_mark(run: RunResults) -> str:
    """The mark of a probe that answers one class (`cell`'s), or "": for outputs that print an accuracy."""
    return SINGLE_CLASS_MARK if run.probe != NO_PROBE and single_class(run) else ""


def single_class_note(folder: Path) -> str | None:
    """The note a command that printed a run's accuracy adds when its probe answers one class, else None."""
    from probing.report.analysis import load_run

    return SINGLE_CLASS_NOTE if single_class_mark(load_run(folder)) else None


@dataclass(frozen=True)
class Shown:
    """A cell that shows numbers, carrying them: `records`, the table CSV's rows of them, and `results`,
    results.csv's (none for a run's own accuracy: results.csv has a row per run and split already). A label (a
    model's name, a mode, a layer index) is a plain str cell, not a `Shown`."""

    text: str
    records: tuple[dict[str, Any], ...] = ()
    results: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.records and not self.results:  # else the cell would show a number that no CSV holds
            raise ProbingError(f"cell {self.text!r} shows numbers without them: give its records or results")

    @classmethod
    def estimate(cls, estimate: Estimate | None, run: RunResults, *, marked: bool = True, **labels) -> Shown | str:
        """`cell`'s text of a run's estimate with its record (the run's task and split, `labels`, the numbers);
        "–" without one. `marked`: the text carries the single-class mark of `run`'s probe."""
        if estimate is None:
            return cell(None)
        return cls(cell(estimate, run if marked else None), (_record(estimate, run, **labels),))


@dataclass(frozen=True)
class Row:
    """A table row, declared once: its cells (labels as str, numbers as `Shown` cells carrying them) and, for
    a row whose numbers make one record across its cells (a search's, a run's rigour, a paired comparison),
    that record and its results.csv rows. The table's Markdown row, CSV records and results all come from it."""

    cells: Sequence[str | Shown]
    records: Sequence[dict[str, Any]] = ()
    results: Sequence[dict[str, Any]] = ()

    def __post_init__(self) -> None:
        for name in ("cells", "records", "results"):  # frozen: a row added to a table stays what it was
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def texts(self) -> list[str]:
        return [c.text if isinstance(c, Shown) else c for c in self.cells]

    @property
    def every_record(self) -> list[dict[str, Any]]:
        """The table CSV's rows of this row: its cells' records in cell order, then the row's own."""
        return [r for c in self.cells if isinstance(c, Shown) for r in c.records] + list(self.records)

    @property
    def every_result(self) -> list[dict[str, Any]]:
        """results.csv's rows of this row: its cells' results in cell order, then the row's own."""
        return [r for c in self.cells if isinstance(c, Shown) for r in c.results] + list(self.results)


class _AddingList(list):
    """What `Table.rows`, `Table.records` and `Table.results` read: the derived list, a copy, except that
    `append`, `extend` and `+=` reach the table, so a plug-in table written before `Table.add` (appending a row's
    texts to `rows` and its numbers to `records`) still works."""

    def __init__(self, items: Iterable, add: Callable[[Any], None]):
        super().__init__(items)
        self._add = add

    def append(self, item: Any) -> None:
        super().append(item)
        self._add(item)

    def extend(self, items: Iterable) -> None:
        for item in items:
            self.append(item)

    def __iadd__(self, items: Iterable) -> _AddingList:
        self.extend(items)
        return self


@dataclass
class Table:
    """A report table: `add(Row(...))` adds a row; `rows` (the cells' texts), `records` (the numbers behind
    them, the table's CSV) and `results` (its rows of results.csv beyond each run's accuracies) are read from
    the rows added, so a cell and its numbers cannot part."""

    name: str
    title: str
    headers: list[str]
    notes: list[str] = field(default_factory=list)
    body: list[Row] = field(default_factory=list, init=False, repr=False)
    # numbers a plug-in appended to `records` or `results` directly (the way before `Row`), after the rows'
    _loose_records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _loose_results: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def add(self, row: Row) -> None:
        if not isinstance(row, Row):
            raise ProbingError(f"table {self.name}: Table.add takes a Row, not {type(row).__name__}")
        self.body.append(row)

    @property
    def rows(self) -> list[list[str]]:
        return _AddingList((row.texts for row in self.body), lambda texts: self.add(Row(list(texts))))

    @rows.setter
    def rows(self, value: list[list[str]]) -> None:
        self._refuse_unless_added("rows", value)

    @property
    def records(self) -> list[dict[str, Any]]:
        every = [record for row in self.body for record in row.every_record] + self._loose_records
        return _AddingList(every, self._loose_records.append)

    @records.setter
    def records(self, value: list[dict[str, Any]]) -> None:
        self._refuse_unless_added("records", value)

    @property
    def results(self) -> list[dict[str, Any]]:
        every = [result for row in self.body for result in row.every_result] + self._loose_results
        return _AddingList(every, self._loose_results.append)

    @results.setter
    def results(self, value: list[dict[str, Any]]) -> None:
        self._refuse_unless_added("results", value)

    def _refuse_unless_added(self, name: str, value: Any) -> None:
        """`table.rows += [...]` sets what `+=` returned, the list that already added them: nothing to do; any
        other assignment would replace what the rows declare."""
        if not isinstance(value, _AddingList):
            raise ProbingError(
                f"table {self.name}: Table.{name} is read from its rows; add one with Table.add(Row(...))"
            )

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join(" --- " for _ in self.headers) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"_{note}_" for note in self.notes]
        return "\n".join(lines) + "\n"

    def frame(self):
        """The numbers behind the cells as a DataFrame (labels first; objects kept as they are, so an integer
        column with gaps stays integers)."""
        import pandas as pd

        records = self.records  # derived from the rows: gathered once
        keys = {key for record in records for key in record}
        columns = [k for k in CSV_LABELS if k in keys] + sorted(keys - set(CSV_LABELS))
        return pd.DataFrame(records, columns=columns, dtype=object)

    def latex(self) -> str:
        """The table as LaTeX (booktabs, caption once, `\\label{tab:<name>}`, numbers right-aligned, a task's
        splits and a model's modes under one grouped header), notes as a comment block."""
        from probing.report.latex import header_groups, latex_table

        groups = header_groups(self.headers, prefixes={spec.title for spec in registered_tasks()}, suffixes=MODES)
        return latex_table(self.name, self.title, self.headers, self.rows, self.notes, groups)

    def write(self, folder: Path) -> list[Path]:
        markdown = folder / f"{self.name}.md"
        markdown.write_text(self.markdown(), encoding="utf-8")
        table_csv = folder / f"{self.name}.csv"
        self.frame().to_csv(table_csv, index=False)
        latex = folder / f"{self.name}.tex"
        latex.write_text(self.latex(), encoding="utf-8")
        return [markdown, table_csv, latex]


def _record(estimate: Estimate, run: RunResults | None = None, **labels) -> dict[str, Any]:
    where = {"task": run.task, "split": run.split} if run is not None else {}
    return {**labels, **where, **estimate.as_dict()}


def run_labels(run: RunResults) -> dict[str, Any]:
    """The columns of `results.csv` that say which run, and which of its splits, a row is about."""
    return {
        "model": run.label,
        "model_id": run.model_id,
        "init": run.init,
        "task": run.task,
        "mode": run.mode,
        "layer": None if run.probe == NO_PROBE else run.layer,  # a model's own answer reads no layer's features
        "probe": run.probe,
        "control": run.control,
        "single_class": run.probe != NO_PROBE and single_class(run),  # Table 1's ‡: the probe answers one class
        "split": run.split,
        "run": str(run.path),
    }


def _result(run: RunResults, metric: str, value: Any = None, estimate: Estimate | None = None, **columns) -> dict:
    """A row of `results.csv` for a number a table shows about `run`: `value`, or `estimate` with its interval."""
    row = {**run_labels(run), "metric": metric, "value": value, **columns}
    if estimate is not None:
        numbers = estimate.as_dict()
        row |= {"value": numbers["mean"], "seeds_std": numbers["seed_std"], "n": numbers["examples"]}
        row |= {key: numbers[key] for key in ("ci_low", "ci_high", "seeds")}
    return row


@dataclass(frozen=True)
class ReportOptions:
    compare_paper: bool = False


@dataclass(frozen=True)
class TableBuilder:
    """A registered table: `build(runs, options)` returns its tables (none when the runs do not allow it);
    `names(specs)` the names it can produce for runs of these tasks."""

    name: str
    build: Callable[[list[RunResults], ReportOptions], list[Table]]
    names: Callable[[Iterable[TaskSpec]], list[str]]
    place: float = 100.0  # where its tables stand in a report (lower first); plug-ins default to the end


# Installed packages may add tables through the entry-point group `probing.tables` (a `TableBuilder`).
TABLES: Registry[TableBuilder] = Registry("table", "probing.tables")


def register_table(
    name: str,
    names: Callable[[Iterable[TaskSpec]], list[str]] | None = None,
    *,
    place: float = 100.0,
    replace: bool = False,
):
    """Decorator: register a table builder under `name` (it produces a table of that name unless `names` says
    which tables it makes), its tables standing at `place` in a report (the paper's tables first, then the
    rigour and family tables, then per layer and per category; a plug-in's table after them unless it says);
    another builder under a registered name is refused unless `replace`."""

    def register(build: Callable[[list[RunResults], ReportOptions], Table | list[Table] | None]):
        def tables(runs: list[RunResults], options: ReportOptions) -> list[Table]:
            made = build(runs, options)
            return [] if made is None else ([made] if isinstance(made, Table) else made)

        builder = TableBuilder(name, tables, names or (lambda specs: [name]), place)
        TABLES.register(name, builder, replace=replace)
        return build

    return register


def table_names(specs: Iterable[TaskSpec] | None = None) -> list[str]:
    """Every table name the registered builders can produce for these tasks (default: every registered task)."""
    specs = list(registered_tasks() if specs is None else specs)
    names: list[str] = []
    for builder in builders_in_place():
        names += [name for name in builder.names(specs) if name not in names]
    return names


def builders_in_place() -> list[TableBuilder]:
    """The registered table builders in their declared places (registration order among equal places)."""
    return sorted(TABLES.values(), key=lambda builder: builder.place)


def _columns(runs: Iterable[RunResults]) -> list[tuple[str, str]]:
    """(task, split) pairs in registry order, then each task's split order."""
    order = {spec.name: index for index, spec in enumerate(registered_tasks())}
    present = {(run.task, run.split): run for run in runs}
    return sorted(
        present, key=lambda key: (order.get(key[0], len(order)), key[0], present[key].spec.eval_splits.index(key[1]))
    )


def _table1_runs(runs: Sequence[RunResults]) -> dict[tuple[str, str, str], RunResults]:
    """Table 1's runs: linear probes on the last layer, and the zero-shot baselines (no probe) beside them."""
    return last_layer_runs(list(runs)) | last_layer_runs(list(runs), NO_PROBE)


def _modes(chosen: dict[tuple[str, str, str], RunResults]) -> list[str]:
    """The row order of a model's modes: `MODES`, then any other (a plug-in's zero-shot method) by name."""
    return [*MODES, *sorted({mode for _, mode, _ in chosen} - set(MODES))]


def _people(chosen: dict[tuple[str, str, str], RunResults]) -> set[str]:
    """The labels whose runs are all people's answers: their rows come after every model's."""
    return {label for label, _, _ in chosen if all(run.mode == HUMAN for key, run in chosen.items() if key[0] == label)}


def _column_title(run: RunResults) -> str:
    return f"{run.column} ({run.spec.head.metric_label})"


def paper_model(runs: Iterable[RunResults]) -> str | None:
    """The paper's name of the model these runs read, when every one read one checkpoint the paper probed with
    its own weights (`PAPER_CHECKPOINTS`), else None."""
    names = {PAPER_CHECKPOINTS.get(run.model_id or "") if run.init == "pretrained" else None for run in runs}
    return names.pop() if len(names) == 1 else None


def _split_title(run: RunResults, split: str) -> str:
    """A Table 1 column: the task's title, the split, and the metric."""
    spec = run.spec
    name = f"{spec.title} {split}" if split == "val" or len(spec.eval_splits) == 1 else run.column
    return f"{name} ({spec.head.metric_label})"


@dataclass
class _Table1Layout:
    """What Table 1 shows: the chosen runs per (model, mode, column), their val runs, and the cells (column,
    "val" | "test") in order, val first where any run of the column has val predictions (a task evaluated on
    several splits, RefCOCO's testA and testB, has one column per split but one val)."""

    chosen: dict[tuple[str, str, str], RunResults]
    validation: dict[tuple[str, str, str], RunResults | None]
    by_column: dict[str, RunResults]
    order: list[str]
    cells: list[tuple[str, str]]

    @classmethod
    def of(cls, chosen: dict[tuple[str, str, str], RunResults]) -> _Table1Layout:
        by_column = {run.column: run for run in sorted(chosen.values(), key=lambda r: (r.mode == HUMAN, str(r.path)))}
        order = list(dict.fromkeys(run.column for run in _sorted_columns(chosen)))
        validation = {key: validation_run(run) for key, run in chosen.items()}
        cells: list[tuple[str, str]] = []
        tasks_with_val: set[str] = set()
        for c in order:
            task = by_column[c].task
            if task not in tasks_with_val and any(val is not None and key[2] == c for key, val in validation.items()):
                cells.append((c, "val"))
                tasks_with_val.add(task)
            cells.append((c, "test"))
        return cls(chosen, validation, by_column, order, cells)

    @property
    def has_val(self) -> bool:
        return any(which == "val" for _, which in self.cells)

    def result(self, key: tuple[str, str, str], which: str) -> RunResults | None:
        return self.chosen.get(key) if which == "test" else self.validation.get(key)


@register_table("table1", place=10)
def table1(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """The paper's Table 1: per model and mode, val and test of each task (val where the runs wrote val
    predictions); a chance row (the majority-class rate of each split's labels) and the Human row last."""
    chosen = _table1_runs(runs)
    if not chosen:
        return None
    layout = _Table1Layout.of(chosen)
    table = Table(
        "table1",
        "Table 1: "
        + ("validation and test" if layout.has_val else "test")
        + " accuracy, linear probe on the last layer (%)",
        ["model", "mode", *[_split_title(layout.by_column[c], which) for c, which in layout.cells]],
    )
    people = _people(chosen)  # the Human row comes last, after the chance row
    models = sorted({key[0] for key in chosen}, key=lambda model: (model in people, model))
    paper_shown, paper_missing = [], []
    for model in models:
        if model in people and not any(row[0] == "Chance" for row in table.rows):
            _chance_row(table, layout)
        paper_name = paper_model([run for key, run in chosen.items() if key[0] == model])
        for mode in _modes(chosen):
            if not any((model, mode, c) in chosen for c in layout.order):
                continue
            found = [layout.result((model, mode, c), which) for c, which in layout.cells]
            cells = [
                Shown.estimate(overall(run), run, model=model, mode=mode, layer=run.layer)
                if run is not None
                else cell(None)
                for run in found
            ]
            table.add(Row([model, mode, *cells]))
            if options.compare_paper:
                shown = _paper_row(table, layout, paper_name, mode)
                if shown:
                    paper_shown.append(model)
                elif shown is None and mode in ("frozen", "unfrozen"):
                    paper_missing.append(model)
    if not any(row[0] == "Chance" for row in table.rows):
        _chance_row(table, layout)
    _table1_notes(table, layout, options, paper_shown, paper_missing)
    mark_single_class(table)
    return table


def _chance_row(table: Table, layout: _Table1Layout) -> None:
    """The chance row: the majority-class rate of each cell's split (none for box regression)."""
    levels = {}
    for c, which in layout.cells:
        model_runs = [r for r in layout.chosen.values() if r.column == c and r.mode != HUMAN]
        key = next((k for k, r in layout.chosen.items() if model_runs and r is model_runs[0]), None)
        found = layout.result(key, which) if key is not None else None
        levels[(c, which)] = (chance_level(found), found) if found is not None else (None, None)
    if not any(level is not None for level, _ in levels.values()):
        return
    table.add(Row(["Chance", "majority class", *[_chance_cell(level, found) for level, found in levels.values()]]))


def _chance_cell(level: float | None, found: RunResults | None) -> Shown | str:
    """A chance cell: the majority-class rate of `found`'s split, in the table's CSV and in results.csv (no
    run's row holds it)."""
    if level is None:
        return "–"
    where = {"model": "Chance", "mode": "majority class", "task": found.task, "split": found.split}
    return Shown(
        f"{100 * level:.1f}",
        (where | {"mean": level, "examples": len(found.ids)},),
        (where | {"metric": found.metric, "value": level, "n": len(found.ids)},),
    )


def _paper_row(table: Table, layout: _Table1Layout, paper_name: str | None, mode: str) -> bool | None:
    """The paper's numbers beside a model's row (`--compare-paper`): True when shown, None when the paper has
    no row for this model and mode (a model it did not probe), False for modes it has no number of."""
    paper = PAPER_TABLE1.get(("Human", HUMAN) if mode == HUMAN else (paper_name, mode))
    if paper is None:
        return None if mode != HUMAN else False
    name = "Human" if mode == HUMAN else paper_name
    cells: list[Shown | str] = []
    for c, which in layout.cells:
        run = layout.by_column[c]
        if which != "test" or run.task not in paper:
            cells.append("–")
            continue
        where = {"model": f"{name} (paper)", "mode": mode, "task": run.task, "split": "test"}
        value = paper[run.task] / 100  # a fraction, as every other number of the CSVs
        cells.append(
            Shown(
                f"{paper[run.task]:.2f}", (where | {"mean": value},), (where | {"metric": run.metric, "value": value},)
            )
        )
    table.add(Row([f"{name} (paper)", mode, *cells]))
    return True


def _table1_notes(
    table: Table, layout: _Table1Layout, options: ReportOptions, paper_shown: list[str], paper_missing: list[str]
) -> None:
    chosen = layout.chosen
    layers = sorted({run.layer for run in chosen.values() if run.probe != NO_PROBE})
    table.notes.append(
        "mean [95% bootstrap CI over the split's examples] ±std over seeds"
        + (f"; layers used: {layers}" if layers else "")
        + ("; val: the best trial's final seeds on the validation split" if layout.has_val else "")
    )
    chance_notes = ["chance: the majority-class rate of the split's labels (50 % when balanced)"]
    no_chance = sorted({run.spec.title for run in chosen.values() if chance_level(run) is None and run.mode != HUMAN})
    if no_chance:
        chance_notes.append(
            f"no chance level for {', '.join(no_chance)}: a box regression has no single chance rate (a guessed "
            "box's IoU depends on the distribution of boxes)"
        )
    table.notes.append("; ".join(chance_notes))
    if any(run.probe == NO_PROBE and run.mode != HUMAN for run in chosen.values()):
        table.notes.append(f"{ZERO_SHOT_PROMPT}, {ITM_HEAD}: the model's own answer, no probe (`probing zeroshot`)")
    if any(run.mode == HUMAN for run in chosen.values()):
        table.notes.append(
            "human rows: annotators' answers (probing annotate score) after the paper's exclusions, each kept "
            "answer one example of the interval"
        )
    if options.compare_paper and paper_shown:
        table.notes.append("rows marked (paper): numbers reported by Pantazopoulos et al. (2024), test, single runs")
    if options.compare_paper and paper_missing:
        table.notes.append(
            f"no paper rows beside {', '.join(sorted(set(paper_missing)))}: the paper's numbers are shown only beside "
            f"runs of the checkpoints it probed ({', '.join(PAPER_CHECKPOINTS)}) with their own weights"
        )


def _sorted_columns(chosen: dict[tuple[str, str, str], RunResults]) -> list[RunResults]:
    """One run per (task, split) column, in `_columns`' order."""
    present = {(run.task, run.split): run for run in chosen.values()}
    return [present[key] for key in _columns(chosen.values())]


def _category_table_name(run: RunResults) -> str:
    name = run.spec.per_category_table
    return name if len(run.spec.eval_splits) == 1 else f"{name}_{run.split}"


def _category_names(specs: Iterable[TaskSpec]) -> list[str]:
    names = []
    for spec in specs:
        names += (
            [spec.per_category_table]
            if len(spec.eval_splits) == 1
            else [f"{spec.per_category_table}_{split}" for split in spec.eval_splits]
        )
    return names


@register_table("categories", names=_category_names, place=70)
def category_tables(runs: Sequence[RunResults], options: ReportOptions) -> list[Table]:
    """Accuracy per category of each task and split (Table 2 is VSR's), last layer, linear probe."""
    tables = []
    chosen_all = _table1_runs(runs)
    for task, split in _columns(chosen_all.values()):
        chosen = {key: run for key, run in chosen_all.items() if (run.task, run.split) == (task, split)}
        first = next(iter(chosen.values()))
        spec = first.spec
        present = sorted({c for run in chosen.values() for c in category_rows(run)})
        columns = list(spec.category_order) if spec.category_order else present  # a fixed list: each shown
        name = _category_table_name(first)
        title = (
            f"Table 2: {first.column} accuracy per {spec.category} (%)"
            if name == "table2"
            else f"{first.column} {spec.head.metric_title} per {spec.category} (%)"
        )
        table = Table(name, title, ["model", "mode", *columns])
        modes = _modes(chosen)
        people = _people(chosen)
        counts = {c: max(run.categories.count(c) for run in chosen.values()) for c in columns}
        table.add(Row(["n", f"{first.split} examples", *[str(counts[c]) for c in columns]]))
        for (model, mode, _), run in sorted(
            chosen.items(), key=lambda item: (item[0][0] in people, item[0][0], modes.index(item[0][1]))
        ):
            table.add(_category_row(run, model, mode, columns))
        table.notes.append(
            "mean [95% bootstrap CI] ±std over seeds, %; n: the split's examples per category (human rows: those "
            "annotated, possibly fewer)"
            + ("; n = 0: no example of the category in the split" if set(columns) - set(present) else "")
        )
        tables.append(table)
    return tables


def _category_row(run: RunResults, model: str, mode: str, columns: list[str]) -> Row:
    """A model's row of a per-category table: a cell per column (unmarked: Table 1 marks a single-class
    probe); a category of the run that no column shows (a fixed order without it) keeps its record."""
    estimates = per_category(run)

    def shown(category: str) -> Shown | str:
        return Shown.estimate(estimates.get(category), run, marked=False, model=model, mode=mode, category=category)

    unshown = [_record(e, run, model=model, mode=mode, category=c) for c, e in estimates.items() if c not in columns]
    return Row([model, mode, *map(shown, columns)], records=unshown)


@register_table("table3", place=30)
def table3(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    frozen = [r for r in runs if r.mode == "frozen"]
    by_probe = {probe: last_layer_runs(frozen, probe) for probe in PROBES}  # registration order
    if sum(bool(v) for v in by_probe.values()) < 2:
        return None  # one probe size says nothing about probe size
    found_runs = [run for chosen in by_probe.values() for run in chosen.values()]
    order = _columns(found_runs)
    titles = {(run.task, run.split): run.column for run in found_runs}
    table = Table(
        "table3", "Table 3: probe size, frozen, last layer (%)", ["model", "probe", *[titles[c] for c in order]]
    )
    models = sorted({key[0] for runs_ in by_probe.values() for key in runs_})
    for model in models:
        for probe in PROBES:
            found = {c: by_probe[probe].get((model, "frozen", titles[c])) for c in order}
            if not any(found.values()):
                continue
            cells = [
                Shown.estimate(overall(run), run, model=model, probe=probe) if run else "–" for run in found.values()
            ]
            table.add(Row([model, PROBES[probe].title, *cells]))
    mark_single_class(table)
    return table


HYPER_PARAMETERS = {"lr": "learning rate", "epochs": "epochs", "giou_scale": "GIoU scale", "l1_scale": "L1 scale"}


def _parameter_cell(name: str, value: Any) -> str:
    return f"{value:.2e}" if name in ("lr", "logreg_c") else f"{value:g}"


def _parameter_shown(found: RunResults | None, model: str, mode: str, name: str) -> Shown | str:
    """Table 4's cell: the value of hyper-parameter `name` that `found`'s search chose, "–" where none."""
    value = found.search["best"]["params"].get(name) if found is not None else None
    if value is None:
        return "–"
    record = {"model": model, "mode": mode, "task": found.task, "parameter": name, "value": value}
    return Shown(_parameter_cell(name, value), (record,), (_result(found, f"param_{name}", value),))


@register_table("table4", place=40)
def table4(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """The paper's Table 4 layout: a row per task and hyper-parameter, a column per model and mode, each cell the
    value the search's best trial chose (Table 1's runs: linear probe, last layer)."""
    searched = {key: run for key, run in _table1_runs(runs).items() if run.search is not None}
    if not searched:
        return None
    models = sorted({key[0] for key in searched})
    pairs = [(m, mode) for m in models for mode in _modes(searched) if any(k[:2] == (m, mode) for k in searched)]
    table = Table(
        "table4",
        "Table 4: hyper-parameters of the best trial per task, model and mode (linear probe, last layer)",
        ["task", "hyper-parameter", *[f"{model} {mode}" for model, mode in pairs]],
    )
    for run in _sorted_columns(searched):
        column = run.column
        params = {
            name for key, found in searched.items() if key[2] == column for name in found.search["best"]["params"]
        }
        names = [name for name in HYPER_PARAMETERS if name in params] + sorted(params - set(HYPER_PARAMETERS))
        for name in names:
            cells = [_parameter_shown(searched.get((model, mode, column)), model, mode, name) for model, mode in pairs]
            table.add(Row([column, HYPER_PARAMETERS.get(name, name), *cells]))
    table.notes.append(
        "the best trial of each search by its val metric (`searches` lists every search with its val and test)"
    )
    return table


@register_table("searches", place=54)
def searches_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """The best hyper-parameters each search found, with its val and test metrics, one row per search."""
    searched = [run for run in runs if run.search is not None]
    if not searched:
        return None
    table = Table(
        "searches",
        "Searches: best trial of each search (hyper-parameters, val and test)",
        [
            "model",
            "mode",
            "task",
            "layer",
            "probe",
            "lr",
            "epochs",
            "GIoU scale",
            "L1 scale",
            "trials",
            "pruned",
            "val (%)",
            "test (%)",
        ],
    )
    order = {column: index for index, column in enumerate(_columns(searched))}
    for run in sorted(
        searched, key=lambda r: (r.label, MODES.index(r.mode), order[(r.task, r.split)], r.layer, r.probe)
    ):
        table.add(_search_row(run))
    table.notes.append(
        f"trials: completed; pruned: stopped early by the search's pruner (their epochs were not trained); val: the "
        f"best trial's val {run.search['metric']} in the search; test: the best trial retrained with its final "
        "seeds, mean [95% CI] ±std"
    )
    mark_single_class(table)
    return table


def _search_row(run: RunResults) -> Row:
    """A search's row: its best trial's hyper-parameters, trials, val and test, one record across the cells
    (the test accuracy's results.csv row is the run's own)."""
    best = run.search["best"]
    params = best["params"]
    scales = [f"{params[name]:g}" if name in params else "–" for name in ("giou_scale", "l1_scale")]
    lr = f"{params['lr']:.2e}" if "lr" in params else f"C={params['logreg_c']:.2e}"
    pruned = sum(trial.get("state") == "PRUNED" for trial in run.search.get("trials", []))
    trials = run.search["trials_complete"]
    cells = [run.label, run.mode, run.column, str(run.layer), run.probe, lr, str(params.get("epochs", "–")), *scales]
    cells += [str(trials), str(pruned), f"{100 * best['val_search']:.1f}", cell(overall(run), run)]
    record = {
        "model": run.label,
        "mode": run.mode,
        "task": run.task,
        "split": run.split,
        "layer": run.layer,
        "probe": run.probe,
        **{f"param_{k}": v for k, v in params.items()},
        "trials": trials,
        "trials_pruned": pruned,
        "val": best["val_search"],
        **{f"test_{k}": v for k, v in overall(run).as_dict().items()},
    }
    results = [_result(run, f"param_{name}", value) for name, value in params.items()]
    results += [_result(run, "trials", trials), _result(run, "trials_pruned", pruned)]
    results.append(_result(run, f"search_val_{run.search['metric']}", best["val_search"], split="val"))
    return Row(cells, records=[record], results=results)


@register_table("table5", place=50)
def table5(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """The paper's Table 5 in its orientation: a row per task and data property, a column per model and mode,
    each cell Kendall's tau (p) between per-category accuracy and the property, p > 0.05 marked."""
    # against train counts and box properties: what a probe learned, not what people answer
    kendall_runs = {
        key: run for key, run in last_layer_runs(runs).items() if run.spec.kendall and run.probe != NO_PROBE
    }
    enough = {key: run for key, run in kendall_runs.items() if len(category_rows(run)) >= MIN_KENDALL_CATEGORIES}
    chosen = {key: run for key, run in enough.items() if not single_class(run)}
    one_class = sorted(f"{key[0]} {key[1]} ({run.column})" for key, run in enough.items() if single_class(run))
    if not chosen and not one_class:
        return None
    pairs = sorted({key[:2] for key in enough}, key=lambda pair: (pair[0], _modes(enough).index(pair[1])))
    table = Table(
        "table5",
        "Table 5: Kendall tau between per-category accuracy and data properties",
        ["task", "property", *[f"{model} {mode}" for model, mode in pairs]],
    )
    correlations = {key: kendall(run) for key, run in chosen.items()}
    for column in dict.fromkeys(run.column for run in _sorted_columns(enough)):
        for name in KENDALL_PROPERTIES:
            cells = []
            for model, mode in pairs:
                key = (model, mode, column)
                if key in correlations:
                    cells.append(_kendall_shown(correlations[key][name], chosen[key], model, mode, name))
                else:
                    cells.append("single class" if key in enough else "–")
            table.add(Row([column, PROPERTY_NAMES[name], *cells]))
    table.notes.append(f"{NOT_SIGNIFICANT} p > 0.05 (not significant); 'undefined': a constant column (no ranking)")
    if one_class:
        table.notes.append(
            "no tau for " + ", ".join(one_class) + ": the probe predicts a single class (one answer for at least "
            f"{SINGLE_CLASS_SHARE:.0%} of the examples in every seed), so its per-category accuracy is each "
            "category's label rate and says nothing about what it learned"
        )
    if len(enough) < len(kendall_runs):
        table.notes.append(
            f"runs with fewer than {MIN_KENDALL_CATEGORIES} categories have no ranking to correlate and are left out"
        )
    return table


def _kendall_shown(c: Correlation, run: RunResults, model: str, mode: str, name: str) -> Shown:
    """Table 5's cell: tau (p) against property `name`, marked when not significant; "undefined" (no number)
    for a constant column, whose record and results row say so with empty values."""
    tau = c.tau if c.tau == c.tau else None  # NaN: no ranking
    p_value = c.p_value if c.p_value == c.p_value else None
    text = (
        f"{c.tau:+.2f} ({c.p_value:.3f}){'' if c.significant else NOT_SIGNIFICANT}" if tau is not None else "undefined"
    )
    record = {"model": model, "mode": mode, "task": run.task, "split": run.split, "property": name}
    record |= {"tau": tau, "p_value": p_value, "significant": c.significant, "categories": c.categories}
    result = _result(run, "kendall_tau", tau, against=name, p_value=p_value, n=c.categories)
    return Shown(text, (record,), (result,))


@register_table("paired", place=52)
def paired_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """Paired comparisons on the same test examples (Table 1's runs): each model's modes against each other
    (frozen vs unfrozen ...) and, per mode, each pair of models (BLIP-2 vs InstructBLIP ...): the difference of
    accuracies with a paired bootstrap interval, and McNemar's exact test."""
    chosen = {key: run for key, run in _table1_runs(runs).items() if run.probe != NO_PROBE or run.mode != HUMAN}
    pairs: list[tuple[RunResults, RunResults]] = []
    for column in dict.fromkeys(run.column for run in _sorted_columns(chosen)):
        here = {key[:2]: run for key, run in chosen.items() if key[2] == column}
        modes, models = (
            _modes({key: run for key, run in chosen.items() if key[2] == column}),
            sorted({model for model, _ in here}),
        )
        for model in models:
            mine = [mode for mode in modes if (model, mode) in here]
            pairs += [(here[(model, b)], here[(model, a)]) for i, a in enumerate(mine) for b in mine[i + 1 :]]
        for mode in modes:
            having = [model for model in models if (model, mode) in here]
            pairs += [(here[(a, mode)], here[(b, mode)]) for i, a in enumerate(having) for b in having[i + 1 :]]
    if not pairs:
        return None
    table = Table(
        "paired",
        "Paired comparisons on the same test examples: accuracy difference (points) and McNemar's exact test",
        ["task", "first", "second", "difference (points)", "first only", "second only", "McNemar p", "n"],
    )
    skipped = []
    for first, second in pairs:
        compared = paired_comparison(first, second)
        names = [f"{run.label} {run.mode}" for run in (first, second)]
        if compared is None:
            skipped.append(f"{names[0]} / {names[1]} ({first.column})")
            continue
        table.add(_paired_row(first, second, compared, names))
    if not table.body:
        return None
    table.notes.append(
        "difference: first - second, seed-averaged, 95% paired bootstrap CI over the shared examples; McNemar's "
        f"exact test (statsmodels) on each run's first seed; {NOT_SIGNIFICANT} p > 0.05"
    )
    if skipped:
        table.notes.append("not compared (evaluated on different examples): " + ", ".join(skipped))
    return table


def _paired_row(first: RunResults, second: RunResults, compared: Paired, names: list[str]) -> Row:
    """A paired comparison's row: the difference, the examples only one run got right, McNemar's p and n, one
    record across the cells and their results.csv rows (about `first`, `against` naming `second`)."""
    mark = "" if compared.p_value <= SIGNIFICANCE else NOT_SIGNIFICANT
    difference = compared.difference
    cells = [first.column, *names, _points(difference), str(compared.first_only), str(compared.second_only)]
    cells += [f"{compared.p_value:.3g}{mark}", str(difference.examples)]
    record = {
        "task": first.task,
        "split": first.split,
        "model": first.label,
        "mode": first.mode,
        "other_model": second.label,
        "other_mode": second.mode,
        **{f"difference_{k}": v for k, v in difference.as_dict().items()},
        "first_only": compared.first_only,
        "second_only": compared.second_only,
        "mcnemar_p": compared.p_value,
        "run": str(first.path),
        "other_run": str(second.path),
    }
    against = {"against": names[1], "against_run": str(second.path)}
    results = [
        _result(first, "accuracy_difference", estimate=difference, p_value=compared.p_value, **against),
        _result(first, "right_only_this", compared.first_only, **against),
        _result(first, "right_only_against", compared.second_only, **against),
    ]
    return Row(cells, records=[record], results=results)


@register_table("roc_auc", place=20)
def roc_auc_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """ROC-AUC of the binary tasks beside Table 1's accuracies (same runs): how well the probe ranks true above
    false captions, whatever its threshold."""
    chosen = {
        key: run
        for key, run in _table1_runs(runs).items()
        if run.spec.head.kind == "binary" and "probability" in run.metadata[0]  # human answers have none
    }
    if not chosen:
        return None
    titles = {(run.task, run.split): run.column for run in chosen.values()}
    order = [titles[key] for key in _columns(chosen.values())]
    table = Table("roc_auc", "ROC-AUC of the binary tasks, linear probe on the last layer", ["model", "mode", *order])
    for model in sorted({key[0] for key in chosen}):
        for mode in _modes(chosen):
            found = {c: chosen.get((model, mode, c)) for c in order}
            if not any(found.values()):
                continue
            table.add(Row([model, mode, *[_auc_shown(run, model, mode) for run in found.values()]]))
    table.notes.append("scikit-learn's ROC-AUC of the predicted probabilities, mean ±std over seeds")
    return table


def _auc_shown(run: RunResults | None, model: str, mode: str) -> Shown | str:
    """A ROC-AUC cell: the run's mean ±std over seeds, "–" without a run (or a value)."""
    value = roc_auc(run) if run else None
    if not value:
        return _auc_cell(None)
    record = {"model": model, "mode": mode, "task": run.task, "split": run.split, "layer": run.layer}
    record |= {"roc_auc": value["mean"], "seed_std": value["seed_std"], "seeds": value["seeds"]}
    result = _result(run, "roc_auc", value["mean"], seeds_std=value["seed_std"], seeds=value["seeds"])
    return Shown(_auc_cell(value), (record,), (result,))


def _auc_cell(value: dict[str, Any] | None) -> str:
    if value is None:
        return "–"
    return f"{value['mean']:.3f}" + (f" ±{value['seed_std']:.3f}" if value["seed_std"] is not None else "")


@register_table("per_layer", place=60)
def per_layer_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    frozen = [r for r in runs if r.mode == "frozen" and r.probe == "linear"]
    layers_seen = defaultdict(set)
    for run in frozen:
        layers_seen[(run.label, run.task, run.split)].add(run.layer)
    if not any(len(layers) > 1 for layers in layers_seen.values()):
        return None
    order = _columns(frozen)
    titles = {(run.task, run.split): run.column for run in frozen}
    table = Table(
        "per_layer", "Per layer: frozen linear probes, test (%)", ["model", "layer", *[titles[c] for c in order]]
    )
    index = {(r.label, r.layer, r.task, r.split): r for r in frozen}
    for model in sorted({r.label for r in frozen}):
        for layer in sorted({r.layer for r in frozen if r.label == model}):
            found = {c: index.get((model, layer, *c)) for c in order}
            cells = [
                Shown.estimate(overall(run), run, model=model, layer=layer) if run else "–" for run in found.values()
            ]
            table.add(Row([model, str(layer), *cells]))
    mark_single_class(table)
    return table


def _points(estimate: Estimate | None) -> str:
    """A difference of accuracies in points, signed: `+12.3 [+8.0, +16.5]`."""
    if estimate is None:
        return "–"
    return f"{100 * estimate.mean:+.1f} [{100 * estimate.low:+.1f}, {100 * estimate.high:+.1f}]"


def _code_cells(code: MdlResults | None) -> tuple[list[str], dict[str, Any]]:
    """The codelength (kbits) and compression cells of an online code, each with its bootstrap interval."""
    if code is None:
        return ["–", "–"], {}
    record = code.record
    low, high = codelength_interval(record)
    kbits = [record.online_bits / 1000, low / 1000, high / 1000]
    compression = [record.compression, record.uniform_bits / high, record.uniform_bits / low]
    numbers = {
        "codelength_kbits": kbits[0],
        "codelength_ci_low": kbits[1],
        "codelength_ci_high": kbits[2],
        "uniform_kbits": record.uniform_bits / 1000,
        "compression": compression[0],
        "compression_ci_low": compression[1],
        "compression_ci_high": compression[2],
    }
    return [f"{kbits[0]:.2f} [{kbits[1]:.2f}, {kbits[2]:.2f}]", "{:.2f} [{:.2f}, {:.2f}]".format(*compression)], numbers


def _code_results(run: RunResults, code: MdlResults | None = None, prefix: str = "mdl_") -> list[dict[str, Any]]:
    """`results.csv` rows of a run's online code (`code`, default `run.mdl`: the rigour table's MDL cells), none
    without one."""
    code = code or run.mdl
    if code is None:
        return []
    _, numbers = _code_cells(code)
    intervals = {"codelength_kbits": "codelength", "compression": "compression"}  # uniform_kbits has none
    return [
        _result(
            run,
            f"{prefix}{name}",
            numbers[name],
            ci_low=numbers.get(f"{intervals.get(name)}_ci_low"),
            ci_high=numbers.get(f"{intervals.get(name)}_ci_high"),
            n=code.record.examples,
            split="train",  # the code is of the train targets
        )
        for name in ("codelength_kbits", "uniform_kbits", "compression")
    ]


def _prefixed(prefix: str, numbers: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in numbers.items()}


@register_table("rigor", place=55)
def rigor_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """Beyond accuracy, per model, task, mode, layer and probe: the accuracy beside its floor (the same probe on
    shuffled features), the control task's accuracy over its control seeds (Hewitt & Liang, 2019) beside the
    controls' floor and, for binary tasks, their ceiling (the train-type lookup); the selectivity against the
    floors; the MDL codelength and compression by the online code (Voita & Titov, 2020) beside the uniform
    codelength and the noise-feature floor's compression, for the task and its control; and the accuracy of
    the random-weights model of the same family."""
    rows = _rigor_rows(runs)
    if not rows:
        return None
    table = Table(
        "rigor",
        "Rigour: floor, control task, ceiling, selectivity, MDL (online code) and the random-weights model",
        [
            "model",
            "task",
            "mode",
            "layer",
            "probe",
            "accuracy (%)",
            "floor (%)",
            "control (%)",
            "control floor (%)",
            "ceiling (%)",
            "selectivity (points)",
            "MDL (kbits)",
            "uniform (kbits)",
            "compression",
            "noise floor compression",
            "control compression",
            "control noise floor compression",
            "random weights (%)",
        ],
    )
    for run, random in rows:
        table.add(_rigor_row(run, random))
    searched = any(c.searched_control for run, _ in rows for c in run.control_runs)
    table.notes += _RIGOR_NOTES
    if searched:
        table.notes.append(
            f"{SEARCHED_CONTROL_MARK} the control had a hyper-parameter search of its own (control_search), "
            "not the task's hyper-parameters: its selectivity is biased down"
        )
    mark_single_class(table)
    return table


def _rigor_rows(runs: Sequence[RunResults]) -> list[tuple[RunResults, RunResults | None]]:
    """The runs the rigour table has something to say about (a control, an online code, a floor or a
    random-weights counterpart), each with that counterpart, by model, task column, mode, layer and probe."""
    order = {column: index for index, column in enumerate(_columns(runs))} if runs else {}
    rows = []
    for run in runs:
        random = random_counterpart(run, runs)
        if run.control_run is not None or run.mdl is not None or run.floor_run is not None or random is not None:
            rows.append((run, random))
    rows.sort(
        key=lambda item: (
            item[0].label,
            order[(item[0].task, item[0].split)],
            MODES.index(item[0].mode),
            item[0].layer,
            item[0].probe,
        )
    )
    return rows


def _rigor_row(run: RunResults, random: RunResults | None) -> Row:
    """One run's rigour row: its cells, one record of their numbers (the table's CSV) and its results.csv rows;
    the control's cell marked when its controls had a search of their own."""
    accuracy = overall(run)
    numbers_of = rigour(run)
    code_cells, code_numbers = _code_cells(run.mdl)
    floor_cells, floor_numbers = _code_cells(run.mdl_floor)
    control = run.control_run
    control_cells, control_numbers = _code_cells(control.mdl if control is not None else None)
    control_floor_cells, control_floor_numbers = _code_cells(control.mdl_floor if control is not None else None)
    random_accuracy = overall(random) if random is not None else None
    searched = any(c.searched_control for c in run.control_runs)
    control_mark = SEARCHED_CONTROL_MARK if searched else ""
    uniform = f"{run.mdl.record.uniform_bits / 1000:.2f}" if run.mdl is not None else "–"
    cells = [
        run.label,
        run.column,
        run.mode,
        str(run.layer),
        run.probe,
        cell(accuracy, run),
        cell(numbers_of.floor, run.floor_run),
        _over_seeds(numbers_of.control, numbers_of.control_seeds, control, control_mark),
        _over_seeds(numbers_of.control_floor, numbers_of.control_seeds),
        _over_seeds(numbers_of.ceiling, numbers_of.control_seeds),
        _points(numbers_of.selectivity),
        code_cells[0],
        uniform,
        code_cells[1],
        floor_cells[1],
        control_cells[1],
        control_floor_cells[1],
        cell(random_accuracy),
    ]
    record = {
        "model": run.label,
        "mode": run.mode,
        "probe": run.probe,
        "layer": run.layer,
        "task": run.task,
        "split": run.split,
        "control_seeds": numbers_of.control_seeds,
        **_prefixed("accuracy_", accuracy.as_dict()),
        **_prefixed("floor_", numbers_of.floor.as_dict() if numbers_of.floor else {}),
        **_prefixed("control_", numbers_of.control.as_dict() if numbers_of.control else {}),
        **_prefixed("control_floor_", numbers_of.control_floor.as_dict() if numbers_of.control_floor else {}),
        **_prefixed("ceiling_", numbers_of.ceiling.as_dict() if numbers_of.ceiling else {}),
        **_prefixed("selectivity_", numbers_of.selectivity.as_dict() if numbers_of.selectivity else {}),
        **code_numbers,
        **_prefixed("noise_floor_", floor_numbers),
        **_prefixed("control_", control_numbers),
        **_prefixed("control_noise_floor_", control_floor_numbers),
        **(_prefixed("random_", random_accuracy.as_dict()) if random_accuracy else {}),
        "random_model": random.label if random is not None else None,
    }
    return Row(cells, records=[record], results=_rigor_results(run))


def _rigor_results(run: RunResults) -> list[dict[str, Any]]:
    """The results.csv rows of a run's rigour row: floor, control, control floor, ceiling and selectivity, each
    naming the run it was measured against, then the online codes of the run and of its control."""
    numbers_of = rigour(run)
    control = run.control_run
    rigour_results = {
        "floor": (numbers_of.floor, run.floor_run),
        "control": (numbers_of.control, control),
        "control_floor": (numbers_of.control_floor, control.floor_run if control is not None else None),
        "ceiling": (numbers_of.ceiling, control),
        "selectivity": (numbers_of.selectivity, control),
    }
    results = [
        _result(run, metric, estimate=value, against_run=str(against.path))
        for metric, (value, against) in rigour_results.items()
        if value is not None
    ]
    results += _code_results(run) + _code_results(run, run.mdl_floor, "mdl_noise_floor_")
    if control is not None:
        results += _code_results(control) + _code_results(control, control.mdl_floor, "mdl_noise_floor_")
    return results


# What each rigour column means (the table's notes)
_RIGOR_NOTES = [
    "accuracy (the task's main metric: Acc@0.5 for boxes), floor, random weights: mean [95% bootstrap CI over "
    "test examples] ±std over seeds; floor: the same probe and hyper-parameters trained on the same targets "
    "with the train and val feature rows permuted (what the probe reaches when the features tell nothing)",
    "control: the task's control targets (a fixed random function of each example's type), trained with the "
    "task's chosen hyper-parameters, mean over control seeds [95% CI resampling test examples and control "
    "seeds] ±std over control seeds; control floor: each control's floor; ceiling (binary tasks): the "
    "control label of each test example's type looked up in train (what memorising every train type gives)",
    "selectivity = (accuracy - floor) - (control - control floor), in points, CI resampling test examples and "
    "control seeds: what the probe reads beyond what it reaches by memorising types; a CI covering 0 means "
    "no evidence that the representation holds more than the control's types",
    "MDL: online codelength of the train targets in kbits (1 kbit = 1,000 bits; Voita & Titov's blocks of 0.1 "
    "... 100 % of train; binary labels under Bernoulli(sigmoid), boxes per cxcywh coordinate in 100 bins "
    "under a Laplace), 95% bootstrap CI over the coded examples; uniform: the codelength without a probe; "
    "compression = uniform / online; noise floor compression: the same code with shuffled feature rows "
    "(the target's prior alone): a compression is evidence only above its noise floor",
    "random weights: the same configuration on the model of the same family with random weights (init: random)",
]


SEARCHED_CONTROL_MARK = "§"


def _family_kind(name: str) -> tuple[str, str]:
    """What a family's latents are made by (its layers' owner: Q-Former, Perceiver, projector ...) and whether
    they read the text; the family's name and "?" for a family no installed package registers."""
    from probing.models.registry import families

    family = next((f for f in families() if f.name == name), None)
    if family is None:
        return name, "?"
    return family.resampler.layer_owner, "yes" if family.reads_text else "no"


@register_table("families", place=56)
def families_table(runs: Sequence[RunResults], options: ReportOptions) -> Table | None:
    """Resampler families side by side (`probing.report.analysis.family_rows`): per trained model the frozen
    linear probe on its last layer per task, beside the same probe on its family's random-weights model, with
    the latent count and width the probe read; only when two families or more are in the runs."""
    rows = family_rows(list(runs))
    if not rows:
        return None
    titles = {(run.task, run.split): run.column for run in runs}
    columns = [titles[c] for c in _columns(runs) if any(titles[c] in row.runs for row in rows)]
    headers = ["model", "resampler", "latents", "reads text"]
    headers += [header for column in columns for header in (f"{column} pretrained", f"{column} random weights")]
    table = Table("families", "Resampler families: frozen linear probe on the last layer (%)", headers)
    for row in rows:
        kind, reads_text = _family_kind(row.family)
        labels = {"family": row.family}
        if row.latents is not None:
            labels |= {"latents": row.latents[0], "width": row.latents[1]}
        accuracies = [
            Shown.estimate(overall(which), which, model=which.label, **labels, init=which.init)
            if which is not None
            else cell(None)
            for column in columns
            for which in row.runs.get(column, (None, None))
        ]
        table.add(Row([row.label, kind, _latents_shown(row, columns), reads_text, *accuracies]))
    table.notes.append(
        "latents: the number of latent vectors and their width that the probe read (flattened, latents × width "
        "inputs; `--latents mean` reads their mean); reads text: the latents depend on the caption (a Q-Former's "
        "queries attend to it) or on the image alone. Random weights: the same architecture with re-drawn weights "
        "(`init: random`), same task, layer and probe; – where it was not run. Figure `families`: accuracy "
        "against the number of latents."
    )
    mark_single_class(table)
    return table


def _latents_shown(row: FamilyRow, columns: list[str]) -> Shown | str:
    """The families table's latents cell (`count × width`): in results.csv once per task run it was read for;
    in the table's CSV as labels of each accuracy's record."""
    if row.latents is None:
        return "–"
    runs = [row.runs[column][0] for column in columns if row.runs.get(column, (None, None))[0] is not None]
    results = [
        r
        for run in runs
        for r in (_result(run, "latents", row.latents[0]), _result(run, "latent_width", row.latents[1]))
    ]
    text = f"{row.latents[0]} × {row.latents[1]}"
    return Shown(text, results=tuple(results)) if results else text


def _over_seeds(estimate: Estimate | None, seeds: int, run: RunResults | None = None, mark: str = "") -> str:
    """`cell` of an estimate over control seeds (`mark` after it), with their count (`(5 seeds)`)."""
    if estimate is None:
        return "–"
    return f"{cell(estimate, run)}{mark} ({seeds} seed{'s' if seeds != 1 else ''})"


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run and search folders among `paths` (folders holding runs are searched, `best/` of a search once)."""
    found: list[Path] = []

    def finished(folder: Path, root: Path) -> bool:  # a hidden component is a half-written output (*.partial-*)
        return not any(part.startswith(".") for part in folder.relative_to(root).parts)

    for path in map(Path, paths):
        if not path.exists():
            raise ProbingError(f"{path}: not found")
        if (path / "summary.json").is_file() and (path / "best").is_dir():
            found.append(path)
        elif (path / "metrics.json").is_file() and (path / "manifest.json").is_file():
            found.append(path)
        elif path.is_dir():
            searches = {
                p.parent
                for p in path.rglob("summary.json")
                if (p.parent / "best").is_dir() and finished(p.parent, path)
            }
            runs = {
                p.parent
                for p in path.rglob("metrics.json")
                if (p.parent / "manifest.json").is_file()
                and p.parent.parent not in searches
                and finished(p.parent, path)
            }
            found += sorted(searches | runs)
        else:
            raise ProbingError(f"{path}: not a run or search folder")
    if not found:
        raise ProbingError(f"no run folders under {', '.join(map(str, paths))}")
    return found


def find_mdl(paths: Sequence[Path]) -> list[Path]:
    """MDL folders (`probing mdl`) among `paths` and under them (half-written ones, hidden, skipped)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / MDL_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(
                p.parent
                for p in path.rglob(MDL_FILE)
                if (p.parent / "manifest.json").is_file()
                and not any(part.startswith(".") for part in p.parent.relative_to(path).parts)
            )
    return found


def load_runs(paths: Sequence[Path]) -> tuple[list[RunResults], list[RunResults]]:
    """Every evaluated split of the runs under `paths`, one configuration kept where several repeat it, control
    runs and online codes riding on their task runs (`attach_rigour`): (kept, left out). Two different models
    (by their identity) under one label are refused, naming a run of each."""
    loaded = [results for path in find_runs(paths) for results in load_run_splits(path)]
    check_labels(loaded)
    kept, dropped = deduplicate(loaded)
    tasks, unpaired = attach_rigour(kept, [load_mdl(path) for path in find_mdl(paths)])
    return tasks, dropped + unpaired


def check_named_runs(paths: Sequence[Path]) -> None:
    """Two run (or search) folders named on the command line that stand for the same row (label, task, mode,
    layer, probe, control) are refused, both named: one of them would be left out of every table. Runs found by
    searching a folder (a workspace where two experiments share a configuration) are deduplicated instead, and
    the ones left out are listed in `runs.txt`."""
    from probing.report.analysis import load_run

    first: dict[tuple, Path] = {}
    for path in paths:
        found = find_runs([path])
        if len(found) != 1 or Path(found[0]).resolve() not in (Path(path).resolve(), Path(path).resolve() / "best"):
            continue  # a folder holding runs, not a run
        key = load_run(path).key
        if key in first:
            label, task, _, mode, layer, probe, control, control_seed, shuffled = key
            what = f" (control, seed {control_seed})" if control else ""
            what += " (shuffled features: a floor)" if shuffled else ""
            raise ProbingError(
                f"{first[key]} and {path}: both are {label} {mode} {task}{what} layer "
                f"{layer} {probe}; name one of them (or give each model its own --label)"
            )
        first[key] = Path(path)


def model_key(run: RunResults) -> tuple:
    """What tells two models apart across kinds of run (a probe run records the resampler's weights hash, a
    zero-shot run the hash of every weight file): family, init (and its seed) and the source the weights were
    read from; the weights identity itself where no source was recorded."""
    where = run.model_id if run.model_id is not None else json.dumps(run.weights, sort_keys=True)
    return (run.family, run.init, run.weights.get("init_seed"), where)


def check_labels(runs: Sequence[RunResults]) -> None:
    """One label, one model: rows are named by label, so two models under one would be merged or one dropped.
    People's answers (no model) are left out of the check."""
    first: dict[str, RunResults] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.mode == HUMAN:
            continue
        seen = first.setdefault(run.label, run)
        if model_key(seen) != model_key(run):
            raise ProbingError(
                f"label '{run.label}' names two different models: {seen.path} and {run.path} (give each model "
                "its own --label)"
            )


RESULT_COLUMNS = [
    "model",
    "model_id",
    "init",
    "task",
    "mode",
    "layer",
    "probe",
    "control",
    "single_class",
    "split",
    "category",
    "metric",
    "against",
    "value",
    "ci_low",
    "ci_high",
    "p_value",
    "seeds_std",
    "seeds",
    "n",
    "run",
    "against_run",
]
# The pandas types of results.csv's columns, what `pd.read_csv(path, dtype=RESULT_DTYPES)` reads back: nullable
# integers and strings (a chance row has no layer, a run row no `against`), plain booleans for the two flags.
RESULT_DTYPES = {column: "string" for column in RESULT_COLUMNS} | {
    "layer": "Int64",
    "seeds": "Int64",
    "n": "Int64",
    "control": "bool",
    "single_class": "bool",
    "value": "float64",
    "ci_low": "float64",
    "ci_high": "float64",
    "p_value": "float64",
    "seeds_std": "float64",
}


def results_frame(runs: Sequence[RunResults], tables: Sequence[Table] = (), out: Path | None = None):
    """`results.csv`: one row per run and split (and per category of each, `category` set), control runs too,
    values as fractions; then the other numbers the tables show (`Table.results`: chance and paper rows,
    hyper-parameters, Kendall tau, paired differences, ROC-AUC, selectivity, MDL), each once; in the column
    types of RESULT_DTYPES (the data dictionary: docs/results-csv.md) and, given the report folder `out`, with
    local paths relative to it."""
    import pandas as pd

    rows = []
    every = [*runs, *[run.control_run for run in runs if run.control_run is not None]]
    for run in every:
        for results in (run, validation_run(run)):
            if results is None:
                continue
            estimates = [(None, overall(results)), *per_category(results).items()]
            rows += [_result(results, run.metric, estimate=e, category=category) for category, e in estimates]
    rows += [row for table in tables for row in table.results]
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    frame = frame.drop_duplicates(subset=[c for c in RESULT_COLUMNS if c not in ("value", "ci_low", "ci_high")])
    # a row of no run (chance, the paper's numbers) is no control and no single-class probe: the flags stay booleans
    frame[["control", "single_class"]] = frame[["control", "single_class"]].fillna(False)
    if out is not None:  # paths relative to the report, so that the file names none of this machine's folders
        for column in ("model_id", "run", "against_run"):
            frame[column] = [_relative(value, out) for value in frame[column]]
    return frame.astype(RESULT_DTYPES).reset_index(drop=True)


def _relative(value: Any, out: Path) -> Any:
    """An absolute local path (a run folder, a checkpoint folder, `lavis:<.pth>`) relative to the report folder
    `out`; a Hub id or an empty cell as it is."""
    if not isinstance(value, str):
        return value
    scheme, _, path = value.rpartition(":") if value.startswith("lavis:") else ("", "", value)
    if not os.path.isabs(path):
        return value
    relative = Path(os.path.relpath(path, Path(out).absolute())).as_posix()
    return f"{scheme}:{relative}" if scheme else relative


def write_figures(runs: Sequence[RunResults], folder: Path) -> list[Path]:
    """Per-layer curves and per-category bars of every task and split the runs hold."""
    figures = []
    for task, split in _columns(runs):
        these = [run for run in runs if (run.task, run.split) == (task, split)]
        suffix = task if len(these[0].spec.eval_splits) == 1 else f"{task}_{split}"
        figures += per_layer_figure(these, task, folder / f"per_layer_{suffix}")
        figures += category_figure(these, task, folder / f"categories_{suffix}")
    figures += families_figure(family_rows(list(runs)), folder / "families")
    searched = [run for run in runs if run.search is not None and run.split == run.spec.eval_splits[0]]
    for run in sorted(searched, key=lambda r: (r.label, r.mode, r.task, r.layer, r.probe)):  # each search's best
        # a folder per model and mode, a file per task, layer and probe: dozens of curves stay browsable
        group = _file_name("-".join((run.label, run.mode)))
        name = _file_name("-".join((run.task, f"layer{run.layer}", run.probe)))
        figures += learning_curve_figure(run, folder / "learning_curves" / group / name)
    return figures


def _file_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


REPORT_FILE = "report.json"


def write_report(
    paths: Sequence[Path],
    out: Path,
    compare_paper: bool = False,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load the runs, write tables (all, or those named in `only`), figures, `results.csv`, `runs.txt` and
    `README.md` into `out`, whole: staged beside it and swapped in, so an earlier report of ours leaves nothing
    behind. A folder holding files no report wrote is refused unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProbingError(f"--out {out}: an existing file, not a report folder")
    with one_writer(out):  # one writer at a time (several workers finishing one config write the same report)
        _check_ownership(out, overwrite)
        return _write_report(paths, out, compare_paper, only)


def _check_ownership(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding files that no report of ours wrote (its `report.json` lists what it wrote)."""
    if overwrite or not out.is_dir():
        return
    present = sorted(str(path.relative_to(out)) for path in out.rglob("*") if not path.is_dir())
    if not present:
        return
    ours: set[str] = set()
    try:
        recorded = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
        # reports made before `files` was recorded listed their tables and figures, beside their README
        ours = set(recorded.get("files") or [*recorded["tables"], *recorded["figures"], "README.md"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    foreign = [name for name in present if name not in ours | {REPORT_FILE}] if ours else present
    if foreign:
        raise ProbingError(
            f"--out {out}: holds {len(foreign)} file(s) no report wrote (e.g. {foreign[0]}); choose another folder "
            "or pass --overwrite to replace it whole"
        )


def _count(runs: Sequence[RunResults]) -> str:
    """What was run, counted: runs per mode and task."""
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[f"{run.mode} {run.task}"] += 1
    return ", ".join(f"{number} {name}" for name, number in sorted(counts.items()))


def _write_report(paths: Sequence[Path], out: Path, compare_paper: bool, only: Sequence[str] | None) -> dict[str, Any]:
    runs, dropped = load_runs(paths)
    options = ReportOptions(compare_paper=compare_paper)
    tables = [
        table
        for builder in builders_in_place()
        for table in builder.build(runs, options)
        if only is None or table.name in only
    ]
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    with staged_directory(out) as staging:
        (staging / "tables").mkdir()
        written: dict[str, list[str]] = {"tables": [], "figures": []}
        for table in tables:
            written["tables"] += [str(p.relative_to(staging)) for p in table.write(staging / "tables")]
        figures = write_figures(runs, staging / "figures")
        written["figures"] = [str(p.relative_to(staging)) for p in figures]
        results_frame(runs, tables, out).to_csv(staging / "results.csv", index=False)
        shown = sorted({str(r.path) for r in runs})
        repeated, alone = _left_out(runs, dropped)
        listing = ["# runs shown", *shown]
        listing += [
            "",
            "# runs left out: they repeat a kept configuration (model, task, mode, layer, probe)",
            *repeated,
        ]
        listing += ["", "# control runs left out: no run of the same configuration on the task's targets", *alone]
        (staging / "runs.txt").write_text("\n".join(listing) + "\n", encoding="utf-8")
        readme = _report_readme(runs, shown, repeated, alone, tables, figures)
        (staging / "README.md").write_text("\n".join(readme), encoding="utf-8")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if not p.is_dir())
        write_json(staging / REPORT_FILE, {"runs": shown, **written, "files": files, "compare_paper": compare_paper})
        if out.exists():  # our earlier report (checked): moved aside, so the new one replaces it whole
            os.replace(out, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return written | {
        "runs": len(shown),
        "dropped": len({str(r.path) for r in dropped}),
        "readme": str(out / "README.md"),
    }


def _left_out(runs: Sequence[RunResults], dropped: Sequence[RunResults]) -> tuple[list[str], list[str]]:
    """The folders left out of a report: runs repeating a kept configuration, and control or floor runs with no
    run of their configuration on the task's own targets."""
    tasks = {run.configuration for run in runs}
    unpaired = [r for r in dropped if (r.control or r.shuffled) and r.configuration not in tasks]
    repeated = sorted({str(r.path) for r in dropped if not any(r is u for u in unpaired)})
    return repeated, sorted({str(r.path) for r in unpaired})


def _report_readme(
    runs: Sequence[RunResults],
    shown: list[str],
    repeated: list[str],
    alone: list[str],
    tables: Sequence[Table],
    figures: Sequence[Path],
) -> list[str]:
    """The report's README.md: what was run and left out, where the numbers are, the tables, the figures and
    the method, as lines."""
    readme = ["# Report", "", f"{len(shown)} run(s): {_count(runs)}; their folders are listed in `runs.txt`."]
    if repeated:
        readme.append(
            f"{len(repeated)} run(s) repeat a kept configuration (model, task, mode, layer, probe) and are "
            "left out (`runs.txt`)."
        )
    if alone:
        readme.append(
            f"{len(alone)} control run(s) have no run of the same configuration on the task's own targets and "
            "are left out (`runs.txt`)."
        )
    readme += [
        "",
        "Every number the tables below show is in `results.csv` (as fractions where the tables show percent): a "
        "row per run, split and category for accuracies, then a row per other number (chance and paper rows, "
        "hyper-parameters, Kendall tau, paired differences, ROC-AUC, selectivity, MDL; its `metric` says "
        "which). Each table's numbers are also in its CSV in `tables/`, beside its LaTeX (booktabs).",
        "",
    ]
    readme += [table.markdown() for table in tables]
    if figures:
        readme += ["## Figures", ""]
        readme += [
            f"![{p.stem}](figures/{p.name})" for p in figures if p.suffix == ".png" and p.parent.name == "figures"
        ]
        curves = [p for p in figures if p.suffix == ".png" and "learning_curves" in p.parts]
        if curves:
            readme += [
                "",
                f"Learning curves of {len(curves)} search(es)' best trials: "
                "`figures/learning_curves/<model>-<mode>/"
                "<task>-layer<N>-<probe>.png`.",
            ]
        readme += ["", "PDF and SVG versions sit beside the PNGs in `figures/`.", ""]
    readme += [
        "## Method",
        "",
        "Accuracies are means over seeds of per-example correctness on the split shown (validation or test; "
        "Acc@IoU>=0.5 for box regression), with 95% percentile bootstrap intervals over that split's examples "
        "(1,000 resamples, seeded) and the standard deviation across seeds where several seeds were run. "
        "Kendall tau is scipy's, across the task's categories.",
        "",
    ]
    return readme


def analysis_json(path: Path) -> str:
    from probing.report.analysis import analyse

    return json.dumps(analyse(load_run(path)), indent=2, allow_nan=False)
