"""Stores verified as they are read: the manifest records the BLAKE3 of each file's header and of each tensor's
bytes; opening a store checks the headers, loading a layer checks that layer's bytes; stores written before
BLAKE3 (whole-file SHA-256, tests/fixtures/store_before_growth) are verified whole, as before; `--no-verify` reads
the same way without hashing; a dtype or device conversion gives the values of safetensors' own reader."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open

from probing.core.artifacts import MANIFEST_NAME
from probing.core.errors import ProbingError
from probing.store.features import (
    _VERIFIED,
    FeatureStore,
    FeatureStoreWriter,
    VisionStore,
    layer_key,
)
from probing.store.regions import WHOLE_FILE

FIXTURE = Path(__file__).parent / "fixtures" / "store_before_growth"
LAYERS = [1, 2, 3]
SHARDS = [5, 4, 3]  # examples per shard


def independent_digests(path: Path) -> dict[str, str]:
    """The BLAKE3 of a safetensors file's header (8-byte length and JSON) and of each tensor's bytes, computed from
    the file by this test alone: what the manifest must record."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    digests = {"__header__": blake3.blake3(data[: 8 + length]).hexdigest()}
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = entry["data_offsets"]
            digests[name] = blake3.blake3(data[8 + length + start : 8 + length + end]).hexdigest()
    return digests


def region_of(path: Path, name: str) -> tuple[int, int]:
    """(start, end) of tensor `name` in the file, counted from its first byte."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + length])[name]["data_offsets"]
    return 8 + length + start, 8 + length + end


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def old_path_load(folder: Path, files: list[str], key: str, dtype=None) -> torch.Tensor:
    """What the store returned before it read regions itself: safetensors' tensors, converted, concatenated."""
    parts = []
    for name in files:
        with safe_open(folder / name, framework="pt") as handle:
            parts.append(handle.get_tensor(key))
    return torch.cat([part.to(dtype or part.dtype) for part in parts if len(part)])


@pytest.fixture
def values() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    total = sum(SHARDS)
    layers = {layer_key(layer): torch.randn(total, 4, 24, generator=generator).half() for layer in LAYERS}
    return {"ids": torch.arange(total) * 7, **layers, "image_embeds": torch.randn(total, 5, 6, generator=generator)}


@pytest.fixture
def store(tmp_path, values) -> Path:
    """A store of three shards, layers 1 to 3 (fp16), with vision shards (fp32), written by the store's writer."""
    folder = tmp_path / "store"
    writer = FeatureStoreWriter(folder, {"kind": "features", "case": "on-read", "store_vision": True})
    writer.prepare(LAYERS)
    start = 0
    for index, rows in enumerate(SHARDS):
        part = {name: tensor[start : start + rows] for name, tensor in values.items()}
        vision = {"ids": part["ids"], "image_embeds": part.pop("image_embeds")}
        writer.write_shard(index, part, {"examples": rows}, vision=vision)
        start += rows
    writer.finish(len(SHARDS), {})
    _VERIFIED.clear()  # a fresh process: nothing verified yet
    return folder


