"""Stores grow by layers: a request for layers a store lacks adds only those (one model pass, one file per shard and
growth), the layers present keep their bytes, an interrupted growth resumes, verification covers the added files,
and stores written before growth (tests/fixtures/store_before_growth, by commit ab205be) open and grow. Also the
shard writer's bytes (safetensors' own) and the finiteness flags computed where the states are."""

import hashlib
import json
import shutil
from pathlib import Path

import blake3
import pytest
import torch
from conftest import val_extraction
from safetensors.torch import save
from test_verify_on_read import independent_digests

import probing.store.extract
from probing.core.artifacts import MANIFEST_NAME, _safetensors_parts, region_digests, write_safetensors
from probing.core.errors import ProbingError
from probing.store.extract import ExtractionRequest, extract
from probing.store.features import (
    _VERIFIED,
    FeatureStore,
    FeatureStoreWriter,
    finite_per_layer,
)

FIXTURE = Path(__file__).parent / "fixtures" / "store_before_growth"


def extraction(checkpoint, options, out, layers, **overrides) -> ExtractionRequest:
    # the settings the fixture store was written with (its README)
    return val_extraction(checkpoint, options, out, **({"layers": layers, "store_vision": True} | overrides))


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the manifest, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def counted(monkeypatch):
    """The layers each shard's model pass was asked for, one entry per pass."""
    passes: list[list[int]] = []
    original = probing.store.extract._query_shard

    def counting(shard, embeds, bad_slots, resampler, layers, *args):
        passes.append(list(layers))
        return original(shard, embeds, bad_slots, resampler, layers, *args)

    monkeypatch.setattr(probing.store.extract, "_query_shard", counting)
    return passes


@pytest.fixture(scope="module")
def whole(tiny_checkpoints, refcocog_val, tmp_path_factory) -> FeatureStore:
    """Every layer extracted in one go: what a grown store must equal, layer by layer."""
    out = tmp_path_factory.mktemp("whole") / "store"
    return extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all")).value


