"""`probing train` end to end on the demo data: outputs, reuse, refusals, unfrozen training."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extract_splits, run_cli
from safetensors.torch import load_file

from probing.data import DataOptions
from probing.data.rcm import build_rcm
from probing.probes.modules import Probe
from probing.store.features import FeatureStore
from probing.tasks import load_split
from probing.tasks.losses import predicted_boxes


@pytest.fixture(scope="module")
def stores(tiny_checkpoints, demo_options, tmp_path_factory):
    """Feature stores (all layers, with ViT outputs) of the tiny BLIP-2 for the three tasks."""
    root = tmp_path_factory.mktemp("runs")
    refcocog = demo_options["refcocog"]
    build_rcm(refcocog["refs"], refcocog["instances"], root / "rcm")
    options = {
        "refcocog": DataOptions(task="refcocog", **refcocog),
        "vsr": DataOptions(task="vsr", **demo_options["vsr"]),
        "rcm": DataOptions(task="rcm", rcm=root / "rcm", images=refcocog["images"]),
    }
    for task, task_options in options.items():
        extract_splits(tiny_checkpoints["blip2"], task_options, root / task, layers="all", store_vision=True)
    return root, options


def test_frozen_run_writes_metrics_predictions_and_weights(capsys, stores, tmp_path):
    root, options = stores
    code, out, err = run_cli(
        capsys,
        "train",
        "--task",
        "refcocog",
        "--features",
        root / "refcocog",
        "--layer",
        4,
        "--lr",
        1e-3,
        "--epochs",
        3,
        "--seeds",
        "0,1,2",
        "--giou-scale",
        2,
        "--l1-scale",
        5,
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "val  acc@0.5" in out and "+-" in out and "(3 seed(s))" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "acc@0.5" and [r["seed"] for r in metrics["runs"]] == [0, 1, 2]
    values = [r["test"]["acc@0.5"] for r in metrics["runs"]]
    assert metrics["summary"]["test"]["acc@0.5"]["mean"] == pytest.approx(sum(values) / 3)
    assert set(metrics["runs"][0]["val"]) == set(metrics["runs"][0]["test"]) == {"loss", "acc@0.5", "mean_iou"}
    assert [h["epoch"] for h in metrics["runs"][0]["history"]] == [1, 2, 3]
    predictions = (tmp_path / "run" / "predictions" / "test.jsonl").read_text().splitlines()
    test_lines = [json.loads(line) for line in predictions]
    store_ids = FeatureStore(root / "refcocog" / "test").ids
    assert len(test_lines) == 3 * len(store_ids) and [r["id"] for r in test_lines if r["seed"] == 0] == store_ids
    first = test_lines[0]
    assert {
        "category",
        "iou",
        "correct",
        "predicted_xyxy",
        "target_xyxy",
        "supercategory",
        "area_fraction",
        "centre_distance",
    } <= set(first)
    seed0 = [r for r in test_lines if r["seed"] == 0]
    assert sum(r["correct"] for r in seed0) / len(seed0) == pytest.approx(metrics["runs"][0]["test"]["acc@0.5"])
    # the saved weights reproduce the predictions
    weights = load_file(tmp_path / "run" / "probes" / "seed-0.safetensors")
    probe = Probe("linear", 4 * 24, 4, 768)
    probe.load_state_dict(weights)
    with torch.no_grad():
        boxes = predicted_boxes(probe(FeatureStore(root / "refcocog" / "test").load(4).float().flatten(1)))
    assert torch.allclose(boxes, torch.tensor([r["predicted_xyxy"] for r in seed0]), atol=1e-5)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["layer"] == 4 and manifest["trials"][1]["seed"] == 1 and manifest["trials"][0]["giou_scale"] == 2


def test_a_run_is_reused_or_refused(capsys, stores, tmp_path):
    root, _ = stores
    args = [
        "train",
        "--task",
        "vsr",
        "--features",
        root / "vsr",
        "--layer",
        2,
        "--lr",
        1e-3,
        "--epochs",
        2,
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
    ]
    assert run_cli(capsys, *args)[0] == 0
    stamp = (tmp_path / "run" / "metrics.json").stat().st_mtime_ns
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "already there" in out and (tmp_path / "run" / "metrics.json").stat().st_mtime_ns == stamp
    changed = [a if a != 2 else 3 for a in args]  # another layer
    code, _, err = run_cli(capsys, *changed)
    assert code == 2 and "holds a probe run made with a different 'layer'" in err


def test_vsr_and_rcm_predictions_carry_their_categories(capsys, stores, tmp_path):
    root, _ = stores
    for task, fields in (
        ("vsr", {"relation", "meta_category", "label", "probability"}),
        ("rcm", {"cell", "true_cell", "supercategory", "label"}),
    ):
        code, _, err = run_cli(
            capsys,
            "train",
            "--task",
            task,
            "--features",
            root / task,
            "--layer",
            4,
            "--lr",
            1e-3,
            "--epochs",
            2,
            "--out",
            tmp_path / task,
            "--device",
            "cpu",
        )
        assert code == 0, err
        record = json.loads((tmp_path / task / "predictions" / "val.jsonl").read_text().splitlines()[0])
        assert fields <= set(record)
    rcm_manifest = json.loads((tmp_path / "rcm" / "manifest.json").read_text())
    assert rcm_manifest["settings"]["patience"] == 10  # RCM's default early stopping


def test_mismatched_inputs_are_one_line(capsys, stores, tmp_path):
    root, options = stores
    base = ["--layer", 4, "--lr", 1e-3, "--epochs", 1, "--device", "cpu"]
    code, _, err = run_cli(capsys, "train", "--task", "rcm", "--features", root / "vsr", *base, "--out", tmp_path / "a")
    assert code == 2 and err == f"error: {root / 'vsr' / 'train'}: features of task 'vsr', not 'rcm'\n"
    mixed = tmp_path / "mixed"
    for split in ("train", "val", "test"):
        shutil.copytree(root / "vsr" / ("val" if split == "test" else split), mixed / split)
    code, _, err = run_cli(capsys, "train", "--task", "vsr", "--features", mixed, *base, "--out", tmp_path / "b")
    assert code == 2 and err == f"error: {mixed / 'test'}: features of split 'val', not 'test'\n"
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--features",
        root / "vsr",
        "--layer",
        7,
        "--lr",
        1e-3,
        "--epochs",
        1,
        "--out",
        tmp_path / "c",
    )
    assert code == 2 and err == f"error: {root / 'vsr' / 'train'}: layer 7 is not in the store (it has [1, 2, 3, 4])\n"
    # targets from other data than the features were made from
    other = tmp_path / "other-vsr"
    shutil.copytree(options["vsr"].vsr, other)
    with open(other / "train.jsonl", "a") as handle:
        handle.write((options["vsr"].vsr / "train.jsonl").read_text().splitlines()[0] + "\n")
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--features",
        root / "vsr",
        *base,
        "--vsr",
        other,
        "--images",
        options["vsr"].images,
        "--out",
        tmp_path / "d",
    )
    assert code == 2 and err.startswith(f"error: {root / 'vsr' / 'train'}: features were made from other data")
    # a label missing from the data files (train as extracted, so that the val split is where it fails)
    shutil.copy(options["vsr"].vsr / "train.jsonl", other / "train.jsonl")
    lines = (other / "dev.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    del record["label"]
    lines[3] = json.dumps(record)
    (other / "dev.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--features",
        root / "vsr",
        *base,
        "--vsr",
        other,
        "--images",
        options["vsr"].images,
        "--out",
        tmp_path / "e",
    )
    assert code == 2 and err == f"error: {other / 'dev.jsonl'}: line 4: missing field 'label'\n"
    assert not any((tmp_path / name).exists() for name in "abcde")
    code, _, err = run_cli(capsys, "train", "--task", "vsr", *base, "--out", tmp_path / "f")
    assert code == 2 and err == "error: --features is required for --mode frozen\n"
    code, _, err = run_cli(
        capsys, "train", "--task", "vsr", "--features", root / "vsr", *base, "--seeds", "1,x", "--out", tmp_path / "g"
    )
    assert code == 2 and err.startswith("error: --seeds: '1,x' is not")


def test_unfrozen_training_runs_and_its_loss_falls(capsys, stores, tiny_checkpoints, tmp_path):
    root, options = stores
    vsr = options["vsr"]
    common = [
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        tiny_checkpoints["blip2"],
        "--vsr",
        vsr.vsr,
        "--images",
        vsr.images,
        "--layer",
        3,
        "--lr",
        3e-3,
        "--epochs",
        8,
        "--batch-size",
        32,
        "--device",
        "cpu",
    ]
    code, out, err = run_cli(capsys, *common, "--out", tmp_path / "pixels")
    assert code == 0, err
    metrics = json.loads((tmp_path / "pixels" / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["runs"][0]["history"]]
    assert losses[-1] < 0.95 * losses[0]  # the Q-Former and probe learn on the training set
    code, _, err = run_cli(capsys, *common, "--features", root / "vsr", "--out", tmp_path / "stored")
    assert code == 0, err
    stored = json.loads((tmp_path / "stored" / "metrics.json").read_text())
    # ViT outputs read from the vision store give the same training as recomputing the ViT (up to the rounding
    # of a different batch composition in the ViT: extraction batches vs training batches)
    assert [h["train_loss"] for h in stored["runs"][0]["history"]] == pytest.approx(losses, rel=1e-5)
    manifest = json.loads((tmp_path / "stored" / "manifest.json").read_text())
    assert manifest["mode"] == "unfrozen" and manifest["vision_store"] is True
    assert manifest["inputs"]["model"]["family"] == "blip2"


def test_unfrozen_refuses_a_vision_store_of_another_model(capsys, stores, tiny_checkpoints, tmp_path):
    root, options = stores
    vsr = options["vsr"]
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        tiny_checkpoints["instructblip"],
        "--vsr",
        vsr.vsr,
        "--images",
        vsr.images,
        "--features",
        root / "vsr",
        "--layer",
        2,
        "--lr",
        1e-3,
        "--epochs",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "ViT outputs made by another model" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--layer",
        2,
        "--lr",
        1e-3,
        "--epochs",
        1,
        "--out",
        tmp_path / "y",
    )
    assert code == 2 and err == "error: --mode unfrozen needs --model and the task's data options\n"


def test_unfrozen_training_under_accelerate_launch(stores, tiny_checkpoints, tmp_path):
    """`accelerate launch` with 2 processes (DDP over gloo): both train, the first alone evaluates and writes the
    run, and the validation figures gathered from both processes each epoch equal the written predictions'."""
    _, options = stores
    refcocog = options["refcocog"]
    args = [
        "train",
        "--task",
        "refcocog",
        "--mode",
        "unfrozen",
        "--model",
        tiny_checkpoints["blip2"],
        "--refs",
        refcocog.refs,
        "--instances",
        refcocog.instances,
        "--images",
        refcocog.images,
        "--layer",
        2,
        "--lr",
        3e-3,
        "--epochs",
        2,
        "--batch-size",
        16,
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    ]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "probing",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run written") == 1  # one process reports, none collides with the other
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())["runs"][0]
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "val.jsonl").read_text().splitlines()]
    assert len(records) == len(load_split(refcocog, "val").examples)
    # the best epoch's gathered validation (both halves) = the restored model's predictions on all of val
    assert run["val"]["mean_iou"] == pytest.approx(sum(r["iou"] for r in records) / len(records), abs=1e-5)