def shard(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def test_the_manifest_records_the_blake3_of_each_region_and_no_sidecar_stays(store):
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    entries = [(store, e) for e in manifest["shards"]] + [(store / "vision", e) for e in manifest["vision"]["shards"]]
    assert len(entries) == 6
    for folder, entry in entries:
        assert "sha256" not in entry
        assert entry["blake3"] == independent_digests(folder / entry["file"])
    first = manifest["shards"][0]["blake3"]
    assert sorted(first) == ["__header__", "ids", "layer_01", "layer_02", "layer_03"]
    start, end = region_of(shard(store, 0), "layer_02")
    assert end - start == 5 * 4 * 24 * 2  # 5 examples x 4 queries x 24 wide, fp16
    assert first["layer_02"] == blake3.blake3(shard(store, 0).read_bytes()[start:end]).hexdigest()
    assert not list(store.rglob("*.blake3")) and not list(store.rglob("*.sha256"))


def test_a_flipped_byte_in_one_layer_is_refused_when_that_layer_is_loaded(store, values):
    start, end = region_of(shard(store, 1), "layer_02")
    flip(shard(store, 1), (start + end) // 2)
    opened = FeatureStore(store)  # the headers are whole: the store opens
    assert opened.ids == values["ids"].tolist()
    for layer in (1, 3):
        assert torch.equal(opened.load(layer), values[layer_key(layer)])
    message = r"shard-00001.safetensors: shard damaged \(its BLAKE3 differs from the manifest's\); rerun the same"
    with pytest.raises(ProbingError, match=message):
        opened.load(2)
    with pytest.raises(ProbingError, match=message):
        opened.load(2, dtype=torch.float32)  # the staging path checks the same bytes
    assert FeatureStoreWriter(store, json.loads((store / MANIFEST_NAME).read_text())["request"]).damaged_shards() == [
        (1, 0)
    ]


def test_a_damaged_header_is_refused_when_the_store_opens(store):
    data = shard(store, 2).read_bytes()
    position = data.index(b'"dtype":"F16"') + len('"dtype":"')
    flip(shard(store, 2), position)  # F16 -> another code: the header no longer parses
    with pytest.raises(ProbingError, match=r"shard-00002.safetensors: shard damaged \(its header does not parse"):
        FeatureStore(store)
    shard(store, 2).write_bytes(data.replace(b'"dtype":"F16"', b'"dtype":"I16"', 1))  # parses, other bytes
    with pytest.raises(ProbingError, match=r"shard-00002.safetensors: shard damaged \(its BLAKE3 differs"):
        FeatureStore(store)
    shard(store, 2).write_bytes(data[:-10])
    with pytest.raises(
        ProbingError, match=rf"shard-00002.safetensors: shard damaged \(it holds {len(data) - 10} bytes"
    ):
        FeatureStore(store)


def test_regions_are_hashed_once_per_process(store, values, monkeypatch):
    hashed = []
    original = blake3.blake3

    def counting(*args, **kwargs):
        hashed.append(1)
        return original(*args, **kwargs)

    opened = FeatureStore(store)
    monkeypatch.setattr("probing.store.regions.blake3.blake3", counting)
    assert torch.equal(opened.load(2), values["layer_02"])
    assert torch.equal(opened.load(2), values["layer_02"])
    assert len(hashed) == 3  # the 3 shards' regions of layer 2, once; the headers were hashed when it opened
    layer_entries = [entry for entry in _VERIFIED if entry[1] == "layer_02"]
    assert len(layer_entries) == 3


def test_no_verify_reads_the_same_way_without_hashing(store, values, monkeypatch):
    verified = FeatureStore(store)
    expected = {layer: verified.load(layer) for layer in LAYERS}
    _VERIFIED.clear()
    monkeypatch.setenv("PROBING_NO_VERIFY", "1")
    trusted = FeatureStore(store)
    for layer in LAYERS:
        assert torch.equal(trusted.load(layer), expected[layer])
        assert torch.equal(trusted.load(layer), values[layer_key(layer)])
    assert _VERIFIED == set()
    start, _ = region_of(shard(store, 0), "layer_03")
    flip(shard(store, 0), start)
    assert not torch.equal(FeatureStore(store).load(3), values["layer_03"])  # trusted: read, not checked
    with pytest.raises(ProbingError, match="shard-00000.safetensors: shard damaged"):
        FeatureStore(store, verify=True).load(3)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32, torch.bfloat16, torch.float64])
def test_a_converted_load_gives_the_values_of_safetensors_own_reader(store, dtype):
    opened = FeatureStore(store)
    files = [f"shard-{index:05d}.safetensors" for index in range(len(SHARDS))]
    for layer in LAYERS:
        loaded = opened.load(layer, dtype=dtype, device="cpu")
        expected = old_path_load(store, files, layer_key(layer), dtype)
        assert loaded.dtype == expected.dtype == (dtype or torch.float16)
        assert loaded.shape == (12, 4, 24) and torch.equal(loaded, expected)


def test_the_vision_shards_are_checked_as_they_are_read(store, values):
    vision = FeatureStore(store).vision
    assert torch.equal(vision.load(), values["image_embeds"]) and vision.ids == values["ids"].tolist()
    start, end = region_of(store / "vision" / "shard-00001.safetensors", "image_embeds")
    flip(store / "vision" / "shard-00001.safetensors", end - 1)
    _VERIFIED.clear()
    with pytest.raises(ProbingError, match=r"vision/shard-00001.safetensors: shard damaged \(its BLAKE3 differs"):
        VisionStore(store / "vision").load()
    assert len(VisionStore(store / "vision", verify=False).load()) == 12


