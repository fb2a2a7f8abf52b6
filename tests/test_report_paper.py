"""Reports fit for a paper: results.csv, Table 1 with val, test and chance, the paired comparisons (McNemar
against statsmodels and scipy), labels that never merge two models, paper rows only beside the paper's
checkpoints, LaTeX tables, figures in one local house style, and a report folder that is ours alone.

Run folders are written here in the format `probing train` writes (manifest.json, metrics.json,
predictions/<split>.jsonl) with hand-chosen per-example outcomes, so every number has a hand-computed
reference."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_results_hold_every_number, run_cli
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar

from probing.core.records import MetricsRecord, SeedRun
from probing.report.analysis import chance_level, load_run, overall, paired_comparison, per_category
from probing.report.latex import LINE_WIDTH
from probing.report.tables import RESULT_COLUMNS, RESULT_DTYPES, SINGLE_CLASS_MARK, write_report

RELATIONS = ["Adjacency", "Directional", "Orientation", "Projective", "Proximity", "Topological", "Unallocated"]


def write_run(
    folder: Path,
    *,
    task: str = "vsr",
    mode: str = "frozen",
    label: str | None = None,
    family: str = "blip2",
    weights: str = "a" * 64,
    source: str = "/models/tiny-blip2",
    correct: dict[str, list[list[int]]],
    labels: dict[str, list[int]],
    categories: list[str] | None = None,
    predicted: dict[str, list[list[int]]] | None = None,
    layer: int = 4,
) -> Path:
    """A run folder of `probing train`'s format: per split, each seed's per-example correctness."""
    (folder / "predictions").mkdir(parents=True)
    seeds = range(len(next(iter(correct.values()))))
    for split, rows in correct.items():
        n = len(rows[0])
        names = categories or [RELATIONS[i % len(RELATIONS)] for i in range(n)]
        with open(folder / "predictions" / f"{split}.jsonl", "w") as handle:
            for seed, row in zip(seeds, rows, strict=True):
                for i, right in enumerate(row):
                    label_ = labels[split][i]
                    guess = predicted[split][seed][i] if predicted else (label_ if right else 1 - label_)
                    record = {"seed": seed, "id": i, "category": names[i], "label": label_, "correct": bool(right)}
                    record |= {"predicted": guess, "probability": 0.9 if guess else 0.1}
                    record |= {"area_fraction": 0.1 + 0.01 * i, "centre_distance": 0.3 - 0.001 * i}
                    handle.write(json.dumps(record) + "\n")
    model = {"family": family, "init": "pretrained", "weights_sha256": weights}
    manifest = {
        "kind": "probe-run",
        "mode": mode,
        "layer": layer,
        "probe": "linear",
        "task": task,
        "inputs": {"model": model},
        "model_source": {"source": source, "family": family, "init": "pretrained"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runs = [
        SeedRun(
            seed=seed,
            trial={"lr": 1e-3, "epochs": 2, "seed": seed},
            best_epoch=2,
            epochs_run=2,
            stopped_early=False,
            splits={split: {"accuracy": float(np.mean(rows[seed]))} for split, rows in correct.items()},
            history=[{"epoch": e, "accuracy": 0.5 + 0.1 * e, "val_loss": 1.0 / e} for e in (1, 2)],
        )
        for seed in seeds
    ]
    record = MetricsRecord(task=task, metric="accuracy", runs=runs, train_categories={}, label=label)
    (folder / "metrics.json").write_text(json.dumps(record.to_json()))
    return folder


N = 40
RNG = np.random.default_rng(0)
VSR_LABELS = {"val": [int(v) for v in RNG.integers(0, 2, N)], "test": [1] * 30 + [0] * 10}  # test: 75 % ones


def outcomes(rate: float, seed: int, seeds: int = 2) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(v) for v in rng.random(N) < rate] for _ in range(seeds)]


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory) -> Path:
    """Two models x frozen/unfrozen on VSR (val and test), BLIP-2 from the paper's checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for index, (family, mode, rate) in enumerate(
        [("blip2", "frozen", 0.6), ("blip2", "unfrozen", 0.85), ("instructblip", "frozen", 0.5)]
    ):
        write_run(
            root / f"{family}-{mode}",
            mode=mode,
            family=family,
            weights=family[0] * 64,
            source="Salesforce/blip2-itm-vit-g" if family == "blip2" else "/models/tiny-instructblip",
            correct={"val": outcomes(rate, index), "test": outcomes(rate, 10 + index)},
            labels=VSR_LABELS,
        )
    return root


