"""Verified stores: each shard's BLAKE3 (of its header and of each tensor) in the manifest, the headers checked when
a store opens and the tensors as they are read; damage refused in one line naming the shard and recomputed by a
rerun; stores from before checksums trusted once and given theirs; files written with the umask; non-finite
features refused at write time. (Stores written before BLAKE3: tests/test_verify_on_read.py.)"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, val_extraction
from test_verify_on_read import independent_digests

from probing.core.artifacts import MANIFEST_NAME
from probing.core.errors import ProbingError
from probing.store.extract import ExtractionRequest, extract
from probing.store.features import _VERIFIED, FeatureStore, FeatureStoreWriter


def extraction(checkpoint, options, out, **overrides) -> ExtractionRequest:
    return val_extraction(checkpoint, options, out, **({"layers": "1,4", "store_vision": True} | overrides))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tiny_checkpoints, refcocog_val, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verified") / "store"
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out))
    return out


@pytest.fixture
def store_copy(pristine, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    _VERIFIED.clear()  # a fresh process: nothing verified yet
    return copy


def test_manifest_records_each_shards_blake3_and_no_sidecar_stays(pristine):
    manifest = json.loads((pristine / MANIFEST_NAME).read_text())
    assert len(manifest["shards"]) > 2
    for folder, entries in ((pristine, manifest["shards"]), (pristine / "vision", manifest["vision"]["shards"])):
        for entry in entries:
            assert entry["blake3"] == independent_digests(folder / entry["file"]) and "sha256" not in entry
    assert sorted(manifest["shards"][0]["blake3"]) == ["__header__", "ids", "layer_01", "layer_04"]
    assert not list(pristine.rglob("*.sha256")) and not list(pristine.rglob("*.blake3"))


def test_files_get_the_umask_mode(tiny_checkpoints, refcocog_val, tmp_path):
    previous = os.umask(0o027)
    try:
        out = tmp_path / "store"
        extract(extraction(tiny_checkpoints["blip2"], refcocog_val, out, layers="4", store_vision=False))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o640}, modes  # shards as manifests: readable by the group, as the umask says


def _damage(store: Path, how: str) -> str:
    """Damage the store one way; the name of the shard (or file) the refusal must name."""
    first, second = store / "shard-00000.safetensors", store / "shard-00001.safetensors"
    if how == "altered":  # same size, one byte of tensor data changed
        data = bytearray(first.read_bytes())
        data[-3] ^= 0xFF
        first.write_bytes(bytes(data))
        return first.name
    if how == "swapped":
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
        return first.name
    if how == "truncated":
        first.write_bytes(first.read_bytes()[:-1000])
        return first.name
    if how == "emptied":
        first.write_bytes(b"")
        return first.name
    if how == "nan":  # rewritten with NaN features, a valid safetensors file
        from safetensors.torch import load_file, save_file

        tensors = load_file(first)
        tensors["layer_04"][0, 0, 0] = float("nan")
        save_file(tensors, first)
        return first.name
    raise AssertionError(how)


DIFFERS = "its BLAKE3 differs from the manifest's"


@pytest.mark.parametrize(
    "how, reason, when",
    [
        ("altered", DIFFERS, "load"),  # layer 4's bytes: the headers are whole, the layer's read is refused
        ("swapped", DIFFERS, "load"),  # the two shards' headers are the same bytes: their ids differ
        ("truncated", r"it holds \d+ bytes, its header declares \d+", "open"),
        ("emptied", "its header does not parse", "open"),
        ("nan", DIFFERS, "open"),  # rewritten by safetensors without our metadata: another header
    ],
)
def test_a_damaged_shard_is_refused_naming_it_and_a_rerun_recomputes_it(
    how, reason, when, store_copy, pristine, tiny_checkpoints, refcocog_val
):
    name = _damage(store_copy, how)
    with pytest.raises(ProbingError, match=rf"{name}: shard damaged \({reason}.*\); rerun the same `probing extract`"):
        store = FeatureStore(store_copy)
        assert when == "load"  # opened: the damage is in tensors' bytes, refused as they are read
        store.ids, store.load(1), store.load(4)
    result = extract(extraction(tiny_checkpoints["blip2"], refcocog_val, store_copy))
    assert result.status == "built"
    assert tree_bytes(store_copy) == tree_bytes(pristine)  # recomputed to the very bytes


def test_train_refuses_a_damaged_store_in_one_line(tiny_checkpoints, refcocog_val, capsys, tmp_path):
    features = tmp_path / "features"
    for split in ("train", "val", "test"):
        extract(extraction(tiny_checkpoints["blip2"], refcocog_val, features / split, split=split, layers="4"))
    _VERIFIED.clear()
    _damage(features / "val", "altered")
    capsys.readouterr()  # the extractions' own log lines: only the command's stderr is under test
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "refcocog",
        "--features",
        features,
        "--layer",
        "4",
        "--lr",
        "0.01",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
    )
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "shard-00000.safetensors: shard damaged" in err
    assert not (tmp_path / "run").exists()


def test_edited_example_count_in_the_manifest_is_refused(store_copy):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    manifest["examples"] += 1
    (store_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ProbingError, match=r"manifest.json: field 'examples' is \d+ but its shards hold \d+"):
        FeatureStore(store_copy)


def test_no_verify_trusts_the_disk(store_copy, monkeypatch):
    _damage(store_copy, "altered")
    monkeypatch.setenv("PROBING_NO_VERIFY", "1")
    assert len(FeatureStore(store_copy).ids) > 0 and len(FeatureStore(store_copy).load(4)) > 0
    with pytest.raises(ProbingError, match="shard damaged"):
        FeatureStore(store_copy, verify=True).load(4)


def test_a_store_from_before_checksums_is_trusted_once_and_given_them(store_copy, pristine):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    for entry in [*manifest["shards"], *manifest["vision"]["shards"]]:
        del entry["blake3"]
    (store_copy / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shards_before = {k: v for k, v in tree_bytes(store_copy).items() if k != MANIFEST_NAME}
    store = FeatureStore(store_copy)  # not refused, not recomputed
    assert torch.equal(store.load(4), FeatureStore(pristine).load(4))
    assert {k: v for k, v in tree_bytes(store_copy).items() if k != MANIFEST_NAME} == shards_before
    assert json.loads((store_copy / MANIFEST_NAME).read_text()) == json.loads((pristine / MANIFEST_NAME).read_text())
    _VERIFIED.clear()
    _damage(store_copy, "altered")  # from now on its shards are checked
    with pytest.raises(ProbingError, match="shard-00000.safetensors: shard damaged"):
        FeatureStore(store_copy).load(4)


def test_an_old_store_with_an_unparsable_shard_is_refused(store_copy):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        del entry["blake3"]
    (store_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    _damage(store_copy, "truncated")
    with pytest.raises(ProbingError, match=r"shard-00000.safetensors: shard damaged \(it does not parse\)"):
        FeatureStore(store_copy)


def test_a_resumed_extraction_recomputes_a_shard_damaged_before_the_store_was_complete(
    store_copy, pristine, tiny_checkpoints, refcocog_val
):
    """An interrupted store: two shards done (their digests beside them), one of them damaged since."""
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    keep = {"shard-00000.safetensors", "shard-00001.safetensors"}
    for folder, entries in ((store_copy, manifest["shards"]), (store_copy / "vision", manifest["vision"]["shards"])):
        for entry in entries:
            if entry["file"] in keep:
                (folder / (entry["file"] + ".blake3")).write_text(json.dumps(entry["blake3"]))
            else:
                (folder / entry["file"]).unlink()
    unfinished = {"request": manifest["request"], "complete": False, "layer_groups": manifest["layer_groups"]}
    (store_copy / MANIFEST_NAME).write_text(json.dumps(unfinished))
    _damage(store_copy, "altered")
    extract(extraction(tiny_checkpoints["blip2"], refcocog_val, store_copy))
    assert tree_bytes(store_copy) == tree_bytes(pristine)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_features_are_refused_at_write_time(store_copy, bad, dtype):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    writer = FeatureStoreWriter(store_copy / "other", {**manifest["request"], "store_vision": False})
    writer.prepare()
    states = torch.zeros(3, 4, 24, dtype=dtype)
    states[1, 2, 3] = bad
    with pytest.raises(ProbingError, match=r"shard-00007.safetensors: 'layer_04' holds non-finite values"):
        writer.write_shard(7, {"ids": torch.arange(3), "layer_04": states}, {"examples": 3})
    assert not list((store_copy / "other").glob("shard-*"))


def test_the_finiteness_check_agrees_with_isfinite():
    """`all_finite` (smallest and largest values) against torch's elementwise check, one bad value at each place
    of a small tensor, and the empty tensor (which has no smallest value)."""
    from probing.store.features import all_finite

    assert all_finite(torch.empty(0, 4, dtype=torch.float16))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        base = torch.randn(2, 3, 5).to(dtype)
        assert all_finite(base)
        for index in range(base.numel()):
            for bad in (float("inf"), float("-inf"), float("nan")):
                damaged = base.clone().view(-1)
                damaged[index] = bad
                assert all_finite(damaged) is bool(torch.isfinite(damaged).all()) is False