@pytest.fixture(scope="module")
def grown(tiny_checkpoints, refcocog_val, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Layer 4 extracted, then all layers asked for; with the digests of the files before the growth."""
    out = tmp_path_factory.mktemp("grown") / "store"
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "4"))
    before = digests(out)
    result = extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all"))
    assert result.status == "built"
    return out, before


def test_growth_adds_only_the_missing_layers_and_leaves_the_present_files_alone(grown, whole):
    out, before = grown
    after = digests(out)
    assert {name: after[name] for name in before} == before  # every file of layer 4 and vision: the same bytes
    added = sorted(set(after) - set(before))
    shards = len(whole.manifest["shards"])
    assert added == [f"shard-{i:05d}.group-01.safetensors" for i in range(shards)]  # one file per shard
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["layers"] == [1, 2, 3, 4] and manifest["layer_groups"] == [[4], [1, 2, 3]]
    assert "layers" not in manifest["request"] and "growing" not in manifest
    for entry in manifest["shards"]:
        (group,) = entry["groups"]
        assert group["blake3"] == independent_digests(out / group["file"])
        assert entry["blake3"] == independent_digests(out / entry["file"])
        assert sorted(group["blake3"]) == ["__header__", "ids", "layer_01", "layer_02", "layer_03"]
    assert not list(out.rglob("*.sha256")) and not list(out.rglob("*.blake3"))
    store = FeatureStore(out)
    assert store.layers == [1, 2, 3, 4] and store.ids == whole.ids
    for layer in (1, 2, 3, 4):
        assert torch.equal(store.load(layer), whole.load(layer))
    assert {k: v for k, v in manifest["request"].items()} == whole.manifest["request"]


def test_a_growth_runs_the_model_once_per_shard_for_the_missing_layers_only(
    counted, tiny_checkpoints, refcocog_val, tmp_path
):
    out = tmp_path / "store"
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "2"))
    shards = len(counted)
    counted.clear()
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "1,2,4"))
    assert counted == [[1, 4]] * shards


def test_a_request_for_present_layers_reuses_the_store(grown, counted, tiny_checkpoints, refcocog_val):
    out, _ = grown
    before = stamps(out)
    for layers in ("2,4", "4", "all"):
        result = extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, layers))
        assert result.status == "reused" and result.value.layers == [1, 2, 3, 4]
    assert counted == [] and stamps(out) == before  # no model pass, nothing written


def test_an_interrupted_growth_resumes_keeping_its_finished_files(
    grown, counted, monkeypatch, tiny_checkpoints, refcocog_val, tmp_path
):
    """The disk fails after two files of the growth: the present layers stay readable and unchanged; the rerun
    computes only the shards left and gives the bytes of an uninterrupted growth."""
    clean, _ = grown
    out = tmp_path / "store"
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "4"))
    before = digests(out)
    original = FeatureStoreWriter.write_shard
    written = []

    def failing(self, index, tensors, metadata, vision=None, group=0, finite=None):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        original(self, index, tensors, metadata, vision, group=group, finite=finite)
        written.append(index)

    monkeypatch.setattr(FeatureStoreWriter, "write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all", write_threads=1))
    monkeypatch.setattr(FeatureStoreWriter, "write_shard", original)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["growing"] == {"layers": [1, 2, 3]}
    assert len(list(out.glob("shard-*.group-01.safetensors"))) == 2
    _VERIFIED.clear()
    store = FeatureStore(out)  # the present layer is still readable, its files unchanged
    assert store.layers == [4] and torch.equal(store.load(4), FeatureStore(clean).load(4))
    assert {name: digests(out)[name] for name in before} == before
    shards = len(manifest["shards"])
    counted.clear()
    assert extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "1,3")).status == "built"
    assert len(counted) == shards - 2 and all(layers == [1, 2, 3] for layers in counted)  # the recorded growth
    assert digests(out) == digests(clean)
    assert (
        json.loads((out / MANIFEST_NAME).read_text())["shards"]
        == json.loads((clean / MANIFEST_NAME).read_text())["shards"]
    )


def test_a_damaged_growth_file_is_refused_naming_it_and_recomputed_alone(
    grown, counted, tiny_checkpoints, refcocog_val, tmp_path
):
    clean, _ = grown
    out = tmp_path / "store"
    shutil.copytree(clean, out)
    _VERIFIED.clear()
    damaged = out / "shard-00001.group-01.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    store = FeatureStore(out)  # opens: the headers are whole; the damage is in layer 3's bytes, refused when read
    assert torch.equal(store.load(1), FeatureStore(clean).load(1))
    with pytest.raises(ProbingError, match=r"shard-00001.group-01.safetensors: shard damaged \(its BLAKE3 differs"):
        store.load(3)
    others = {k: v for k, v in stamps(out).items() if k not in (damaged.name, MANIFEST_NAME)}
    assert extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "4")).status == "built"
    assert counted == [[1, 2, 3]]  # one shard, the damaged group's layers
    assert digests(out) == digests(clean)
    assert {k: v for k, v in stamps(out).items() if k in others} == others  # no other file rewritten


def test_growth_keeps_the_identity_check(grown, tiny_checkpoints, refcocog_val):
    out, _ = grown
    with pytest.raises(ProbingError, match="holds features made with a different 'dtype'"):
        extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all", dtype="float32"))


def test_a_store_written_before_growth_opens_and_grows(whole, tiny_checkpoints, refcocog_val, tmp_path):
    """The fixture's request holds its layers [1, 2]; the current code reads it, reuses it for those layers, and
    adds 3 and 4 without touching its files."""
    out = tmp_path / "store"
    shutil.copytree(FIXTURE, out)
    before = digests(out)
    old_manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert old_manifest["request"]["layers"] == [1, 2] and "layer_groups" not in old_manifest
    _VERIFIED.clear()
    old = FeatureStore(out)
    assert old.layers == [1, 2] and old.ids == whole.ids
    for layer in (1, 2):
        assert torch.allclose(old.load(layer).float(), whole.load(layer).float(), atol=1e-3, rtol=0)
    assert extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "1,2")).status == "reused"
    result = extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all"))
    assert result.status == "built"
    after = digests(out)
    assert {name: after[name] for name in before} == before
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["layer_groups"] == [[1, 2], [3, 4]] and "layers" not in manifest["request"]
    assert manifest["request"] == whole.manifest["request"]
    _VERIFIED.clear()
    store = FeatureStore(out)
    assert store.layers == [1, 2, 3, 4]
    for layer in (3, 4):
        assert torch.equal(store.load(layer), whole.load(layer))
    assert store.vision.ids == whole.vision.ids


def test_the_writer_writes_safetensors_own_bytes_and_hashes_them(tmp_path):
    tensors = {
        "ids": torch.arange(5),
        "layer_01": torch.randn(5, 3, 8).half(),
        "layer_10": torch.randn(5, 3, 8).bfloat16(),
        "image_embeds": torch.randn(2, 4, 3),
        "empty": torch.empty(0, 0, 0),
        "example_rows": torch.tensor([0, 0, 1, 1, 1]),
    }
    metadata = {"probing": json.dumps({"examples": 5, "bad_images": ['caf\u00e9 "x".jpg\n']}, sort_keys=True)}
    expected = save(tensors, metadata=metadata)
    assert b"".join(bytes(part) for _, part in _safetensors_parts(tensors, metadata)) == expected
    digests = write_safetensors(tmp_path / "x.safetensors", tensors, metadata, tmp_path / "x.safetensors.blake3")
    assert (tmp_path / "x.safetensors").read_bytes() == expected
    assert digests == independent_digests(tmp_path / "x.safetensors") == region_digests(expected)
    assert digests == json.loads((tmp_path / "x.safetensors.blake3").read_text())
    assert len(digests) == 7 and digests["empty"] == blake3.blake3(b"").hexdigest()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_finiteness_flags_from_the_device_are_obeyed(tmp_path):
    states = torch.zeros(3, 2, 4, 5)
    states[1, 1, 2, 3] = float("nan")
    states[2, 0, 0, 0] = float("-inf")
    assert finite_per_layer(states).tolist() == [True, False, False]
    assert finite_per_layer(torch.empty(2, 0, 4, 5)).tolist() == [True, True]
    writer = FeatureStoreWriter(tmp_path / "store", {"kind": "features"})
    writer.prepare([4])
    tensors = {"ids": torch.arange(2), "layer_04": torch.zeros(2, 4, 5)}
    with pytest.raises(ProbingError, match=r"shard-00003.safetensors: 'layer_04' holds non-finite values"):
        writer.write_shard(3, tensors, {"examples": 2}, finite={"layer_04": False})  # the flag, not the values
    assert not list((tmp_path / "store").glob("shard-*"))
    writer.write_shard(3, tensors, {"examples": 2}, finite={"layer_04": True})
    assert (tmp_path / "store" / "shard-00003.safetensors").is_file()


def test_a_store_of_a_family_that_reads_no_text_grows(stage2_checkpoint, refcocog_val, tmp_path):
    """One row per image: the growth's files hold the images' rows, the first files keep each example's row."""
    from test_backends import QUERIES_FAMILY

    from probing.models import register_family
    from probing.models.registry import unregister_family

    register_family(QUERIES_FAMILY)
    try:
        options = dict(data=refcocog_val, split="val", workers=0, progress=False, shard_size=40, batch_size=16)
        grown = tmp_path / "grown"
        extract(ExtractionRequest(model=str(stage2_checkpoint), out=grown, layers="2", **options))
        before = digests(grown)
        extract(ExtractionRequest(model=str(stage2_checkpoint), out=grown, layers="1,3", **options))
        whole = extract(
            ExtractionRequest(model=str(stage2_checkpoint), out=tmp_path / "whole", layers="1,2,3", **options)
        )
    finally:
        unregister_family(QUERIES_FAMILY.name)
    after = digests(grown)
    assert {name: after[name] for name in before} == before
    store = FeatureStore(grown)
    assert store.per_image and store.layers == [1, 2, 3] and store.ids == whole.value.ids
    for layer in (1, 2, 3):
        states, rows = store.load_rows(layer)
        expected_states, expected_rows = whole.value.load_rows(layer)
        assert (
            len(states) < len(store.ids) and torch.equal(states, expected_states) and torch.equal(rows, expected_rows)
        )


def test_the_device_path_writes_the_same_store_and_its_flags_refuse_non_finite_states(
    monkeypatch, tiny_checkpoints, refcocog_val, whole, tmp_path
):
    """The GPU path (cast and check per batch where the states are, copies into the host tensor, flags to the
    writer) run on the CPU: the same bytes as the host path; a NaN in one layer is refused by its flag alone."""
    import probing.store.features

    monkeypatch.setattr(probing.store.extract, "checks_on_device", lambda device: True)
    host_checks = []
    original = probing.store.features.all_finite
    monkeypatch.setattr(probing.store.features, "all_finite", lambda t: host_checks.append(t.shape) or original(t))
    out = tmp_path / "store"
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, "all"))
    assert digests(out) == digests(whole.path)
    assert all(len(shape) == 3 and shape[1] != 4 for shape in host_checks)  # vision embeds only, no layer
    original_query = probing.models.qformer.QFormerResampler.query_states

    def with_nan(self, *args, **kwargs):
        states = original_query(self, *args, **kwargs)
        states[0, 2, 0, 0] = float("nan")  # the third layer asked for
        return states

    monkeypatch.setattr(probing.models.qformer.QFormerResampler, "query_states", with_nan)
    with pytest.raises(ProbingError, match=r"shard-00000.safetensors: 'layer_03' holds non-finite values"):
        extract(extraction(tiny_checkpoints["blip2"], refcocog_val, tmp_path / "nan", "all"))


