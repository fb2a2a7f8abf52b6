"""Analysis numbers against references, and the report's shapes."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_results_hold_every_number
from scipy.stats import kendalltau

from probing.cli.app import main
from probing.core.errors import ProbingError
from probing.data import DataOptions, Example
from probing.report.analysis import RunResults, deduplicate, estimate, kendall, load_run, overall, per_category
from probing.report.plots import category_figure, category_runs, per_layer_figure
from probing.report.tables import PAPER_TABLE1, find_runs, write_report
from probing.store.extract import ExtractionRequest, extract


def hand_made_run(
    accuracies: dict[str, float],
    train: dict[str, int],
    areas: dict[str, float],
    distances: dict[str, float],
    per_category_examples: int = 20,
    seeds: int = 1,
) -> RunResults:
    """A RefCOCOg run whose categories have exactly the given accuracies and properties."""
    categories, metadata, columns = [], [], []
    for category, accuracy in accuracies.items():
        right = round(accuracy * per_category_examples)
        for index in range(per_category_examples):
            categories.append(category)
            metadata.append({"area_fraction": areas[category], "centre_distance": distances[category]})
            columns.append(1.0 if index < right else 0.0)
    correct = np.tile(np.array(columns), (seeds, 1))
    return RunResults(
        path=Path("hand-made"),
        task="refcocog",
        mode="frozen",
        layer=12,
        probe="linear",
        family="blip2",
        init="pretrained",
        label="BLIP-2",
        metric="acc@0.5",
        seeds=list(range(seeds)),
        ids=list(range(len(categories))),
        categories=categories,
        correct=correct,
        metadata=metadata,
        train_categories=train,
    )


def test_kendall_equals_scipy_on_hand_made_tables():
    accuracies = {"animal": 0.8, "food": 0.35, "person": 0.6, "vehicle": 0.7, "kitchen": 0.2}
    train = {"animal": 900, "food": 300, "person": 5000, "vehicle": 1200, "kitchen": 150}
    areas = {"animal": 0.30, "food": 0.05, "person": 0.22, "vehicle": 0.25, "kitchen": 0.04}
    distances = {"animal": 0.10, "food": 0.30, "person": 0.15, "vehicle": 0.12, "kitchen": 0.35}
    result = kendall(hand_made_run(accuracies, train, areas, distances))
    names = sorted(accuracies)
    for prop, values in (("train_examples", train), ("mean_area", areas), ("mean_centre_distance", distances)):
        tau, p_value = kendalltau([accuracies[c] for c in names], [values[c] for c in names])
        assert result[prop].tau == pytest.approx(tau) and result[prop].p_value == pytest.approx(p_value)
    # by hand: areas rank exactly like accuracies (10 concordant pairs of 10), distances exactly opposite
    assert result["mean_area"].tau == pytest.approx(1.0) and result["mean_centre_distance"].tau == pytest.approx(-1.0)
    # train counts: 3 discordant pairs (animal-vehicle, animal-person, vehicle-person) of 10: (7 - 3) / 10
    assert result["train_examples"].tau == pytest.approx(0.4)
    assert result["mean_area"].significant and result["mean_area"].p_value <= 0.05


def test_kendall_needs_three_categories():
    run = hand_made_run({"a": 0.5, "b": 0.4}, {"a": 1, "b": 2}, {"a": 0.1, "b": 0.2}, {"a": 0.1, "b": 0.2})
    with pytest.raises(ProbingError, match="at least 3 categories"):
        kendall(run)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10000):
        correct = (rng.random(n) < 0.7).astype(float)
        result = estimate(correct, seed=1)
        assert result.low <= result.mean <= result.high
        assert result.mean == pytest.approx(correct.mean())
        widths.append(result.high - result.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / 1000), rel=0.15)  # the normal approximation
    assert estimate(correct, seed=1) == estimate(correct, seed=1)  # seeded


def test_seed_averages_and_spread():
    correct = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=float)  # accuracies .5, .25, .75
    result = estimate(correct)
    assert result.mean == pytest.approx(0.5) and result.seeds == 3 and result.examples == 4
    assert result.seed_std == pytest.approx(0.25)
    assert estimate(correct[:1]).seed_std is None


def test_per_category_splits_examples():
    run = hand_made_run({"a": 0.5, "b": 1.0, "c": 0.0}, {}, {k: 0.1 for k in "abc"}, {k: 0.1 for k in "abc"})
    result = per_category(run)
    assert {k: v.mean for k, v in result.items()} == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert all(v.examples == 20 for v in result.values())


@pytest.fixture(scope="module")
def runs_folder(tiny_checkpoints, demo_options, tmp_path_factory):
    """Real run folders: both tiny models, frozen at two layers and unfrozen, VSR and RefCOCOg, 2 seeds."""
    root = tmp_path_factory.mktemp("report")
    options = {
        "vsr": DataOptions(task="vsr", **demo_options["vsr"]),
        "refcocog": DataOptions(task="refcocog", **demo_options["refcocog"]),
    }
    for family in ("blip2", "instructblip"):
        for task, task_options in options.items():
            for split in ("train", "val", "test"):
                extract(
                    ExtractionRequest(
                        model=str(tiny_checkpoints[family]),
                        data=task_options,
                        split=split,
                        out=root / "features" / family / task / split,
                        workers=0,
                        progress=False,
                        store_vision=True,
                    )
                )
            common = [
                "--task",
                task,
                "--features",
                root / "features" / family / task,
                "--lr",
                3e-3,
                "--epochs",
                2,
                "--device",
                "cpu",
            ]
            for layer in (2, 4):
                assert (
                    cli(
                        [
                            "train",
                            *common,
                            "--layer",
                            layer,
                            "--seeds",
                            "0,1",
                            "--out",
                            root / "runs" / f"{family}-{task}-frozen-{layer}",
                        ]
                    )
                    == 0
                )
            assert (
                cli(
                    [
                        "train",
                        *common,
                        "--layer",
                        4,
                        "--mode",
                        "unfrozen",
                        "--model",
                        tiny_checkpoints[family],
                        "--batch-size",
                        32,
                        *data_args(task_options),
                        "--out",
                        root / "runs" / f"{family}-{task}-unfrozen-4",
                    ]
                )
                == 0
            )
    return root / "runs"


def data_args(options: DataOptions) -> list:
    return [
        item
        for key in ("refs", "instances", "images", "vsr")
        if getattr(options, key)
        for item in (f"--{key}", getattr(options, key))
    ]


def cli(args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_report_has_the_papers_shapes(runs_folder, tmp_path, capsys):
    assert len(find_runs([runs_folder])) == 12
    code = cli(["report", runs_folder, "--out", tmp_path / "report", "--compare-paper"])
    assert code == 0
    report = tmp_path / "report"
    table1 = (report / "tables" / "table1.md").read_text().splitlines()
    assert table1[2] == (
        "| model | mode | RefCOCOg val (Acc@0.5) | RefCOCOg test (Acc@0.5) | VSR val (acc) | VSR test (acc) |"
    )
    cells = [line.strip("| ").split(" | ") for line in table1[4:] if line.startswith("|")]
    rows = [f"{row[0]}/{row[1]}" for row in cells]
    assert rows == [
        "BLIP-2/frozen",
        "BLIP-2/unfrozen",
        "InstructBLIP/frozen",
        "InstructBLIP/unfrozen",
        "Chance/majority class",
    ]
    # tiny local checkpoints are not the paper's: no paper rows, and a line says why
    assert "no paper rows beside BLIP-2, InstructBLIP" in "\n".join(table1)
    assert cells[-1][2:4] == ["–", "–"]  # box regression has no single chance level
    assert PAPER_TABLE1[("BLIP-2", "frozen")]["refcocog"] == 30.26
    assert "±" in table1[4] and "[" in table1[4]  # CI and seed spread on frozen rows (2 seeds)
    table2 = (report / "tables" / "table2.md").read_text().splitlines()
    assert table2[2].startswith("| model | mode | ") and "Projective" in table2[2]
    table5 = (report / "tables" / "table5.md").read_text().splitlines()
    assert table5[2] == (
        "| task | property | BLIP-2 frozen | BLIP-2 unfrozen | InstructBLIP frozen | InstructBLIP unfrozen |"
    )
    assert [line.split(" | ")[1] for line in table5[4:7]] == [
        "train examples",
        "mean box area",
        "mean centre distance",
    ]
    assert assert_results_hold_every_number(report) > 200  # Table 5's tau and p, the searches ... too
    per_layer = (report / "tables" / "per_layer.md").read_text()
    assert "| BLIP-2 | 2 |" in per_layer and "| BLIP-2 | 4 |" in per_layer
    records = list(csv.DictReader(io.StringIO((report / "tables" / "table1.csv").read_text())))
    assert list(records[0])[:3] == ["model", "mode", "layer"] and "ci_low" in records[0]
    families = {"BLIP-2": "blip2", "InstructBLIP": "instructblip"}
    ours = [r for r in records if r["model"] in families and r["split"] == "test"]
    assert len(ours) == 8  # 2 models x 2 modes x 2 tasks
    for record in ours:  # every cell shows the run it should: the last layer (4) of that model, mode and task
        run = load_run(runs_folder / f"{families[record['model']]}-{record['task']}-{record['mode']}-4")
        assert float(record["mean"]) == pytest.approx(overall(run).mean) and record["layer"] == "4"
    readme = (report / "README.md").read_text()
    assert "![per_layer_vsr](figures/per_layer_vsr.png)" in readme and "### Table 1" in readme
    for name in ("per_layer_vsr", "categories_refcocog", "categories_vsr"):
        for suffix in (".pdf", ".png", ".svg"):
            assert (report / "figures" / f"{name}{suffix}").stat().st_size > 5_000


def test_analyze_command(runs_folder, capsys):
    code = cli(["analyze", runs_folder / "blip2-refcocog-frozen-4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["task"] == "refcocog" and result["test"]["seeds"] == 2
    assert set(result["kendall"]) == {"train_examples", "mean_area", "mean_centre_distance"}
    assert sum(result["category_properties"][c]["train_examples"] for c in result["category_properties"]) > 0
    code = cli(["analyze", runs_folder / "blip2-vsr-unfrozen-4"])
    out = capsys.readouterr().out
    assert code == 0 and "BLIP-2 unfrozen vsr layer 4" in out and "Projective" in out
    assert cli(["analyze", runs_folder]) == 2


def test_figures_and_reports_pick_runs_deterministically(runs_folder, tmp_path):
    runs = [load_run(path) for path in find_runs([runs_folder])]
    chosen = category_runs(runs, "refcocog")  # given layers 2 and 4, a category figure draws layer 4
    assert sorted((r.label, r.mode, r.layer) for r in chosen) == [
        ("BLIP-2", "frozen", 4),
        ("BLIP-2", "unfrozen", 4),
        ("InstructBLIP", "frozen", 4),
        ("InstructBLIP", "unfrozen", 4),
    ]
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs_folder, copy)
    shutil.copytree(copy / "blip2-vsr-frozen-4", copy / "again" / "blip2-vsr-frozen-4")  # the same run twice
    shutil.copytree(copy / "blip2-vsr-frozen-4", copy / ".half.partial-1" / "best")  # a half-written search
    found = find_runs([copy])
    assert len(found) == 13 and not any(".partial" in str(p) for p in found)
    kept, dropped = deduplicate([load_run(p) for p in found])
    assert len(kept) == 12 and [d.path for d in dropped] == [copy / "blip2-vsr-frozen-4"]  # by path order
    written = write_report([copy], tmp_path / "report")
    assert written["dropped"] == 1 and "repeat a kept configuration" in (tmp_path / "report" / "README.md").read_text()


def test_binary_predictions_agree_with_the_metric():
    from probing.tasks.heads import BinaryHead

    outputs = torch.tensor([[1e-8], [-1e-8], [3.0], [-2.0]])  # sigmoid rounds the first two to exactly 0.5
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    examples = [
        Example(example_id=i, image_id=i, image_path=Path("x.jpg"), text="t", category="c", label=int(y))
        for i, y in enumerate(labels.tolist())
    ]
    records = BinaryHead().records("test", 0, examples, outputs, labels)
    assert [r["correct"] for r in records] == [True, True, False, True]
    assert sum(r["correct"] for r in records) / 4 == BinaryHead().metrics(outputs, labels)["accuracy"].item()
    assert [r["predicted"] for r in records] == [1, 0, 1, 0]


def test_plot_functions_write_files(runs_folder, tmp_path):
    runs = [load_run(path) for path in find_runs([runs_folder])]
    written = per_layer_figure(runs, "vsr", tmp_path / "layers")
    written += category_figure(runs, "refcocog", tmp_path / "categories")
    assert sorted(p.suffix for p in written) == [".pdf", ".pdf", ".png", ".png", ".svg", ".svg"]
    assert all(p.stat().st_size > 5_000 for p in written)
    assert per_layer_figure(runs, "rcm", tmp_path / "none") == []  # no RCM runs: no figure