def test_mcnemar_and_paired_difference_match_the_references(tmp_path):
    first = [1] * 20 + [1] * 9 + [0] * 3 + [0] * 8  # both right 20, first only 9, second only 3, neither 8
    second = [1] * 20 + [0] * 9 + [1] * 3 + [0] * 8
    labels = {"test": [1] * 40}
    a = load_run(write_run(tmp_path / "a", correct={"test": [first]}, labels=labels))
    b = load_run(write_run(tmp_path / "b", mode="unfrozen", correct={"test": [second]}, labels=labels))
    compared = paired_comparison(a, b)
    assert (compared.first_only, compared.second_only) == (9, 3)
    assert compared.p_value == pytest.approx(mcnemar([[20, 9], [3, 8]], exact=True).pvalue)
    assert compared.p_value == pytest.approx(binomtest(3, 12, 0.5).pvalue)  # the exact test is a binomial one
    assert compared.p_value == pytest.approx(2 * sum(math.comb(12, k) for k in range(4)) / 2**12)  # by hand
    assert compared.difference.mean == pytest.approx((29 - 23) / 40)
    assert compared.difference.low <= compared.difference.mean <= compared.difference.high
    shifted = load_run(write_run(tmp_path / "c", correct={"test": [second[:-1]]}, labels={"test": [1] * 39}))
    assert paired_comparison(a, shifted) is None  # not the same examples: no pairing


def test_chance_is_the_majority_class_rate(tmp_path):
    run = load_run(write_run(tmp_path / "r", correct={"test": [[1] * 8]}, labels={"test": [1, 1, 1, 0, 1, 1, 0, 1]}))
    assert chance_level(run) == 0.75
    balanced = load_run(write_run(tmp_path / "b", correct={"test": [[1] * 4]}, labels={"test": [1, 0, 0, 1]}))
    assert chance_level(balanced) == 0.5


def test_results_csv_holds_every_number_of_the_tables(paper_runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "report", paper_runs, "--out", out, "--compare-paper")
    assert code == 0, err
    results = pd.read_csv(out / "results.csv")
    for column in ("model", "model_id", "init", "task", "mode", "layer", "probe", "split", "metric", "value"):
        assert column in results.columns
    for column in ("ci_low", "ci_high", "seeds_std", "n", "run"):
        assert column in results.columns
    overall_rows = results[results["category"].isna() & results["run"].notna() & (results["metric"] == "accuracy")]
    assert len(overall_rows) == 6  # 3 runs x (val, test)
    # every number of every table (Table 1, Table 2, paired, ROC-AUC) is in the results file
    assert assert_results_hold_every_number(out) > 100
    paired = results[results["metric"] == "accuracy_difference"]
    assert set(paired["against"]) == {"BLIP-2 frozen", "InstructBLIP frozen"} and paired["p_value"].notna().all()
    assert results["layer"].dropna().eq(4).all() and set(results[results["run"].isna()]["model"]) == {
        "Chance",
        "BLIP-2 (paper)",
    }
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert len(table1) >= 6
    for record in table1.itertuples():
        match = results[
            (results["model"] == record.model)
            & (results["mode"] == record.mode)
            & (results["split"] == record.split)
            & (results["metric"] == "accuracy")
            & results["category"].isna()
        ]
        assert len(match) == 1, record
        assert match["value"].iloc[0] == pytest.approx(record.mean)
        if isinstance(record.ci_low, float) and record.ci_low == record.ci_low:
            assert match["ci_low"].iloc[0] == pytest.approx(record.ci_low)
    # Table 1: val and test per task, the chance row from the test labels (75 % ones)
    lines = (out / "tables" / "table1.md").read_text().splitlines()
    assert lines[2] == "| model | mode | VSR val (acc) | VSR test (acc) |"
    chance = next(line for line in lines if line.startswith("| Chance |"))
    val_rate = max(np.mean(VSR_LABELS["val"]), 1 - np.mean(VSR_LABELS["val"]))
    assert chance == f"| Chance | majority class | {100 * val_rate:.1f} | 75.0 |"
    test_run = load_run(paper_runs / "blip2-frozen")
    frozen = next(line for line in lines if line.startswith("| BLIP-2 | frozen |"))
    assert f"{100 * test_run.correct.mean():.1f} [" in frozen.split(" | ")[3]
    # paper rows beside the paper's checkpoint only, and a line says why none beside the other model
    assert any(line.startswith("| BLIP-2 (paper) | frozen | – | 64.97 |") for line in lines)
    assert not any(line.startswith("| InstructBLIP (paper)") for line in lines)
    assert "no paper rows beside InstructBLIP" in "\n".join(lines)
    # the results file holds the chance and paper numbers too
    assert results[(results["model"] == "BLIP-2 (paper)") & (results["mode"] == "frozen")]["value"].iloc[
        0
    ] == pytest.approx(0.6497)
    # LaTeX with booktabs, Markdown and CSV for each table; run paths in runs.txt, not in the README
    latex = (out / "tables" / "table1.tex").read_text()
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex and " & val (acc) & " in latex
    assert "\n\\begin{table}\n" in latex  # 4 columns: one column of the page; wider ones span both
    assert "\n\\begin{table*}\n" in (out / "tables" / "paired.tex").read_text()
    readme = (out / "README.md").read_text()
    assert str(paper_runs) not in readme
    assert "3 run(s): 2 frozen vsr, 1 unfrozen vsr" in readme
    assert str(paper_runs / "blip2-frozen") in (out / "runs.txt").read_text()