def test_a_growth_asked_for_other_layers_midway_is_widened_and_restarted(tmp_path):
    """Growth [1] interrupted after one file; a request for [2] widens it to [1, 2] (the file holding only layer 1
    removed); a later request for [1] resumes the widened growth."""
    identity = {"kind": "features", "case": "widen"}
    writer = FeatureStoreWriter(tmp_path / "store", identity)
    writer.prepare([4])
    for index in range(2):
        writer.write_shard(index, {"ids": torch.arange(2) + 2 * index, "layer_04": torch.zeros(2, 3)}, {"examples": 2})
    writer.finish(2, {})
    writer = FeatureStoreWriter(tmp_path / "store", identity)
    assert writer.begin_growth([1]) == [1]
    writer.write_shard(0, {"ids": torch.arange(2), "layer_01": torch.ones(2, 3)}, {"examples": 2}, group=1)
    assert writer.shard_done(0, 1) and not writer.shard_done(1, 1)
    writer = FeatureStoreWriter(tmp_path / "store", identity)
    assert writer.growing == [1] and writer.begin_growth([2]) == [1, 2]
    assert not list((tmp_path / "store").glob("*.group-01.*"))
    writer = FeatureStoreWriter(tmp_path / "store", identity)
    assert writer.begin_growth([1]) == [1, 2] and FeatureStore(tmp_path / "store").layers == [4]
    with pytest.raises(ProbingError, match=r"shard-00001.safetensors: holds other examples"):
        writer.write_shard(1, {"ids": torch.arange(2), "layer_01": torch.ones(2, 3)}, {"examples": 2}, group=1)


