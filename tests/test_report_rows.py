"""A report row is declared once (`probing.report.tables.Row`): its cells, the numbers behind them in the table's
CSV and its rows of results.csv all come from it, so a cell cannot show a number that no CSV holds, nor a CSV
hold a number of a row that no cell shows. Checked here on a report of run folders in `probing train`'s format
(every built-in table but the rigour and families ones, which test_rigor and test_families check the same way),
and on the row type itself."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    assert_results_hold_every_number,
    assert_rows_hold_their_numbers,
    results_number_mismatches,
    row_number_mismatches,
)
from test_report_paper import VSR_LABELS, outcomes, write_run

from probing.core.errors import ProbingError
from probing.report.tables import ReportOptions, Row, Shown, Table, builders_in_place, load_runs, write_report


def _search(folder: Path, mode: str, lr: float, epochs: int) -> None:
    """`folder` a search of `probing search`'s format around the run in `folder / "best"`."""
    summary = {
        "task": "vsr",
        "mode": mode,
        "layer": 4,
        "probe": "linear",
        "metric": "accuracy",
        "trials_complete": 2,
        "trials_total": 3,
        "best": {"number": 1, "params": {"lr": lr, "epochs": epochs}, "val_search": 0.625, "val": {}},
        "trials": [{"number": n, "state": "PRUNED" if n == 2 else "COMPLETE", "value": 0.5} for n in range(3)],
        "plots": [],
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def _rcm_run(folder: Path, family: str, source: str, rights: list[int]) -> None:
    """An RCM run whose category k has rights[k] of its 40 examples right (Table 5 ranks them)."""
    n = 40 * len(rights)
    categories = [f"c{i % len(rights)}" for i in range(n)]
    labels = [(i // len(rights)) % 2 for i in range(n)]
    correct = [int(i // len(rights) < rights[i % len(rights)]) for i in range(n)]
    write_run(
        folder,
        task="rcm",
        family=family,
        weights=family[0] * 64,
        source=source,
        correct={"test": [correct]},
        labels={"test": labels},
        categories=categories,
    )


@pytest.fixture(scope="module")
def report_runs(tmp_path_factory) -> Path:
    """VSR: two models frozen (two layers for one; a second probe for the other) and unfrozen, one of them a
    search; RCM: two models with categories of different accuracy."""
    root = tmp_path_factory.mktemp("rows")
    checkpoints = {"blip2": "Salesforce/blip2-itm-vit-g", "instructblip": "/models/tiny-instructblip"}
    plan = [("blip2", "frozen", 4, 0.6), ("blip2", "frozen", 2, 0.55), ("instructblip", "frozen", 4, 0.5)]
    for index, (family, mode, layer, rate) in enumerate(plan):
        write_run(
            root / f"{family}-{mode}-{layer}",
            mode=mode,
            family=family,
            layer=layer,
            weights=family[0] * 64,
            source=checkpoints[family],
            correct={"val": outcomes(rate, index), "test": outcomes(rate, 10 + index)},
            labels=VSR_LABELS,
        )
    for family, rate, lr in (("blip2", 0.85, 1e-4), ("instructblip", 0.8, 3e-5)):
        folder = root / f"{family}-unfrozen"
        write_run(
            folder / "best",
            mode="unfrozen",
            family=family,
            weights=family[0] * 64,
            source=checkpoints[family],
            correct={"val": outcomes(rate, 20), "test": outcomes(rate, 30)},
            labels=VSR_LABELS,
        )
        _search(folder, "unfrozen", lr, 5)
    swiglu = root / "instructblip-frozen-4-swiglu2"
    write_run(
        swiglu,
        family="instructblip",
        weights="i" * 64,
        source=checkpoints["instructblip"],
        correct={"test": outcomes(0.7, 40)},
        labels={"test": VSR_LABELS["test"]},
    )
    manifest = json.loads((swiglu / "manifest.json").read_text())
    (swiglu / "manifest.json").write_text(json.dumps(manifest | {"probe": "swiglu2"}))
    _rcm_run(root / "rcm-blip2", "blip2", checkpoints["blip2"], [10, 20, 25, 30, 35, 38])
    _rcm_run(root / "rcm-instructblip", "instructblip", checkpoints["instructblip"], [30, 12, 25, 18, 35, 20])
    return root


@pytest.fixture(scope="module")
def report(report_runs, tmp_path_factory) -> tuple[list[Table], Path]:
    """The report's tables as built (the objects) and the folder it was written to, with the paper's rows."""
    out = tmp_path_factory.mktemp("report") / "report"
    write_report([report_runs], out, compare_paper=True)
    runs, _ = load_runs([report_runs])
    tables = [table for builder in builders_in_place() for table in builder.build(runs, ReportOptions(True))]
    return tables, out


def test_the_report_covers_the_tables_checked(report):
    tables, out = report
    assert {table.name for table in tables} >= {
        "table1",
        "roc_auc",
        "table2",
        "categories_rcm",
        "table3",
        "table4",
        "table5",
        "paired",
        "searches",
        "per_layer",
    }
    for table in tables:  # the objects checked below are the tables written
        assert (out / "tables" / f"{table.name}.md").read_text(encoding="utf-8") == table.markdown()
        written = pd.read_csv(out / "tables" / f"{table.name}.csv", dtype=object, keep_default_na=False)
        assert written.columns.tolist() == table.frame().columns.tolist() and len(written) == len(table.records)


def test_every_number_of_a_tables_csv_is_shown_in_its_row_and_is_in_results_csv(report):
    tables, out = report
    assert assert_rows_hold_their_numbers(tables, out) > 250
    # the one exception allowed: a per-category table's count row shows numbers of no record of its own
    counts = [m for m in row_number_mismatches(tables) if "['n', " in m]
    assert counts and all("is shown but in no record of its row" in m for m in counts)
    assert {m.split(" ")[0] for m in counts} == {"table2", "categories_rcm"}
    assert results_number_mismatches(tables, out) == []
    assert assert_results_hold_every_number(out) > 200  # and every number a cell shows is in results.csv


def test_the_check_names_a_row_whose_cells_and_records_disagree():
    """The invariant is not vacuous: a number a cell shows that its row's records lack, and a number of its
    records that no cell shows, are named."""
    table = Table("made_up", "Made up", ["model", "accuracy (%)", "other (%)"])
    table.add(Row(["m", Shown("50.0", ({"mean": 0.5},)), "61.0"]))
    table.add(Row(["n", Shown("40.0", ({"mean": 0.4, "ci_low": 0.123},)), "–"]))
    assert row_number_mismatches([table]) == [
        "made_up ['m', '50.0']: 61.0 is shown but in no record of its row",
        "made_up ['n', '40.0']: ci_low=0.123 is in no cell of its row",
    ]


def test_built_in_tables_add_their_rows_whole(report):
    """No built-in table appends to `rows`, `records` or `results` apart from its rows (the plug-in way)."""
    tables, _ = report
    for table in tables:
        assert table.rows == [row.texts for row in table.body]
        assert table.records == [record for row in table.body for record in row.every_record]
        assert table.results == [result for row in table.body for result in row.every_result]


def test_a_row_cannot_be_added_without_its_numbers():
    table = Table("t", "T", ["model", "accuracy (%)"])
    with pytest.raises(ProbingError, match="shows numbers without them"):
        Shown("50.0")  # a number cell is made with its numbers or not at all
    shown = Shown("50.0", ({"model": "m", "mean": 0.5},), ({"model": "m", "metric": "accuracy", "value": 0.5},))
    table.add(Row(["m", shown]))
    assert table.rows == [["m", "50.0"]]
    assert table.records == [{"model": "m", "mean": 0.5}]
    assert table.results == [{"model": "m", "metric": "accuracy", "value": 0.5}]
    for name in ("rows", "records", "results"):  # read from the rows: not replaceable
        with pytest.raises(ProbingError, match=f"Table.{name} is read from its rows"):
            setattr(table, name, [])
    with pytest.raises(ProbingError, match="Table.add takes a Row"):
        table.add(["m", "50.0"])
    table.rows.copy().append(["lost", "–"])  # a copy of the derived list is the caller's
    assert len(table.rows) == 1


def test_a_plugin_table_appending_to_rows_and_records_still_works(tmp_path):
    """A table written before `Row` (docs/extending.md's): its rows and records appended side by side."""
    table = Table("best_layer", "Best layer", ["model", "layer", "score (%)"])
    table.rows.append(["m", "4", "61.0"])
    table.records.append({"model": "m", "layer": 4, "mean": 0.61})
    table.rows += [["n", "2", "55.0"]]
    table.records += [{"model": "n", "layer": 2, "mean": 0.55}]
    table.results.append({"model": "m", "metric": "best_layer", "value": 4})
    assert table.rows == [["m", "4", "61.0"], ["n", "2", "55.0"]]
    assert "| m | 4 | 61.0 |" in table.markdown() and "| n | 2 | 55.0 |" in table.markdown()
    table.write(tmp_path)
    assert pd.read_csv(tmp_path / "best_layer.csv")["mean"].tolist() == [0.61, 0.55]
    assert table.results == [{"model": "m", "metric": "best_layer", "value": 4}]