def test_paired_table_compares_modes_and_models(paper_runs, tmp_path):
    write_report([paper_runs], tmp_path / "report")
    paired = pd.read_csv(tmp_path / "report" / "tables" / "paired.csv")
    pairs = {(r.model, r.mode, r.other_model, r.other_mode) for r in paired.itertuples()}
    assert pairs == {
        ("BLIP-2", "unfrozen", "BLIP-2", "frozen"),  # frozen vs unfrozen of one model
        ("BLIP-2", "frozen", "InstructBLIP", "frozen"),  # two models in one mode
    }
    row = paired[paired["mode"] == "unfrozen"].iloc[0]
    a, b = load_run(paper_runs / "blip2-unfrozen"), load_run(paper_runs / "blip2-frozen")
    first_only = int(np.sum((a.correct[0] == 1) & (b.correct[0] == 0)))
    second_only = int(np.sum((a.correct[0] == 0) & (b.correct[0] == 1)))
    assert (row["first_only"], row["second_only"]) == (first_only, second_only)
    assert row["mcnemar_p"] == pytest.approx(binomtest(min(first_only, second_only), first_only + second_only).pvalue)
    assert row["difference_mean"] == pytest.approx(a.correct.mean() - b.correct.mean())


def test_two_models_under_one_label_are_refused(tmp_path, capsys):
    labels = {"test": [1] * 10}
    write_run(
        tmp_path / "runs" / "a",
        label="Mine",
        source="Salesforce/blip2-itm-vit-g",
        correct={"test": [[1] * 10]},
        labels=labels,
    )
    write_run(
        tmp_path / "runs" / "b",
        label="Mine",
        source="Salesforce/blip2-itm-vit-g-coco",
        correct={"test": [[0] * 10]},
        labels=labels,
    )
    code, out, err = run_cli(capsys, "report", tmp_path / "runs", "--out", tmp_path / "report")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "label 'Mine' names two different models" in err and str(tmp_path / "runs" / "a") in err
    assert str(tmp_path / "runs" / "b") in err and not (tmp_path / "report").exists()
    # the same checkpoint under one label, whatever each kind of run hashed (a zero-shot run hashes every file)
    (tmp_path / "runs" / "b").rename(tmp_path / "other")
    write_run(
        tmp_path / "runs" / "c",
        label="Mine",
        mode="unfrozen",
        weights="c" * 64,
        source="Salesforce/blip2-itm-vit-g",
        correct={"test": [[0] * 10]},
        labels=labels,
    )
    code, out, err = run_cli(capsys, "report", tmp_path / "runs", "--out", tmp_path / "report")
    assert code == 0, err


def test_relabelling_a_run_keeps_its_results(tmp_path):
    folder = write_run(tmp_path / "r", label="Old", correct={"test": [[1, 0]]}, labels={"test": [1, 1]})
    before = (folder / "predictions" / "test.jsonl").read_bytes()
    assert MetricsRecord.relabel(folder, None).label == "Old"  # no label given: the stored one stays
    assert MetricsRecord.relabel(folder, "New").label == "New"
    assert load_run(folder).label == "New" and (folder / "predictions" / "test.jsonl").read_bytes() == before