def test_two_workers_growing_one_store_at_once_leave_every_layer_each_asked_for(
    tiny_checkpoints, refcocog_val, tmp_path
):
    """Two `probing extract` processes on one store folder at the same time, asking for different layers (two
    experiments of a config run by two workers): the store's identity holds no layers, so the second waits for the
    first's claim and then grows the store by its own layers. Both succeed, and every layer equals a single
    extraction's."""
    import subprocess
    import sys

    def args(out: Path, layers: str) -> list[str]:
        return [
            *("extract", "--model", str(tiny_checkpoints["blip2"]), "--task", "refcocog"),
            *("--refs", str(refcocog_val.refs), "--instances", str(refcocog_val.instances)),
            *("--images", str(refcocog_val.images), "--split", "val", "--out", str(out), "--workers", "0"),
            *("--shard-size", "40", "--layers", layers),
        ]

    shared = tmp_path / "shared"
    workers = [
        subprocess.Popen([sys.executable, "-m", "probing", *args(shared, layers)], stderr=subprocess.PIPE, text=True)
        for layers in ("1", "3,4")
    ]
    errors = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    single = tmp_path / "single"
    assert (
        subprocess.run([sys.executable, "-m", "probing", *args(single, "1,3,4")], capture_output=True).returncode == 0
    )
    grown_store, single_store = FeatureStore(shared), FeatureStore(single)
    assert grown_store.layers == [1, 3, 4] and grown_store.ids == single_store.ids
    for layer in (1, 3, 4):
        assert torch.equal(grown_store.load(layer), single_store.load(layer)), layer
    assert not [p.name for p in shared.rglob("*") if ".partial" in p.name]  # no half-written file left
    assert not shared.with_name("shared.lock").exists()  # both claims released
