"""docs/extending.md's examples, run as written: a task from YAML, and plug-ins that add a task with a new head, a
probe, a table and a backend with no edit to the package."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import extract_splits

from probing.data import DataOptions

DOCS = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), flags=re.S)


def plugin_source(name: str) -> str:
    """The code blocks that make up one file of the page (its first block and those marked continued)."""
    return "\n".join(block for block in blocks("python") if block.startswith(f"# {name}"))


def probing(*args, plugins: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    environment = os.environ | {"PROBING_PLUGINS": ",".join(map(str, plugins))}
    return subprocess.run(
        [sys.executable, "-m", "probing", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=600,
    )


def test_the_yaml_task_of_the_page(tmp_path):
    from PIL import Image

    spec = yaml.safe_load(blocks("yaml")[0])
    folder = tmp_path / "my-data"
    (folder / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for index in range(4):
                name = f"{split}-{index}.jpg"
                Image.new("RGB", (16, 12), (index * 40, 80, 120)).save(folder / "images" / name)
                handle.write(
                    json.dumps(
                        {
                            "image": name,
                            "caption": f"a caption {index}",
                            "label": index % 2,
                            "relation": "above" if index < 2 else "below",
                        }
                    )
                    + "\n"
                )
    (folder / "whats-up.yaml").write_text(yaml.safe_dump(spec))
    # in a process of its own, as a user runs it (this session registers another task named whats-up)
    result = probing("data", "stats", "--task", folder / "whats-up.yaml", "--json", plugins=[], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["task"] == "whats-up" and stats["splits"]["val"]["categories"] == {"above": 2, "below": 2}


@pytest.fixture(scope="module")
def refcocog_stores(tiny_checkpoints, demo_options, tmp_path_factory):
    options = DataOptions(task="refcocog", **demo_options["refcocog"])
    return extract_splits(tiny_checkpoints["blip2"], options, tmp_path_factory.mktemp("extending"), layers="2,4")


def test_a_plugin_adds_a_task_with_a_new_head_a_probe_and_a_table(refcocog_stores, demo_options, tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(plugin_source("my_plugin.py"))
    listed = probing("tasks", "--json", plugins=[plugin], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    task = next(t for t in json.loads(listed.stdout)["tasks"] if t["name"] == "refcocog-centre")
    assert task["head"] == "centre" and task["direction"] == "minimize" and task["metric"] == "centre_error"
    data = demo_options["refcocog"]
    runs = tmp_path / "runs"
    for layer in (2, 4):
        searched = probing(
            "search",
            "--task",
            "refcocog-centre",
            "--probe",
            "gelu2",
            "--hidden",
            16,
            "--features",
            refcocog_stores,
            "--layer",
            layer,
            "--refs",
            data["refs"],
            "--instances",
            data["instances"],
            "--images",
            data["images"],
            "--trials",
            3,
            "--batch",
            3,
            "--epochs",
            2,
            "--lr-range",
            "1e-3,1e-2",
            "--device",
            "cpu",
            "--out",
            runs / f"layer{layer}",
            plugins=[plugin],
            cwd=tmp_path,
        )
        assert searched.returncode == 0, searched.stderr[-2000:]
    summary = json.loads((runs / "layer4" / "summary.json").read_text())
    assert summary["metric"] == "centre_error" and summary["probe"] == "gelu2"
    values = [t["value"] for t in summary["trials"]]
    assert summary["best"]["val_search"] == min(values)  # the head's direction: lower is better
    history = summary["best"]["seeds"]
    assert 0 <= history["test"]["centre_acc"]["mean"] <= 1
    reported = probing("report", runs, "--out", tmp_path / "report", plugins=[plugin], cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-2000:]
    best_layer = (tmp_path / "report" / "tables" / "best_layer.md").read_text()
    assert "| BLIP-2 | RefCOCOg centre |" in best_layer
    unknown = probing("tasks", plugins=[tmp_path / "absent.py"], cwd=tmp_path)
    assert unknown.returncode == 2 and "PROBING_PLUGINS: cannot import" in unknown.stderr


def test_a_plugin_adds_a_backend(stage2_checkpoint, refcocog_val, tmp_path):
    plugin = tmp_path / "my_backend.py"
    plugin.write_text(plugin_source("my_backend.py"))
    extracted = probing(
        "extract",
        "--model",
        stage2_checkpoint,
        "--task",
        "refcocog",
        "--refs",
        refcocog_val.refs,
        "--instances",
        refcocog_val.instances,
        "--images",
        refcocog_val.images,
        "--split",
        "val",
        "--workers",
        0,
        "--out",
        tmp_path / "store",
        plugins=[plugin],
        cwd=tmp_path,
    )
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["request"]["model"]["family"] == "blip2-queries" and manifest["request"]["rows"] == "per image"
