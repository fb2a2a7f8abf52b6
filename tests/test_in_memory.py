"""Features in memory (`probing search --in-memory`, `probing.store.memory`): the values of a feature store, the
same search numbers, manifests that say so, and the refusals."""

import json

import pytest
import torch
from conftest import extract_splits, run_cli

from probing.data import DataOptions
from probing.store.features import FeatureStore
from probing.store.memory import memory_stores


def search_args(out, *extra):
    return [
        *("search", "--task", "vsr", "--layer", 4, "--trials", 6, "--trials-per-batch", 3),
        *("--lr-range", "1e-4,1e-1", "--epoch-choices", "2,3", "--device", "cpu", "--out", out, *extra),
    ]


def in_memory_args(tiny_checkpoints, demo_options):
    vsr = demo_options["vsr"]
    return ["--in-memory", "--model", tiny_checkpoints["blip2"], "--vsr", vsr["vsr"], "--images", vsr["images"]]


@pytest.mark.parametrize("family", ["blip2", "idefics2"])
def test_memory_stores_hold_the_values_ids_and_identity_of_extracted_stores(
    family, tiny_checkpoints, demo_options, tmp_path
):
    """Bit for bit: the same batches through the same forward, cast to the store's fp16; a family that reads no
    text keeps one row per image, as its store does."""
    from probing.core.artifacts import json_normalised
    from probing.models.tiny import write_checkpoint
    from probing.probes.data import feature_identity

    checkpoint = tiny_checkpoints.get(family) or write_checkpoint(tmp_path / family, family, seed=7)
    options = DataOptions(task="vsr", **demo_options["vsr"])
    disk = extract_splits(checkpoint, options, tmp_path / "stores", layers="1,2")
    memory = memory_stores(checkpoint, options, [1, 2], device="cpu")
    assert sorted(memory) == ["test", "train", "val"]
    for split, in_memory in memory.items():
        store = FeatureStore(disk / split)
        assert json_normalised(feature_identity(in_memory)) == feature_identity(store)
        assert in_memory.manifest["features_in_memory"] is True and in_memory.per_image == store.per_image
        assert in_memory.ids == store.ids and in_memory.layers == store.layers == [1, 2]
        for layer in (1, 2):
            states, rows = in_memory.load_rows(layer)
            stored, stored_rows = store.load_rows(layer)
            assert states.dtype == stored.dtype == torch.float16
            assert torch.equal(states, stored), (split, layer)
            assert (rows is None) == (stored_rows is None) == (family == "blip2")
            if rows is not None:
                assert torch.equal(rows, stored_rows)
            assert torch.equal(in_memory.load(layer), store.load(layer))
        assert len(in_memory) == len(store)


def test_a_search_in_memory_gives_the_numbers_of_the_search_on_stores(
    capsys, vsr_features, tiny_checkpoints, demo_options, tmp_path
):
    code, _, err = run_cli(capsys, *search_args(tmp_path / "disk", "--features", vsr_features))
    assert code == 0, err
    code, out, err = run_cli(capsys, *search_args(tmp_path / "memory", *in_memory_args(tiny_checkpoints, demo_options)))
    assert code == 0, err
    assert not list(tmp_path.rglob("shard-*.safetensors"))  # no store written
    disk, memory = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("disk", "memory"))
    values = [[trial["value"] for trial in summary["trials"]] for summary in (disk, memory)]
    assert values[0] == values[1] and len(values[0]) == 6
    assert [t["param_lr"] for t in disk["trials"]] == [t["param_lr"] for t in memory["trials"]]
    for split in ("val_search", "val", "test"):
        assert memory["best"][split] == disk["best"][split], split
    # the demo's VSR is too small for accuracy to tell probes apart: the losses of every epoch do, to the last bit
    metrics = [json.loads((tmp_path / name / "best" / "metrics.json").read_text()) for name in ("disk", "memory")]
    history = metrics[1]["runs"][0]["history"]
    assert metrics[0] == metrics[1] and len({epoch["val_loss"] for epoch in history}) == len(history) > 1
    predictions = [(tmp_path / name / "best" / "predictions" / "test.jsonl").read_text() for name in ("disk", "memory")]
    assert predictions[0] == predictions[1]
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("disk", "memory")}
    assert manifests["memory"]["features_in_memory"] is True and "features_in_memory" not in manifests["disk"]
    assert manifests["memory"]["inputs"] == manifests["disk"]["inputs"]  # the stores' identity
    best = json.loads((tmp_path / "memory" / "best" / "manifest.json").read_text())
    assert best["features_in_memory"] is True and best["model_source"]["family"] == "blip2"
    assert "feature_paths" not in best
    # the report reads it as any run: its model, its label, its answers
    from probing.report.analysis import load_run

    runs = {name: load_run(tmp_path / name) for name in ("disk", "memory")}
    assert runs["memory"].family == runs["disk"].family == "blip2" and runs["memory"].label == runs["disk"].label
    assert runs["memory"].ids == runs["disk"].ids and (runs["memory"].correct == runs["disk"].correct).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "unfrozen"], "--in-memory: applies to frozen probes (--mode frozen) only, not --mode unfrozen"),
        (["--features", "FEATURES"], "--in-memory: extracts the features from --model itself; leave out --features"),
    ],
)
def test_in_memory_refuses_what_makes_no_sense(
    capsys, vsr_features, tiny_checkpoints, demo_options, tmp_path, extra, message
):
    extra = [vsr_features if part == "FEATURES" else part for part in extra]
    args = search_args(tmp_path / "out", *in_memory_args(tiny_checkpoints, demo_options), *extra)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.strip() == f"error: {message}", err
    assert not (tmp_path / "out").exists()