def test_single_class_probes_get_no_kendall_tau(tmp_path):
    n = 240
    categories = [f"c{i % 6}" for i in range(n)]  # 40 examples each; a later category has larger boxes
    labels = {"test": [(i // 6) % 2 for i in range(n)]}  # half of each category true

    def answers(right_per_category: list[int]) -> list[int]:
        """Category k's first right_per_category[k] examples answered right, the others wrong."""
        return [y if i // 6 < right_per_category[i % 6] else 1 - y for i, y in enumerate(labels["test"])]

    def probe(name: str, family: str, mode: str, predicted: list[list[int]]) -> None:
        correct = [[int(p == y) for p, y in zip(row, labels["test"], strict=True)] for row in predicted]
        write_run(
            tmp_path / "runs" / name,
            task="rcm",
            mode=mode,
            family=family,
            correct={"test": correct},
            labels=labels,
            categories=categories,
            predicted={"test": predicted},
        )

    probe("one", "blip2", "frozen", [[1] * n])
    # 99 % ones in each seed: its per-category accuracy is the label rate too
    probe("nearly", "blip2", "unfrozen", [[1] * (n - 2) + [0, 0]] * 2)
    # one seed nearly constant, the other better on larger boxes: not a single-class probe, a significant tau
    probe("mixed", "instructblip", "unfrozen", [[1] * (n - 1) + [0], answers([5, 11, 17, 23, 29, 35])])
    probe("unordered", "instructblip", "frozen", [answers([20, 35, 5, 30, 10, 25])])  # no ranking: p > 0.05
    write_report([tmp_path / "runs"], tmp_path / "report")
    table5 = (tmp_path / "report" / "tables" / "table5.md").read_text()
    assert "the probe predicts a single class" in table5
    # Table 1 marks both single-class probes' accuracies, and says what the mark means
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text().splitlines()
    marked = sorted(line.split(" | ")[:2] for line in table1 if line.rstrip(" |").endswith("‡"))
    assert marked == [["| BLIP-2", "frozen"], ["| BLIP-2", "unfrozen"]]
    assert any(line.startswith("_‡ the probe answers one class for at least 99%") for line in table1)
    lines = table5.splitlines()
    models = "BLIP-2 frozen | BLIP-2 unfrozen | InstructBLIP frozen | InstructBLIP unfrozen"
    assert lines[2] == f"| task | property | {models} |"
    area = next(line for line in lines if line.startswith("| RCM | mean box area |")).rstrip(" |").split(" | ")
    assert area[2:4] == ["single class", "single class"]
    assert area[4].endswith("†") and area[5].startswith("+1.00 (") and not area[5].endswith("†")
    # the dagger marks p > 0.05, and only that
    for line in lines[4:]:
        if line.startswith("| RCM") and "undefined" not in line:
            for tau_cell in line.rstrip(" |").split(" | ")[4:]:
                p_value = float(tau_cell.split("(")[1].split(")")[0])
                assert tau_cell.endswith("†") == (p_value > 0.05), tau_cell


def test_report_folder_ownership(paper_runs, tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    code, out, err = run_cli(capsys, "report", paper_runs, "--out", existing)
    assert code == 2 and "an existing file" in err and existing.read_text() == "x"
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "README.md").write_text("someone else's")
    code, out, err = run_cli(capsys, "report", paper_runs, "--out", foreign)
    assert code == 2 and "no report wrote" in err and "--overwrite" in err
    assert (foreign / "README.md").read_text() == "someone else's"
    code, out, err = run_cli(capsys, "report", paper_runs, "--out", foreign, "--overwrite")
    assert code == 0 and (foreign / "results.csv").is_file()
    # our own report is replaced whole: a table the new report does not make is gone
    ours = tmp_path / "ours"
    write_report([paper_runs], ours)
    assert (ours / "tables" / "paired.md").is_file()
    write_report([paper_runs / "blip2-frozen"], ours)
    assert not (ours / "tables" / "paired.md").exists() and (ours / "tables" / "table1.md").is_file()
    assert not list(tmp_path.glob(".ours*"))  # no staging or old copy left beside it


def test_figures_are_sized_for_a_paper_in_a_local_style(paper_runs, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from probing.report.plots import COLUMN_WIDTH, PAGE_WIDTH, category_figure, house_style, per_layer_figure
    from probing.report.tables import load_runs

    runs, _ = load_runs([paper_runs])
    plt.style.use("ggplot")  # what Optuna's plots do to the whole process
    try:
        ggplot_face = matplotlib.rcParams["axes.facecolor"]
        with house_style():
            assert matplotlib.rcParams["axes.facecolor"] != ggplot_face and matplotlib.rcParams["font.size"] >= 7
        assert matplotlib.rcParams["axes.facecolor"] == ggplot_face  # restored: never global
        written = category_figure(runs, "vsr", tmp_path / "categories")
    finally:
        matplotlib.rcdefaults()
    assert sorted(p.suffix for p in written) == [".pdf", ".png", ".svg"]
    assert per_layer_figure(runs, "vsr", tmp_path / "layers") == []  # one layer: no per-layer curve
    from PIL import Image

    with Image.open(tmp_path / "categories.png") as image:
        width_inches = image.size[0] / 300
    assert COLUMN_WIDTH <= width_inches <= PAGE_WIDTH + 1.0  # page width, plus the labels bbox_inches keeps
    svg = (tmp_path / "categories.svg").read_text()
    assert "n=" in svg  # n under each category
    from probing.report.plots import learning_curve_figure

    curve = learning_curve_figure(load_run(paper_runs / "blip2-frozen"), tmp_path / "curve")  # from the history
    assert sorted(p.suffix for p in curve) == [".pdf", ".png", ".svg"] and "seed 1" in curve[2].read_text()


def test_a_category_without_examples_is_drawn_as_missing(tmp_path):
    from probing.report.plots import category_figure
    from probing.report.tables import load_runs

    labels = {"test": [1] * 14}
    write_run(tmp_path / "runs" / "frozen", correct={"test": [[1, 0] * 7]}, labels=labels)
    fewer = [RELATIONS[i % 6] for i in range(14)]  # no "Unallocated" example
    write_run(
        tmp_path / "runs" / "unfrozen", mode="unfrozen", correct={"test": [[1] * 14]}, labels=labels, categories=fewer
    )
    runs, _ = load_runs([tmp_path / "runs"])
    category_figure(runs, "vsr", tmp_path / "categories")
    svg = (tmp_path / "categories.svg").read_text()
    assert svg.count(">n/a<") == 1  # the unfrozen run's missing category, not a 0 % bar
    # a meta-category no run has an example of is still shown, as missing, n=0 (VSR's list is fixed)
    rare = [RELATIONS[1 + i % 5] for i in range(14)]  # no Adjacency, no Unallocated example
    shutil.rmtree(tmp_path / "runs")
    write_run(tmp_path / "runs" / "frozen", correct={"test": [[1, 0] * 7]}, labels=labels, categories=rare)
    runs, _ = load_runs([tmp_path / "runs"])
    category_figure(runs, "vsr", tmp_path / "rare")
    svg = (tmp_path / "rare.svg").read_text()
    assert svg.count(">n/a<") == 2 and svg.count("n=0") == 2  # Adjacency and Unallocated
    write_report([tmp_path / "runs"], tmp_path / "report")
    table2 = (tmp_path / "report" / "tables" / "table2.md").read_text().splitlines()
    assert table2[2] == "| model | mode | " + " | ".join(RELATIONS) + " |"
    n_row = table2[4].strip("| ").split(" | ")
    assert [n_row[2 + RELATIONS.index(c)] for c in ("Adjacency", "Unallocated")] == ["0", "0"]
    cells = table2[5].strip("| ").split(" | ")
    assert [cells[2 + RELATIONS.index(c)] for c in ("Adjacency", "Unallocated")] == ["–", "–"]
    assert "n = 0: no example of the category" in table2[-1]


def test_figures_keep_legends_off_the_data_text_readable_and_bands_apart(tmp_path, monkeypatch):
    import matplotlib.text

    from probing.report import plots
    from probing.report.tables import load_runs

    labels = {"test": [1] * 14}
    for family in ("blip2", "instructblip"):
        for layer in (2, 4):
            write_run(
                tmp_path / "runs" / f"{family}-{layer}",
                family=family,
                weights=family[0] * 64,
                layer=layer,
                correct={"test": [[1, 0] * 7, [1, 1, 0] * 4 + [1, 0]]},
                labels=labels,
            )
    fewer = [RELATIONS[i % 6] for i in range(14)]  # no Unallocated example: an "n/a" in the figure
    write_run(
        tmp_path / "runs" / "unfrozen", mode="unfrozen", correct={"test": [[1] * 14]}, labels=labels, categories=fewer
    )
    figures = []

    def keep(figure, base):
        figure.canvas.draw()  # lays the figure out as saving does
        figures.append(figure)
        return [base]

    monkeypatch.setattr(plots, "_save", keep)
    runs, _ = load_runs([tmp_path / "runs"])
    with plots.house_style():  # the figures are inspected inside the style they were drawn in
        plots.per_layer_figure(runs, "vsr", tmp_path / "layers")
        plots.category_figure(runs, "vsr", tmp_path / "categories")
    layers, categories = figures
    for figure in figures:
        texts = [t for t in figure.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        assert texts and min(t.get_fontsize() for t in texts) >= plots.MIN_FONT_SIZE
    assert any(t.get_text() == "n/a" for t in categories.findobj(matplotlib.text.Text))
    axes = layers.axes[0]
    legend = axes.get_legend().get_window_extent()
    assert not legend.overlaps(axes.get_window_extent())  # under the axes, off the data
    bands = [c for c in axes.collections if len(c.get_paths())]
    assert len(bands) == 2 and len({(tuple(c.get_facecolor()[0]), c.get_hatch()) for c in bands}) == 2
    legend = categories.legends[0].get_window_extent()
    assert not any(legend.overlaps(panel.get_window_extent()) for panel in categories.axes)


def test_optunas_plots_leave_the_process_style_alone(tmp_path):
    import matplotlib
    import optuna

    from probing.studies.search import _plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: trial.suggest_float("lr", 0, 1) + trial.suggest_float("x", 0, 1), n_trials=4)
    before = dict(matplotlib.rcParams)
    assert _plots(study, tmp_path / "plots") == ["plots/optimization_history.png", "plots/param_importances.png"]
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} <= {"backend"}  # no ggplot style left behind


def test_table4_in_the_papers_layout_and_n_per_category(tmp_path):
    labels = {"test": [1] * 14}
    for mode, lr, epochs in (("frozen", 1e-4, 10), ("unfrozen", 3e-5, 5)):
        search = tmp_path / "runs" / mode
        write_run(search / "best", mode=mode, correct={"test": [[1, 0] * 7]}, labels=labels)
        summary = {
            "task": "vsr",
            "mode": mode,
            "layer": 4,
            "probe": "linear",
            "metric": "accuracy",
            "trials_complete": 3 if mode == "frozen" else 1,
            "trials_total": 3,
            "best": {"number": 1, "params": {"lr": lr, "epochs": epochs}, "val_search": 0.6, "val": {}},
            "trials": [
                {"number": n, "state": "COMPLETE" if mode == "frozen" or n == 1 else "PRUNED", "value": 0.5}
                for n in range(3)
            ],
            "plots": [],
        }
        (search / "summary.json").write_text(json.dumps(summary))
    write_report([tmp_path / "runs"], tmp_path / "report")
    table4 = (tmp_path / "report" / "tables" / "table4.md").read_text().splitlines()
    assert table4[2] == "| task | hyper-parameter | BLIP-2 frozen | BLIP-2 unfrozen |"
    assert table4[4:6] == ["| VSR | learning rate | 1.00e-04 | 3.00e-05 |", "| VSR | epochs | 10 | 5 |"]
    searches = pd.read_csv(tmp_path / "report" / "tables" / "searches.csv").set_index("mode")
    assert searches.loc["frozen", ["trials", "trials_pruned"]].tolist() == [3, 0]
    assert searches.loc["unfrozen", ["trials", "trials_pruned"]].tolist() == [1, 2]  # 2 of 3 stopped early
    assert "| 3 | 0 |" in (tmp_path / "report" / "tables" / "searches.md").read_text()
    table2 = (tmp_path / "report" / "tables" / "table2.md").read_text().splitlines()
    assert table2[4] == "| n | test examples | 2 | 2 | 2 | 2 | 2 | 2 | 2 |"  # 14 examples over 7 meta-categories
    curves = (tmp_path / "report" / "figures" / "learning_curves").rglob("*.png")
    assert sorted(p.relative_to(tmp_path / "report" / "figures").as_posix() for p in curves) == [
        "learning_curves/BLIP-2-frozen/vsr-layer4-linear.png",  # a folder per model and mode
        "learning_curves/BLIP-2-unfrozen/vsr-layer4-linear.png",
    ]


def test_a_store_label_names_the_runs_made_from_it(tiny_checkpoints, refcocog_val, capsys, tmp_path):
    """`probing extract --label` names the model of every run trained on the store without a label of its own;
    extracting again under another label relabels the store in place (nothing recomputed), and a run's own
    --label still wins."""
    features = tmp_path / "features"

    def extract_all(label: str) -> None:
        for split in ("train", "val", "test"):
            code, _, err = run_cli(
                capsys,
                "extract",
                "--model",
                tiny_checkpoints["blip2"],
                "--task",
                "refcocog",
                "--refs",
                refcocog_val.refs,
                "--instances",
                refcocog_val.instances,
                "--images",
                refcocog_val.images,
                "--split",
                split,
                "--layers",
                "4",
                "--workers",
                "0",
                "--label",
                label,
                "--out",
                features / split,
            )
            assert code == 0, err

    def train(out: Path, *label: str) -> None:
        args = ["--task", "refcocog", "--features", features, "--layer", "4", "--lr", "0.01", "--epochs", "1"]
        code, _, err = run_cli(capsys, "train", *args, *label, "--out", out)
        assert code == 0, err

    extract_all("BLIP-2 (COCO-finetuned)")
    assert json.loads((features / "test" / "manifest.json").read_text())["label"] == "BLIP-2 (COCO-finetuned)"
    train(tmp_path / "run")
    assert load_run(tmp_path / "run").label == "BLIP-2 (COCO-finetuned)"
    shards = {p: p.stat().st_mtime_ns for p in features.rglob("*.safetensors")}
    extract_all("BLIP-2 coco")
    assert {p: p.stat().st_mtime_ns for p in features.rglob("*.safetensors")} == shards  # reused, not recomputed
    assert load_run(tmp_path / "run").label == "BLIP-2 coco"
    train(tmp_path / "own", "--label", "mine")
    assert load_run(tmp_path / "own").label == "mine"


def documented_dtypes() -> dict[str, str]:
    """The column types the data dictionary docs/results-csv.md documents, read from its table."""
    page = (Path(__file__).parents[1] / "docs" / "results-csv.md").read_text(encoding="utf-8")
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| `")]
    return {name.strip("| `"): dtype for name, dtype, *_ in rows}


def test_results_csv_reads_back_with_documented_dtypes(paper_runs, tmp_path):
    out = tmp_path / "report"
    write_report([paper_runs], out, compare_paper=True)
    assert documented_dtypes() == RESULT_DTYPES and list(documented_dtypes()) == RESULT_COLUMNS
    text = (out / "results.csv").read_text(encoding="utf-8")
    results = pd.read_csv(out / "results.csv", dtype=documented_dtypes())
    assert results.to_csv(index=False) == text  # the documented types lose nothing
    plain = pd.read_csv(out / "results.csv")  # flags are booleans and integers integers even without dtype=
    assert plain["control"].dtype == bool and plain["single_class"].dtype == bool
    assert "." not in "".join(text.splitlines()[1].split(",")[5:6]) and results["layer"].dropna().eq(4).all()
    assert set(results["against"].dropna()) == {"BLIP-2 frozen", "InstructBLIP frozen"}
    # model ids: the Hub id as given, the local checkpoint folder relative to the report; runs relative too
    assert set(results["model_id"].dropna()) == {
        "Salesforce/blip2-itm-vit-g",
        os.path.relpath("/models/tiny-instructblip", out),
    }
    assert str(tmp_path) not in text and str(paper_runs) not in text
    frozen = results[(results["run"] == os.path.relpath(paper_runs / "blip2-frozen", out))]
    assert len(frozen) > 2 and not frozen["single_class"].any()
    # a probe that answers one class is flagged in its rows, beside the ‡ of its cells
    labels = {"test": [1] * 30 + [0] * 10}
    one_class = write_run(tmp_path / "one", correct={"test": [[1] * 30 + [0] * 10]}, labels=labels)
    write_report([one_class], tmp_path / "one-report")
    flagged = pd.read_csv(tmp_path / "one-report" / "results.csv", dtype=RESULT_DTYPES)
    assert flagged.loc[flagged["run"].notna(), "single_class"].all()
    assert SINGLE_CLASS_MARK in (tmp_path / "one-report" / "tables" / "table1.md").read_text()


def test_latex_tables_are_paste_ready(paper_runs, tmp_path):
    out = tmp_path / "report"
    write_report([paper_runs], out, compare_paper=True)
    table1 = (out / "tables" / "table1.tex").read_text(encoding="utf-8")
    lines = table1.splitlines()
    # booktabs rules, the caption once (LaTeX numbers the table), a label to \ref
    assert [line for line in lines if line in ("\\toprule", "\\midrule", "\\bottomrule")] == [
        "\\toprule",
        "\\midrule",
        "\\bottomrule",
    ]
    assert "\\caption{validation and test accuracy, linear probe on the last layer (\\%)}" in lines
    assert "\\label{tab:table1}" in lines and "Table 1" not in table1
    # labels left, numbers right; the task's splits under one grouped header with its booktabs rule
    assert "\\begin{tabular}{llrr}" in lines
    header = lines.index("\\toprule")
    assert lines[header + 1 : header + 4] == [
        "\\multicolumn{2}{c}{} & \\multicolumn{2}{c}{VSR} \\\\",
        "\\cmidrule(lr){3-4}",
        "model & mode & val (acc) & test (acc) \\\\",
    ]
    for table in sorted((out / "tables").glob("*.tex")):
        source = table.read_text(encoding="utf-8")
        assert max(len(line) for line in source.splitlines()) <= LINE_WIDTH + 20, table.name
        assert f"\\label{{tab:{table.stem}}}" in source and source.count("\\caption{") == 1
    paired = (out / "tables" / "paired.tex").read_text(encoding="utf-8")
    assert "\\begin{tabular}{lllrrrrr}" in paired  # task, first, second; then the numbers
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex: the LaTeX source was checked, not compiled")
    document = tmp_path / "paper.tex"
    inputs = "".join(f"\\input{{{table.as_posix()}}}\n" for table in sorted((out / "tables").glob("*.tex")))
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + inputs + "\\end{document}\n"
    )
    compiled = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compiled.returncode == 0, compiled.stdout[-3000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 0
    assert "Undefined control sequence" not in compiled.stdout and "Unicode character" not in compiled.stdout


def test_figures_have_no_baked_titles_axes_from_the_data_and_a_legend_for_a_one_layer_model(tmp_path, monkeypatch):
    from probing.report import plots
    from probing.report.tables import load_runs

    labels = {"test": [1, 0] * 10}
    for layer, right in ((2, [1] * 11 + [0] * 9), (4, [1] * 13 + [0] * 7)):
        write_run(tmp_path / "runs" / f"blip2-{layer}", layer=layer, correct={"test": [right]}, labels=labels)
    # a model probed on its last layer only (as the random-weights model is): a marker with its CI, in the legend
    write_run(
        tmp_path / "runs" / "instructblip-4",
        family="instructblip",
        weights="i" * 64,
        layer=4,
        correct={"test": [[1] * 12 + [0] * 8]},
        labels=labels,
    )
    figures = []

    def keep(figure, base):
        figures.append(figure)
        return [base]

    monkeypatch.setattr(plots, "_save", keep)
    runs, _ = load_runs([tmp_path / "runs"])
    plots.per_layer_figure(runs, "vsr", tmp_path / "layers")
    plots.category_figure(runs, "vsr", tmp_path / "categories")
    layers, categories = figures
    for figure in figures:  # the paper's caption says what a figure shows
        assert figure._suptitle is None and all(axes.get_title() == "" for axes in figure.axes)
    axes = layers.axes[0]
    assert "InstructBLIP (layer 4 only)" in axes.get_legend_handles_labels()[1]
    assert axes.containers and len(axes.containers[0].lines[0].get_xdata()) == 1  # the one point, with its CI
    ends = [100 * bound for run in runs for bound in (overall(run).low, overall(run).high)]
    low, high = axes.get_ylim()
    assert (low, high) == plots.value_limits(ends[::2], ends[1::2], 0.5) and (low, high) != (0, 100)
    assert low <= min(ends) and high >= max(ends) and low % 10 == 0 and high % 10 == 0
    bands = [c for c in axes.collections if len(c.get_paths()) and c.get_alpha() is not None]
    assert bands and all(band.get_alpha() == plots.BAND_ALPHA and not band.get_hatch() for band in bands)
    shown = [100 * e.high for run in runs for e in per_category(run).values()]
    assert categories.axes[0].get_ylim() == plots.value_limits([0.0], shown, 0.5)  # bars from 0, top from the data
    assert categories.axes[0].get_ylim() == categories.axes[-1].get_ylim()