def test_a_store_written_before_blake3_opens_verifies_and_loads_as_before(tmp_path):
    """tests/fixtures/store_before_growth records the SHA-256 of each whole file: it is hashed whole when the store
    opens, as before, and its layers load to the values of safetensors' own reader."""
    folder = tmp_path / "store"
    shutil.copytree(FIXTURE, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    files = [entry["file"] for entry in manifest["shards"]]
    assert all("sha256" in entry and "blake3" not in entry for entry in manifest["shards"])
    _VERIFIED.clear()
    opened = FeatureStore(folder)
    whole = [entry for entry in _VERIFIED if entry[1] == WHOLE_FILE]
    assert len(whole) == len(files) + len(manifest["vision"]["shards"]) == 10
    for entry in manifest["shards"]:
        status = (folder / entry["file"]).stat()
        (found,) = [e for e in whole if e[0][:2] == (status.st_dev, status.st_ino)]
        assert found[1:] == (WHOLE_FILE, hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest())
    for layer in (1, 2):
        for dtype in (None, torch.float32):
            expected = old_path_load(folder, files, layer_key(layer), dtype)
            assert torch.equal(opened.load(layer, dtype=dtype), expected) and len(expected) == 174
    assert opened.ids == old_path_load(folder, files, "ids").tolist()
    assert json.loads((folder / MANIFEST_NAME).read_text()) == manifest  # nothing rewritten
    writer = FeatureStoreWriter(folder, manifest["request"])
    assert writer.damaged_shards() == []
    flip(folder / files[3], -3)
    _VERIFIED.clear()
    with pytest.raises(ProbingError, match=r"shard-00003.safetensors: shard damaged \(its SHA-256 differs"):
        FeatureStore(folder)
    assert FeatureStoreWriter(folder, manifest["request"]).damaged_shards() == [(3, 0)]


def test_an_interrupted_store_from_before_blake3_resumes_with_its_sha256_sidecars(tmp_path, values):
    """An extraction from before BLAKE3 left a shard with its SHA-256 beside it: the resumed writer keeps it (the
    manifest records its `sha256`), refuses it when the bytes differ, and the store reads."""
    folder = tmp_path / "store"
    writer = FeatureStoreWriter(folder, {"kind": "features", "case": "old sidecar"})
    writer.prepare([1])
    for index in range(2):
        rows = {
            "ids": values["ids"][index * 3 : index * 3 + 3],
            "layer_01": values["layer_01"][index * 3 : index * 3 + 3],
        }
        writer.write_shard(index, rows, {"examples": 3})
        path = shard(folder, index)
        path.with_name(path.name + ".blake3").unlink()
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    _VERIFIED.clear()
    flip(shard(folder, 1), -1)
    assert writer.shard_done(0) and not writer.shard_done(1)
    assert not shard(folder, 1).exists() and not (folder / "shard-00001.safetensors.sha256").exists()
    writer.write_shard(1, {"ids": values["ids"][3:6], "layer_01": values["layer_01"][3:6]}, {"examples": 3})
    manifest = writer.finish(2, {})
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(shard(folder, 0).read_bytes()).hexdigest()
    assert manifest["shards"][1]["blake3"] == independent_digests(shard(folder, 1))
    assert not list(folder.glob("*.sha256")) and not list(folder.glob("*.blake3"))
    _VERIFIED.clear()
    assert torch.equal(FeatureStore(folder).load(1), values["layer_01"][:6])


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])
def test_regions_read_in_many_chunks_hash_in_order(store, values, monkeypatch, chunk):
    """A region longer than a chunk is read and hashed chunk by chunk, by the hashing thread or the reader: the
    digest is the region's whatever the chunk size (64 bytes: 15 chunks for layer 2 in shard 0)."""
    monkeypatch.setattr("probing.store.regions.CHUNK", chunk)
    for _ in range(3):
        _VERIFIED.clear()
        opened = FeatureStore(store)
        for layer in LAYERS:
            assert torch.equal(opened.load(layer), values[layer_key(layer)])
        assert len([entry for entry in _VERIFIED if entry[1].startswith("layer_")]) == 9
    start, end = region_of(shard(store, 0), "layer_02")
    assert (end - start) // 64 == 15
    flip(shard(store, 0), end - 1)  # the last byte: in the last chunk
    _VERIFIED.clear()
    with pytest.raises(ProbingError, match=r"shard-00000.safetensors: shard damaged \(its BLAKE3 differs"):
        FeatureStore(store).load(2)