def test_in_memory_needs_the_model_and_one_process(capsys, demo_options, tiny_checkpoints, tmp_path, monkeypatch):
    vsr = demo_options["vsr"]
    code, _, err = run_cli(capsys, *search_args(tmp_path / "out", "--in-memory", "--vsr", vsr["vsr"]))
    assert code == 2 and err.strip().startswith("error: --in-memory: needs --model"), err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, *search_args(tmp_path / "out", *in_memory_args(tiny_checkpoints, demo_options)))
    assert code == 2 and err.strip().startswith("error: --in-memory: the features live in one process's"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def small_config(tmp_path, checkpoint, name: str, in_memory: bool) -> dict:
    return {
        "name": name,
        "workspace": str(tmp_path / name),
        "models": {"BLIP-2 (tiny)": {"model": str(checkpoint)}},
        "data": {"demo": {"refcocog_images": 160, "vsr_images": 60}},
        "experiments": [
            {
                "name": "frozen",
                "tasks": ["vsr"],
                "models": ["BLIP-2 (tiny)"],
                "layers": [2, 4],
                "controls": True,
                "control_seeds": [0],
                "search": {
                    "trials": 3,
                    "batch": 3,
                    "in_memory": in_memory,
                    "space": {"vsr": {"lr": [0.001, 0.1], "epochs": [3]}},
                },
            }
        ],
        "report": {"out": str(tmp_path / f"report-{name}")},
        "device": "cpu",
    }


def test_a_config_in_memory_writes_no_store_and_gives_the_numbers_of_one(capsys, tmp_path, tiny_checkpoints):
    """`search: {in_memory: true}`: both layers extracted once into memory for the two searches, their floors and
    controls; every number as with stores."""
    import yaml

    for name, in_memory in (("memory", True), ("disk", False)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(small_config(tmp_path, tiny_checkpoints["blip2"], name, in_memory)))
        code, out, err = run_cli(capsys, "run", path)
        assert code == 0, err
        assert "searches: 2 built" in out and "rigour runs: 6 built" in out, out
    assert not (tmp_path / "memory" / "features").exists() and (tmp_path / "disk" / "features").is_dir()
    runs = sorted(p.relative_to(tmp_path / "disk") for p in (tmp_path / "disk" / "runs").rglob("metrics.json"))
    assert len(runs) == 8  # 2 searches' best runs, and per search its floor, control and the control's floor
    for run in runs:
        metrics = [json.loads((tmp_path / name / run).read_text()) for name in ("disk", "memory")]
        assert metrics[0] == metrics[1], run
        manifest = json.loads((tmp_path / "memory" / run.parent / "manifest.json").read_text())
        assert manifest["features_in_memory"] is True and "feature_paths" not in manifest
    assert (tmp_path / "report-memory" / "tables" / "table1.md").read_text() == (
        tmp_path / "report-disk" / "tables" / "table1.md"
    ).read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modes": ["unfrozen"]}, "applies to frozen probes (--mode frozen) only, not modes unfrozen"),
        ({"mdl": True}, "the online code ('mdl: true') reads feature stores; leave one of them out"),
    ],
)
def test_a_config_refuses_in_memory_where_it_makes_no_sense(capsys, tmp_path, tiny_checkpoints, change, message):
    import yaml

    config = small_config(tmp_path, tiny_checkpoints["blip2"], "w", True)
    config["experiments"][0] |= change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and err == f"error: {path}: config field 'experiments[0].search.in_memory': {message}\n", err
    assert not (tmp_path / "w").exists()
