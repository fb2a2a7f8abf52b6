"""Tasks defined only by a YAML file, jsonl splits and JPEGs: data stats -> extract -> search -> report."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli
from PIL import Image

from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.tasks import get_task, load_split
from probing.tasks.yaml_task import stable_image_id

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
SPLITS = {"train": 48, "val": 16, "test": 16}


def write_images_and_records(root: Path, seed: int = 0) -> dict[str, list[dict]]:
    """Images with one coloured square each; per split, records that name the square's colour and where it is
    (as an xywh pixel box), and a caption that is true or false about its side."""
    rng = np.random.default_rng(seed)
    (root / "pictures").mkdir(parents=True)
    records: dict[str, list[dict]] = {}
    index = 0
    for split, count in SPLITS.items():
        records[split] = []
        for _ in range(count):
            width, height = (96, 64) if index % 2 else (64, 96)
            side = int(rng.integers(16, 28))
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            colour = list(COLOURS)[index % 3]
            pixels = np.full((height, width, 3), 235, dtype=np.uint8)
            pixels[y : y + side, x : x + side] = COLOURS[colour]
            name = f"img_{index:04d}.jpg"
            Image.fromarray(pixels).save(root / "pictures" / name, quality=95)
            left = x + side / 2 < width / 2
            claim = bool(rng.integers(0, 2))
            records[split].append(
                {
                    "file": f"{name}",
                    "expr": f"the {colour} square",
                    "bbox_xywh": [x, y, side, side],
                    "group": colour,
                    "sentence": f"The {colour} square is on the {'left' if claim == left else 'right'}.",
                    "truth": 1,
                    "kind": "left" if left else "right",
                    "note": "synthetic",
                }
            )
            # a false twin: the other side
            records[split].append(
                {
                    **records[split][-1],
                    "truth": 0,
                    "sentence": f"The {colour} square is on the {'right' if claim == left else 'left'}.",
                }
            )
            index += 1
    return records


@pytest.fixture(scope="module")
def yaml_tasks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("yaml-task")
    records = write_images_and_records(root)
    for split, rows in records.items():
        with open(root / f"{split}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    binary = {
        "name": "whats-up",
        "kind": "binary",
        "title": "What's up",
        "splits": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
        "images": "pictures",
        "fields": {"image": "file", "text": "sentence", "label": "truth", "category": "kind"},
        "search": {"epochs": [3, 5]},
    }
    box = {
        "name": "squares",
        "kind": "box",
        "splits": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
        "images": "pictures",
        "fields": {"image": "file", "text": "expr", "box": "bbox_xywh", "category": "group"},
        "box_format": "xywh",
        "box_units": "pixels",
        "search": {"epochs": [4], "lr": [0.001, 0.01]},
    }
    paths = {}
    for spec in (binary, box):
        paths[spec["name"]] = root / f"{spec['name']}.yaml"
        paths[spec["name"]].write_text(yaml.safe_dump(spec, sort_keys=False))
    return paths


def test_a_yaml_task_is_read_with_its_own_field_names(yaml_tasks):
    spec = get_task(str(yaml_tasks["squares"]))
    assert spec.name == "squares" and spec.head.kind == "box" and spec.splits == ("train", "val", "test")
    assert spec.search_space.epochs == (4,) and spec.search_space.lr == (0.001, 0.01)
    assert spec.search_space.giou_scale[:3] == (1, 2, 4)  # the rest of the default box space
    data = load_split(DataOptions(task=str(yaml_tasks["squares"])), "val")
    rows = [json.loads(line) for line in (yaml_tasks["squares"].parent / "val.jsonl").read_text().splitlines()]
    for example, row in zip(data.examples, rows, strict=True):
        x, y, w, h = row["bbox_xywh"]
        width, height = Image.open(example.image_path).size
        assert example.box == pytest.approx((x / width, y / height, (x + w) / width, (y + h) / height))
        assert example.text == row["expr"] and example.category == row["group"]
        assert example.image_id == stable_image_id(row["file"]) and example.metadata["note"] == "synthetic"
        assert example.metadata["area_fraction"] == pytest.approx(w * h / (width * height))
    assert [e.example_id for e in data.examples] == list(range(len(rows)))  # line numbers
    binary = load_split(DataOptions(task=str(yaml_tasks["whats-up"])), "train")
    assert {e.label for e in binary.examples} == {0, 1} and binary.examples[0].category in ("left", "right")
    # the fingerprint covers the YAML file and the split's file
    assert set(binary.sources) == {"task_file", "examples"}


def test_yaml_task_through_stats_extract_search_and_report(capsys, yaml_tasks, tiny_checkpoints, tmp_path):
    task = str(yaml_tasks["whats-up"])
    code, out, err = run_cli(capsys, "data", "stats", "--task", task, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["task"] == "whats-up"
    assert {split: values["examples"] for split, values in stats["splits"].items()} == {
        split: 2 * count for split, count in SPLITS.items()
    }
    assert stats["splits"]["train"]["labels"] == {"1": SPLITS["train"], "0": SPLITS["train"]}
    for split in SPLITS:
        code, _, err = run_cli(
            capsys,
            "extract",
            "--model",
            tiny_checkpoints["blip2"],
            "--task",
            task,
            "--split",
            split,
            "--layers",
            "2,4",
            "--workers",
            0,
            "--out",
            tmp_path / "f" / split,
        )
        assert code == 0, err
    code, out, err = run_cli(
        capsys,
        "search",
        "--task",
        task,
        "--features",
        tmp_path / "f",
        "--layer",
        4,
        "--trials",
        3,
        "--batch",
        3,
        "--lr-range",
        "1e-3,1e-1",
        "--device",
        "cpu",
        "--out",
        tmp_path / "search",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["task"] == "whats-up" and {t["param_epochs"] for t in summary["trials"]} <= {3, 5}
    manifest = json.loads((tmp_path / "search" / "best" / "manifest.json").read_text())
    assert manifest["task"] == "whats-up" and manifest["task_file"] == str(yaml_tasks["whats-up"].resolve())
    code, out, err = run_cli(capsys, "report", tmp_path / "search", "--out", tmp_path / "report")
    assert code == 0, err
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text()
    assert "| model | mode | What's up val (acc) | What's up test (acc) |" in table1
    categories = (tmp_path / "report" / "tables" / "categories_whats-up.md").read_text()
    assert "What's up accuracy per kind" in categories and "| left | right |" in categories
    code, out, err = run_cli(capsys, "analyze", tmp_path / "search", "--json")
    assert code == 0, err
    analysis = json.loads(out)
    assert analysis["task"] == "whats-up" and 0 <= analysis["roc_auc"]["mean"] <= 1


def test_a_yaml_box_task_runs_from_a_config(capsys, yaml_tasks, tiny_checkpoints, tmp_path):
    config = {
        "name": "squares",
        "workspace": str(tmp_path / "w"),
        "device": "cpu",
        "models": {"tiny": {"model": str(tiny_checkpoints["blip2"])}},
        "extract": {"workers": 0},
        "experiments": [
            {
                "name": "main",
                "tasks": [str(yaml_tasks["squares"])],
                "models": ["tiny"],
                "search": {"trials": 2, "batch": 2, "space": {"squares": {"giou_scale": [2], "l1_scale": [5]}}},
            }
        ],
    }
    path = tmp_path / "squares.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", path)
    assert code == 0, err
    assert (tmp_path / "w" / "runs" / "main" / "tiny" / "squares" / "frozen" / "layer4-linear" / "best").is_dir()
    table1 = (tmp_path / "w" / "report-squares" / "tables" / "table1.md").read_text()
    assert "| model | mode | squares val (Acc@0.5) | squares test (Acc@0.5) |" in table1
    table5 = (tmp_path / "w" / "report-squares" / "tables" / "table5.md").read_text()
    assert "| task | property | tiny frozen |" in table5 and "| squares | mean box area |" in table5  # Kendall applies
    summary = json.loads(next((tmp_path / "w" / "runs").rglob("summary.json")).read_text())
    assert {(t["param_giou_scale"], t["param_l1_scale"]) for t in summary["trials"]} == {(2, 5)}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"kind": "regression"}, "line 2: field 'kind': expected box or binary, got 'regression'"),
        ({"name": "../up"}, "line 1: field 'name': '../up' is not a task name"),
        ({"fields": {"image": "file", "text": "sentence"}}, "field 'fields': missing 'label'"),
        ({"splits": {"train": "train.jsonl", "test": "test.jsonl"}}, "field 'splits': missing split 'val'"),
        ({"colour": "red"}, "field 'colour': unknown field (allowed: name, kind, splits"),
        ({"search": {"epochs": [0]}}, "field 'search': search space: epochs must be positive integers"),
        ({"search": {"depth": [1]}}, "field 'search': unknown search dimension 'depth'"),
    ],
)
def test_yaml_task_errors_name_the_file_line_and_field(capsys, yaml_tasks, tmp_path, change, message):
    spec = yaml.safe_load(yaml_tasks["whats-up"].read_text()) | change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, _, err = run_cli(capsys, "tasks", "--task", path)
    assert code == 2 and err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1


def test_bad_records_and_a_duplicated_key_are_one_line(yaml_tasks, tmp_path):
    folder = yaml_tasks["squares"].parent
    text = (
        yaml_tasks["squares"]
        .read_text()
        .replace("pictures", str(folder / "pictures"))
        .replace("name: squares", "name: damaged-squares")
    )  # one name, one task definition per process
    rows = [json.loads(line) for line in (folder / "val.jsonl").read_text().splitlines()]
    for split in SPLITS:
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "squares.yaml").write_text(text)
    rows[2]["bbox_xywh"] = [5, 5, 0, 10]  # an empty box
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ProbingError, match=r"val.jsonl: line 3: field 'bbox_xywh' \(box\) \[5, 5, 0, 10\] is empty"):
        load_split(DataOptions(task=str(tmp_path / "squares.yaml")), "val")
    del rows[2]["expr"]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ProbingError, match=r"val.jsonl: line 3: missing field 'expr' \(text\)"):
        load_split(DataOptions(task=str(tmp_path / "squares.yaml")), "val")
    (tmp_path / "twice.yaml").write_text("name: a\nkind: box\nname: b\n")
    with pytest.raises(ProbingError, match=r"twice.yaml: line 3: field 'name' is given twice"):
        get_task(str(tmp_path / "twice.yaml"))


def test_a_yaml_task_cannot_take_a_built_in_name(yaml_tasks, tmp_path):
    spec = yaml.safe_load(yaml_tasks["whats-up"].read_text()) | {"name": "vsr"}
    (tmp_path / "vsr.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ProbingError, match=r"task 'vsr' from .*vsr.yaml is already registered \(from built-in\)"):
        get_task(str(tmp_path / "vsr.yaml"))


def test_probing_tasks_lists_every_registered_task(capsys, yaml_tasks):
    code, out, err = run_cli(capsys, "tasks", "--json", "--task", yaml_tasks["whats-up"])
    assert code == 0, err
    listed = {task["name"]: task for task in json.loads(out)["tasks"]}
    assert {"refcocog", "vsr", "rcm", "refcocog-google", "refcoco", "refcoco+", "vsr-zeroshot", "whats-up"} <= set(
        listed
    )
    assert listed["refcoco"]["splits"] == ["train", "val", "testA", "testB"] and listed["refcoco"]["head"] == "box"
    assert listed["refcocog"]["metric"] == "acc@0.5" and listed["vsr"]["metric"] == "accuracy"
    assert listed["rcm"]["patience"] == 10 and listed["vsr"]["search_space"]["epochs"] == [3, 5, 10, 15, 20]
    assert listed["whats-up"]["data_options"] == [] and listed["whats-up"]["head"] == "binary"
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "refcoco+" in out and "--refs --instances --images" in out
