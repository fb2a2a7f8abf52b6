"""The on-disk feature store: per-layer Q-Former query outputs, sharded safetensors plus a manifest.

Layout of a store folder:

    manifest.json                         what made it (model, data fingerprint, preprocessing, dtypes ...), the
                                          layers it holds and where; "complete": false until every shard exists
    shard-00000.safetensors ...           tensors `ids` [n] (int64) and `layer_01` ... [n, Q, H] of the layers of
                                          the first extraction (layer group 0), metadata per shard
    shard-00000.group-01.safetensors ...  `ids` and the layers added by the first growth (layer group 1), ...
    vision/shard-00000.safetensors        with --store-vision: `ids` (image ids) and `image_embeds` [m, V, D]

A backend whose queries read no text has the same states for every example of an image: its store keeps
one row per image (`"rows": "per image"` in the request): a shard then holds `layer_XX` [m, Q, H] for its m
images, `image_ids` [m] and `example_rows` [n], the row each of its n examples reads.

Growth. The layer set is not part of a store's identity: asking for layers a store lacks opens it and adds only
those, in one pass of the model over the split, as a new *layer group*: one file per (shard, group), named
`shard-XXXXX.group-GG.safetensors`. Files of the groups already there are never opened for writing, so their
bytes (and the digests the manifest holds) stay as they were. Asking for layers it holds reuses it. One file per
(shard, group) rather than one per (shard, layer), because:
- a store made in one extraction keeps exactly the layout (and bytes) of the stores made before growth existed,
  so old and new stores are one format, and an old store grows by the same code path;
- the layers of one growth come from one forward pass and are finished together: the (shard, group) file is the
  unit of resumption, written with one fsync, as a shard was before;
- files stay few (a 13-layer store grown once has two per shard, not 13).
Reading one layer reads and verifies only that layer's bytes in each file (its digests are per tensor, below).

The manifest lists `layer_groups` (the layers of each group, group 0 first) and `layers` (all of them, sorted);
each shard entry lists its group files after the first (`groups`: file and digests). A store written before
growth has neither: its one group is its request's `layers`.

Digests. Each file's entry records `blake3`: the BLAKE3 of the file's header (`"__header__"`: its first 8 + N
bytes, the length and the JSON) and of each tensor's bytes (by tensor name: `"ids"`, `"layer_04"` ...), computed
from the bytes in memory as they are written. Opening a store checks each header's digest and each file's size
(cheap); loading a tensor checks the bytes it reads (`probing.store.regions`); `probing extract` checks every byte
before it reuses or resumes a store. Stores written before BLAKE3 record `sha256` (of the whole file) instead and
are verified as they always were, whole when they open; stores from before checksums record neither and are
given their digests on first read. A region can be checked by hand: `tail -c +$((start + 1)) FILE | head -c
$((end - start)) | b3sum`, with start and end from the header (8 + N plus its `data_offsets`).

While a growth runs, the manifest stays complete (the present layers stay readable) and records `growing` (the
layers being added); an interrupted growth is resumed by a rerun that asks for any of them, keeping the (shard,
group) files already written.

A shard is written under a temporary name and renamed when complete, so a killed run leaves only whole
shards; a rerun with the same request keeps them and computes the rest. A store whose identity differs from
the request is refused with the differing field named, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from probing.core.artifacts import (
    MANIFEST_NAME,
    PARTIAL_MARK,
    SafetensorsHeader,
    first_difference,
    json_normalised,
    read_manifest,
    sweep_stale_partials,
    write_bytes,
    write_json,
    write_safetensors,
)
from probing.core.errors import ProbingError
from probing.store.regions import (
    _VERIFIED,
    WHOLE_FILE,
    FileState,
    RegionReader,
    checked_header,
    damaged,
    file_digests,
    file_state,
    hash_threads,
    known_header,
    stored_dtype,
)

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1  # the request's "format_version": bump when the layout or the values change
PER_IMAGE = "per image"  # the request's "rows" for backends that read no text (absent: one row per example)
VISION_FOLDER = "vision"
_METADATA_KEY = "probing"
CHECKSUM_SUFFIX = ".blake3"  # beside a shard until the manifest records its digests
SHA256_SUFFIX = ".sha256"  # the same, left by an extraction from before BLAKE3
NO_VERIFY_VARIABLE = "PROBING_NO_VERIFY"
LAYER_FIELD = "layers"  # the request field that stores written before growth have in their identity
_CHUNK = 1 << 22  # bytes read at a time when hashing a file


def layer_key(layer: int) -> str:
    return f"layer_{layer:02d}"


def shard_name(index: int, group: int = 0) -> str:
    """The file of shard `index` holding layer group `group` (group 0: the shard file itself, as before growth)."""
    return f"shard-{index:05d}.safetensors" if group == 0 else f"shard-{index:05d}.group-{group:02d}.safetensors"


def without_layers(request: Mapping[str, Any]) -> dict[str, Any]:
    """A store's identity from its manifest's request: stores written before growth also name their layers there."""
    return {key: value for key, value in request.items() if key != LAYER_FIELD}


def layer_groups(manifest: Mapping[str, Any]) -> list[list[int]]:
    """The layers of each layer group, group 0 first (a store written before growth: its request's layers)."""
    groups = manifest.get("layer_groups")
    if groups is None:
        request = manifest.get("request", {})
        groups = [request[LAYER_FIELD]] if LAYER_FIELD in request else []
    return [list(group) for group in groups]


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, str]:
    """Write one shard atomically with its digests beside it (the BLAKE3 of its header and of each tensor, hashed
    from the bytes as they are written, never read back; the digest file is not fsynced: after a crash a lost or
    empty one makes its shard look damaged or from before checksums, and it is computed again or checked by
    parsing, never wrong bytes accepted); returns the digests."""
    # One metadata key holding sorted JSON: safetensors keeps metadata in a hash map whose order changes from
    # process to process, which would make identical shards differ in bytes.
    metadata = {_METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    return write_safetensors(path, tensors, metadata, digest_beside=checksum_sidecar(path))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity. Its smallest and largest values tell (a NaN makes both NaN,
    +inf is the largest, -inf the smallest), and `torch.aminmax` finds them about 20 times faster than
    `torch.isfinite(tensor).all()` on a CPU's fp16 shard (0.07 s against 1.4 s for 1,024 examples of 13 layers):
    the full check had been the shard writer's largest cost. (On a GPU extraction checks on the device instead,
    `finite_per_layer`, where the elementwise check is free beside the cast.)"""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def finite_per_layer(states: torch.Tensor) -> torch.Tensor:
    """`[L]` bool: whether each layer of `[L, ...]` states holds only finite values, computed where the states are
    (no host sync: the flags travel to the host with the states and the writer checks them)."""
    if states.numel() == 0:
        return torch.ones(len(states), dtype=torch.bool, device=states.device)
    return torch.isfinite(states).reshape(len(states), -1).all(dim=1)


def checksum_sidecar(shard: Path) -> Path:
    """Where a shard's digests (BLAKE3 of its header and of each tensor, JSON) wait until the store's manifest
    records them (a resumed extraction checks a shard it finds against them, and recomputes a damaged one)."""
    return shard.with_name(shard.name + CHECKSUM_SUFFIX)


def sha256_sidecar(shard: Path) -> Path:
    """Where an extraction from before BLAKE3 left a shard's SHA-256 (an interrupted store it began, resumed now)."""
    return shard.with_name(shard.name + SHA256_SUFFIX)


def verification_enabled() -> bool:
    """Stores are verified on read unless `probing --no-verify` (which sets the variable, so that the
    processes a command launches inherit it) says the disk is trusted."""
    return os.environ.get(NO_VERIFY_VARIABLE, "") not in ("1", "true", "yes")


def shard_digest(path: Path) -> str:
    """The SHA-256 of a shard's bytes (stores written before BLAKE3 record it), read in chunks into one reused
    buffer (a shard may be larger than memory allows twice; no chunk is allocated afresh)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


Recorded = str | dict[str, str] | None  # what a manifest entry records: BLAKE3 per region, SHA-256, or nothing


def recorded_digest(entry: Mapping[str, Any]) -> Recorded:
    """A manifest entry's digests: its `blake3` (per region, stores written since BLAKE3), else its `sha256` (the
    whole file, stores written before), else None (a store from before checksums)."""
    return entry.get("blake3") or entry.get("sha256")


def _whole_file_check(path: Path, recorded: Recorded) -> tuple[bool, list[tuple[FileState, str, str]]]:
    """Whether a file's bytes have the recorded digests, read whole, and what to remember as verified."""
    state = file_state(path)  # before hashing: a change after is seen
    if isinstance(recorded, dict):
        whole = file_digests(path) == recorded
        return whole, [(state, name, digest) for name, digest in recorded.items()] if whole else []
    whole = shard_digest(path) == recorded
    return whole, [(state, WHOLE_FILE, str(recorded))] if whole else []


def _known_intact(path: Path, recorded: Recorded) -> bool:
    state = file_state(path)
    if isinstance(recorded, dict):
        return all((state, name, digest) in _VERIFIED for name, digest in recorded.items())
    return (state, WHOLE_FILE, recorded) in _VERIFIED


def _readable_shard(path: Path) -> bool:
    """A shard whose header and ids parse (what can be checked of a shard written before checksums)."""
    try:
        with safe_open(path, framework="pt") as handle:
            handle.get_tensor("ids")
            json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))
        return True
    except Exception:  # noqa: BLE001 - safetensors raises several kinds for a truncated or altered file
        return False


def _intact_all(checks: Sequence[tuple[Path, Recorded]]) -> list[bool]:
    """For each (file, recorded digests): whether all its bytes have them, read whole: every region's BLAKE3 (a
    store written since BLAKE3) or the file's SHA-256 (one written before); recorded None, a shard from before
    checksums: whether it parses. Files not yet verified in this process are hashed by parallel threads (blake3,
    hashlib and reads release the GIL; a store's files are independent); a verified one is remembered while the
    file is unchanged."""
    results: list[bool | None] = [None] * len(checks)
    to_hash: list[int] = []
    for position, (path, recorded) in enumerate(checks):
        if not path.is_file():
            results[position] = False
        elif recorded is None:
            results[position] = _readable_shard(path)
        elif _known_intact(path, recorded):
            results[position] = True
        else:
            to_hash.append(position)
    with ThreadPoolExecutor(max_workers=max(1, min(hash_threads(), len(to_hash)))) as pool:
        outcomes = list(pool.map(lambda position: _whole_file_check(*checks[position]), to_hash))
    for position, (whole, verified) in zip(to_hash, outcomes, strict=True):
        results[position] = whole
        _VERIFIED.update(verified)
    return [bool(result) for result in results]


def _store_files(manifest: Mapping[str, Any]) -> list[tuple[str, int, int, dict[str, Any]]]:
    """Every file a complete store lists: (folder, shard index, layer group, its entry), vision shards as group 0
    of the folder `vision`. Raises on a damaged 'shards' field."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and "file" in e for e in shards):
        raise ProbingError(f"field 'shards' is damaged ({MANIFEST_NAME})")
    files: list[tuple[str, int, int, dict[str, Any]]] = []
    extra = len(layer_groups(manifest)) - 1
    for index, entry in enumerate(shards):
        files.append(("", index, 0, entry))
        groups = entry.get("groups", [])
        if len(groups) != extra or not all(isinstance(g, dict) and "file" in g for g in groups):
            raise ProbingError(f"field 'shards[{index}].groups' does not list one file per layer group after the first")
        files.extend(("", index, group, item) for group, item in enumerate(groups, start=1))
    for index, entry in enumerate((manifest.get("vision") or {}).get("shards", [])):
        files.append((VISION_FOLDER, index, 0, entry))
    return files


def _region_checks(manifest: Mapping[str, Any], folder: str) -> dict[str, dict[str, str]]:
    """File name -> the BLAKE3 of its regions, for the files of `folder` ("" or `vision`) whose regions are checked
    as they are read (a store's files from before BLAKE3 are checked whole when it opens instead)."""
    return {
        entry["file"]: entry["blake3"]
        for where, _, _, entry in _store_files(manifest)
        if where == folder and isinstance(entry.get("blake3"), dict)
    }


_REASONS = {str: "its SHA-256 differs from the manifest's", type(None): "it does not parse"}  # files checked whole


def verify_store(path: Path, manifest: dict[str, Any]) -> None:
    """The checks of a complete store when it opens: every file present, its example count the manifest's and the
    total; a file whose manifest entry records BLAKE3 per region has its header's digest and its size checked (its
    tensors are checked as they are read: `_ShardedTensors.load`), one from before BLAKE3 (a SHA-256 of the whole
    file) is hashed whole, as stores were before (in parallel, once per process). A damaged file is a ProbingError
    naming it. (The full check of every byte, for `probing extract`: `FeatureStoreWriter.damaged_shards`.)

    A store written before checksums is trusted once: its shards' digests are recorded in its manifest (when
    the folder is writable), so that every later read checks them.
    """
    try:
        files = _store_files(manifest)
    except ProbingError as error:
        raise ProbingError(f"{path / MANIFEST_NAME}: {error}") from None
    paths = [path / folder / entry["file"] for folder, _, _, entry in files]
    for file in paths:
        if not file.is_file():
            raise ProbingError(f"{file}: shard missing; rerun the same `probing extract` to recompute it")
    whole_checks = [(f, recorded_digest(e)) for f, (*_, e) in zip(paths, files, strict=True)]
    whole_checks = [(f, r) for f, r in whole_checks if not isinstance(r, dict)]
    intact = dict(zip([f for f, _ in whole_checks], _intact_all(whole_checks), strict=True))
    changed = False
    for file, (folder, index, group, entry) in zip(paths, files, strict=True):
        recorded = recorded_digest(entry)
        if isinstance(recorded, dict):
            metadata = json.loads(checked_header(file, recorded).metadata.get(_METADATA_KEY, "{}"))
        elif not intact[file]:
            raise damaged(file, _REASONS[type(recorded)])
        else:
            metadata = _shard_metadata(file)
        if recorded is None:
            entry["blake3"] = _record_digests(file)
            changed = True
        count_key = "images" if folder == VISION_FOLDER else "examples"
        expected = entry.get(count_key) if group == 0 else manifest["shards"][index].get("examples")
        if metadata.get(count_key) != expected:
            raise ProbingError(f"{file}: holds {metadata.get(count_key)} {count_key} but the manifest lists {expected}")
    if manifest.get("examples") != sum(int(entry["examples"]) for entry in manifest["shards"]):
        raise ProbingError(
            f"{path / MANIFEST_NAME}: field 'examples' is {manifest.get('examples')!r} but its shards hold "
            f"{sum(int(entry['examples']) for entry in manifest['shards'])}"
        )
    if changed:
        try:
            write_json(path / MANIFEST_NAME, manifest)
            log.info("%s: recorded the BLAKE3 of its shards (a store written before checksums)", path)
        except OSError as error:  # a read-only store: verified by parsing this time, digests not kept
            log.warning("%s: could not record its shards' checksums (%s)", path, error.strerror)


def _record_digests(file: Path) -> dict[str, str]:
    """The BLAKE3 of a parsable file's regions, remembered as verified (a shard from before checksums, trusted)."""
    state = file_state(file)
    digests = file_digests(file)
    if digests is None:
        raise damaged(file, "it does not parse")
    _VERIFIED.update((state, name, digest) for name, digest in digests.items())
    return digests


def _shard_metadata(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))


class _ShardedTensors:
    """Read side shared by FeatureStore and VisionStore: ids and named tensors concatenated over shards.

    `checks`: file name -> the BLAKE3 of its header and tensors, for the files whose bytes are checked as they are
    read (None: nothing is checked, `--no-verify`; the same reads, without hashing)."""

    def __init__(self, folder: Path, shard_files: Sequence[str], checks: Mapping[str, Mapping[str, str]] | None = None):
        self.folder = folder
        self.shard_files = list(shard_files)
        self.checks = checks
        missing = [name for name in self.shard_files if not (folder / name).is_file()]
        if missing:
            raise ProbingError(f"{folder / missing[0]}: shard missing ({len(missing)} of {len(self.shard_files)})")

    @cached_property
    def ids(self) -> list[int]:
        return self.load("ids").tolist()

    def example_rows(self) -> torch.Tensor:
        """Per-image stores: the row of `load`'s result that each example reads, `[N]` (shard offsets added)."""
        rows, offset = [], 0
        for name in self.shard_files:
            rows.append(self.load("example_rows", files=[name]) + offset)
            offset += self.header(name).tensors["image_ids"].shape[0]
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)

    def header(self, name: str) -> SafetensorsHeader:
        """A file's header, its digest checked when its bytes are (it says where each tensor lies)."""
        path = self.folder / name
        recorded = None if self.checks is None else self.checks.get(name)
        return known_header(path)[0] if recorded is None else checked_header(path, recorded)

    def load(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        files: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Concatenate `key` over shards (or over `files`, one per shard: a layer group's) into one preallocated
        tensor: each shard's bytes are read once, straight into the result (through one shard's staging buffer
        when the dtype or device differ), and checked against the manifest's BLAKE3 before it is returned."""
        files = self.shard_files if files is None else list(files)
        if not files:
            raise ProbingError(f"{self.folder}: store has no shards")
        parts = []
        for name in files:  # shapes from the headers: nothing is read yet
            region = self.header(name).tensors.get(key)
            if region is None:
                raise ProbingError(f"{self.folder / name}: holds no tensor '{key}'")
            parts.append((name, region))
        # Shards without rows add none, and their other dimensions may be placeholders (a vision shard whose
        # images were all bad is written as [0, 0, 0]): the output is shaped by the first shard with rows.
        shaped = next((region for _, region in parts if region.shape[0] > 0), parts[-1][1])
        total = sum(region.shape[0] for _, region in parts)
        stored = stored_dtype(self.folder / files[0], key, shaped)
        result = torch.empty((total, *shaped.shape[1:]), dtype=dtype or stored, device=device)
        offset = 0
        with RegionReader() as reader:
            for name, region in parts:
                rows = region.shape[0]
                if rows == 0:
                    continue
                if region.shape[1:] != shaped.shape[1:]:
                    raise ProbingError(
                        f"{self.folder / name}: '{key}' is {list(region.shape)}, other shards' [*, "
                        f"{', '.join(map(str, shaped.shape[1:]))}]"
                    )
                expected = None if self.checks is None or name not in self.checks else self.checks[name][key]
                reader.read_tensor(self.folder / name, key, region, result[offset : offset + rows], expected)
                offset += rows
            reader.check()
        return result


def _read_complete_manifest(path: Path, what: str) -> dict[str, Any]:
    manifest = read_manifest(path)
    if manifest is None:
        raise ProbingError(f"{path}: not a {what} ({MANIFEST_NAME} missing)")
    if not manifest.get("complete"):
        raise ProbingError(f"{path}: {what} is incomplete; rerun the same `probing extract` to finish it")
    return manifest


class FeatureStore:
    """Per-layer query outputs of one split, in store order.

    `.ids`: example ids (RefCOCOg `sent_id`; VSR / RCM line numbers) in store order.
    `.layers`: the stored Q-Former layers (1-based; 0 = embedding output).
    `.load(layer) -> [N, Q, H]`; `.manifest`: the manifest dict.
    """

    def __init__(self, path: Path | str, verify: bool | None = None):
        """Opens the store with its cheap checks (`verify_store`); each load then checks the bytes it reads.
        `verify` None: unless `--no-verify` (`PROBING_NO_VERIFY=1`) says the disk is trusted."""
        self.path = Path(path)
        self.manifest: dict[str, Any] = _read_complete_manifest(self.path, "feature store")
        self.verify = verification_enabled() if verify is None else verify
        checks = None
        if self.verify:
            verify_store(self.path, self.manifest)
            checks = _region_checks(self.manifest, "")
        self._tensors = _ShardedTensors(self.path, [s["file"] for s in self.manifest["shards"]], checks)
        self._group_of = {layer: group for group, layers in enumerate(layer_groups(self.manifest)) for layer in layers}

    @property
    def ids(self) -> list[int]:
        return self._tensors.ids

    @property
    def layers(self) -> list[int]:
        return sorted(self._group_of)

    @property
    def per_image(self) -> bool:
        """One row per image (a backend that reads no text) rather than one per example."""
        return self.manifest["request"].get("rows") == PER_IMAGE

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    def load(
        self, layer: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """`[N, Q, H]`, one row per example in `ids` order (a per-image store's rows are repeated)."""
        states, rows = self.load_rows(layer, dtype, device)
        return states if rows is None else states.index_select(0, rows.to(states.device))

    def load_rows(
        self, layer: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored rows and, for a per-image store, the row each example reads (else None): a per-image
        store stays one row per image in memory."""
        states = self._tensors.load(layer_key(layer), dtype=dtype, device=device, files=self._files_of(layer))
        return states, (self._tensors.example_rows() if self.per_image else None)

    def latent_shape(self, layer: int) -> tuple[int, int]:
        """(latents, width) of one stored layer, from the first of its files' headers (no tensor is read)."""
        shape = self._tensors.header(self._files_of(layer)[0]).tensors[layer_key(layer)].shape
        return int(shape[1]), int(shape[2])

    def _files_of(self, layer: int) -> list[str]:
        """The file of each shard that holds `layer` (its layer group's)."""
        if layer not in self._group_of:
            raise ProbingError(f"{self.path}: layer {layer} is not in the store (it has {self.layers})")
        group = self._group_of[layer]
        return [s["file"] if group == 0 else s["groups"][group - 1]["file"] for s in self.manifest["shards"]]

    @property
    def vision(self) -> VisionStore:
        return VisionStore(self.path / VISION_FOLDER, verify=self.verify)


class VisionStore:
    """Per-image ViT outputs written with --store-vision: `.ids` are image ids, `.load() -> [M, V, D]`."""

    def __init__(self, path: Path | str, verify: bool | None = None):
        """The vision shards' bytes are checked as they are read (their BLAKE3), unless `verify` is false or, when
        None, `--no-verify` says the disk is trusted."""
        self.path = Path(path)
        parent = _read_complete_manifest(self.path.parent, "feature store")
        if not parent.get("vision"):
            raise ProbingError(f"{self.path.parent}: extracted without --store-vision")
        self.manifest = parent
        verify = verification_enabled() if verify is None else verify
        checks = _region_checks(parent, VISION_FOLDER) if verify else None
        self._tensors = _ShardedTensors(self.path, [s["file"] for s in parent["vision"]["shards"]], checks)

    @property
    def ids(self) -> list[int]:
        return self._tensors.ids

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        return self._tensors.load("image_embeds", dtype=dtype, device=device)


class FeatureStoreWriter:
    """Write side: checks an existing store against the request, lists finished (shard, layer group) files,
    finalises a new store or a growth.

    `identity` is the part of the manifest that defines the request, without the layers; an existing store whose
    identity differs is refused, naming the first differing field (a store written before growth also has its
    layers in its request: they are left out of the comparison). Safe with several processes (accelerate): each
    writes its own shards; the main process writes the manifests.
    """

    def __init__(self, path: Path, identity: Mapping[str, Any]):
        """Read-only checks (safe on every process at once); `prepare()` then creates the store."""
        self.path = Path(path)
        self.identity = without_layers(json_normalised(dict(identity)))
        if self.path.exists() and not self.path.is_dir():
            raise ProbingError(f"{self.path}: exists and is not a directory")
        existing = read_manifest(self.path) if self.path.is_dir() else None
        if existing is None and self.path.is_dir() and any(self.path.iterdir()):
            raise ProbingError(f"{self.path}: not empty and has no {MANIFEST_NAME}; choose another output directory")
        if existing is not None:
            differing = first_difference(self.identity, without_layers(existing.get("request", {})))
            if differing is not None:
                raise ProbingError(
                    f"{self.path}: holds features made with a different '{differing}'; "
                    "choose another output directory or remove it"
                )
        self.manifest: dict[str, Any] = existing or {}
        self.exists = existing is not None
        self.complete = bool(existing and existing.get("complete"))

    @property
    def groups(self) -> list[list[int]]:
        """The layers of each layer group the store has or is being made with (empty for a new store)."""
        return layer_groups(self.manifest) if self.exists else []

    @property
    def present_layers(self) -> list[int]:
        """The layers a complete store holds."""
        return sorted({layer for group in self.groups for layer in group}) if self.complete else []

    @property
    def growing(self) -> list[int] | None:
        """The layers an unfinished growth of a complete store is adding (None: no growth under way)."""
        growing = self.manifest.get("growing")
        return list(growing["layers"]) if self.complete and growing else None

    def prepare(self, layers: Sequence[int] = ()) -> None:
        """Create the folder and its first manifest (main process only, before any shard is written): a new store
        is made with `layers` as its layer group 0; an unfinished one keeps the groups it records."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.exists or not self.groups:  # the manifest first: the folder is never ours without saying so
            self.manifest = {"request": self.identity, "complete": False, "layer_groups": [sorted(layers)]}
            write_json(self.path / MANIFEST_NAME, self.manifest)
            self.exists = True
        if self.identity.get("store_vision"):
            (self.path / VISION_FOLDER).mkdir(exist_ok=True)
        self._sweep_partials()

    def begin_growth(self, missing: Sequence[int]) -> list[int]:
        """Record in the complete manifest that layers are being added (main process only); returns the layers of
        the new group. An unfinished growth that already covers `missing` is resumed (its files kept); one that
        does not is widened to its layers and `missing`, its files removed (they hold the narrower set)."""
        under_way = self.growing
        if under_way is not None and set(missing) <= set(under_way):
            return under_way
        layers = sorted(set(missing) | set(under_way or []))
        group = len(self.groups)
        for path in self.path.glob(f"shard-*.group-{group:02d}.safetensors*"):
            path.unlink(missing_ok=True)  # an earlier growth's own files, never a group the manifest lists
        self.manifest["growing"] = {"layers": layers}
        write_json(self.path / MANIFEST_NAME, self.manifest)
        self._sweep_partials()
        return layers

    def _sweep_partials(self) -> None:
        for folder in (self.path, self.path / VISION_FOLDER):
            if folder.is_dir():
                sweep_stale_partials(folder, f".*{PARTIAL_MARK}*")

    def _unit_paths(self, index: int, group: int) -> list[Path]:
        """The files of one unit of work: (shard, layer group); the vision shard goes with group 0, first."""
        paths = [self.path / shard_name(index, group)]
        if group == 0 and self.identity.get("store_vision"):
            paths.insert(0, self.path / VISION_FOLDER / shard_name(index))
        return paths

    def shard_done(self, index: int, group: int = 0) -> bool:
        """Whether the file(s) of (shard `index`, layer group `group`) are on disk and whole: their bytes match the
        digests written beside them: the BLAKE3 of each region, or the SHA-256 of the file that an extraction from
        before BLAKE3 wrote beside it (a shard from before checksums, with none beside it, must parse and gets its
        digests). A damaged unit is deleted and reported not done, so that a resumed extraction recomputes it."""
        paths = self._unit_paths(index, group)
        if not paths[-1].is_file():  # the query shard is written last: without it the unit of work is not done
            return False
        for path in paths:
            beside = _sidecar_digest(path)
            whole = path.is_file() and _intact_all([(path, beside)])[0]
            if whole and beside is None:
                _write_sidecar(path, file_digests(path))
            if not whole:
                log.warning("%s: damaged; computing it again", path)
                for unit in paths:
                    unit.unlink(missing_ok=True)
                    checksum_sidecar(unit).unlink(missing_ok=True)
                    sha256_sidecar(unit).unlink(missing_ok=True)
                return False
        return True

    def write_shard(
        self,
        index: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        vision: Mapping[str, torch.Tensor] | None = None,
        group: int = 0,
        finite: Mapping[str, bool] | None = None,
    ) -> None:
        """Write one unit of work: the vision shard first (a query shard on disk means its unit is done), each
        file's digests beside it before the file takes its name (a shard without any is from before checksums).

        `finite`: for the tensors it names, whether they are finite, as checked where they were computed (a GPU);
        the other floating tensors are checked here. A growth's file (`group` > 0) must hold the examples of the
        shard's first file, in its order: images that became readable or unreadable since would misalign rows."""
        finite = dict(finite or {})
        for name, tensor in [*tensors.items(), *(vision or {}).items()]:
            ok = finite[name] if name in finite else (not tensor.is_floating_point() or all_finite(tensor))
            if not ok:
                raise ProbingError(
                    f"{self.path / shard_name(index, group)}: '{name}' holds non-finite values (NaN or inf) for "
                    f"example ids {tensors['ids'].tolist()[:5]}...: the model's outputs overflowed or a checkpoint is "
                    "damaged; nothing of this shard was written"
                )
        if group > 0:
            base = self.path / shard_name(index)
            with safe_open(base, framework="pt") as handle:
                expected = handle.get_tensor("ids")
            if not torch.equal(expected, tensors["ids"]):
                raise ProbingError(
                    f"{base}: holds other examples than this extraction computed for it (images became readable or "
                    "unreadable since the store was made); extract into a new folder"
                )
        written = []
        if vision is not None:
            path = self.path / VISION_FOLDER / shard_name(index)
            written.append((path, save_shard(path, vision, {"images": len(vision["ids"])})))
        path = self.path / shard_name(index, group)
        written.append((path, save_shard(path, tensors, metadata)))
        for path, digests in written:  # hashed from the very bytes written: this process need not read them back
            state = file_state(path)
            _VERIFIED.update((state, name, digest) for name, digest in digests.items())

    def damaged_shards(self) -> list[tuple[int, int]]:
        """The (shard, layer group) units of a complete store with a file missing or whose bytes differ from the
        manifest's digests, every byte read: each region's BLAKE3, or the file's SHA-256 for a store from before
        BLAKE3 (unparsable, for a store from before checksums)."""
        files = _store_files(self.manifest)
        intact = _intact_all([(self.path / f / entry["file"], recorded_digest(entry)) for f, _, _, entry in files])
        return sorted({(index, group) for (_, index, group, _), whole in zip(files, intact, strict=True) if not whole})

    def reopen(self, damaged: Sequence[tuple[int, int]]) -> None:
        """Make a complete store resumable again with units `damaged` to compute (main process only): the good
        files keep the digests the manifest recorded (beside them again), the damaged ones are removed."""
        for folder, index, group, entry in _store_files(self.manifest):
            path = self.path / folder / entry["file"]
            if (index, group) in damaged:
                path.unlink(missing_ok=True)
            elif isinstance(entry.get("blake3"), dict):
                _write_sidecar(path, entry["blake3"])
            elif entry.get("sha256"):
                write_bytes(sha256_sidecar(path), entry["sha256"].encode())
        self.manifest = {"request": self.identity, "complete": False, "layer_groups": self.groups}
        write_json(self.path / MANIFEST_NAME, self.manifest)
        self.exists, self.complete = True, False

    def finish(self, shard_count: int, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Check every file of every layer group exists, gather per-shard metadata, write the complete manifest."""
        groups = self.groups
        shards, bad_images, examples = [], [], 0
        for index in range(shard_count):
            path = self.path / shard_name(index)
            if not path.is_file():
                raise ProbingError(f"{path}: shard missing after extraction")  # a worker process failed
            metadata = _shard_metadata(path)
            entry = {"file": shard_name(index), "examples": metadata["examples"], **_digest_fields(path)}
            if len(groups) > 1:
                entry["groups"] = [self._group_entry(index, group) for group in range(1, len(groups))]
            shards.append(entry)
            examples += metadata["examples"]
            bad_images += metadata.get("bad_images", [])
        manifest: dict[str, Any] = {
            "request": self.identity,
            "complete": True,
            "layer_groups": groups,
            "layers": sorted({layer for group in groups for layer in group}),
            "examples": examples,
            "shards": shards,
            "bad_images": sorted(set(bad_images)),
            **summary,
        }
        if self.identity.get("store_vision"):
            vision_shards = []
            for index in range(shard_count):
                path = self.path / VISION_FOLDER / shard_name(index)
                vision_shards.append(
                    {"file": shard_name(index), "images": _shard_metadata(path)["images"], **_digest_fields(path)}
                )
            manifest["vision"] = {"shards": vision_shards, "images": sum(s["images"] for s in vision_shards)}
        write_json(self.path / MANIFEST_NAME, manifest)
        self._drop_sidecars(shard_count, range(len(groups)))
        self.manifest, self.complete = manifest, True
        return manifest

    def finish_growth(self, shard_count: int, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Add the grown layer group to the complete manifest: its layers, each shard's file and digests. The files
        and entries of the groups already there are left as they were."""
        layers = self.growing
        if layers is None:
            raise ProbingError(f"{self.path / MANIFEST_NAME}: no growth under way to finish")
        group = len(self.groups)
        entries = [self._group_entry(index, group) for index in range(shard_count)]
        manifest = dict(self.manifest)
        manifest.pop("growing")
        if LAYER_FIELD in manifest["request"]:  # a store written before growth: its identity without the layers
            manifest["request"] = without_layers(manifest["request"])
        manifest["layer_groups"] = [*self.groups, layers]
        manifest["layers"] = sorted({layer for g in manifest["layer_groups"] for layer in g})
        manifest["shards"] = [
            {**entry, "groups": [*entry.get("groups", []), added]}
            for entry, added in zip(manifest["shards"], entries, strict=True)
        ]
        manifest |= dict(summary)
        write_json(self.path / MANIFEST_NAME, manifest)
        self._drop_sidecars(shard_count, [group])
        self.manifest = manifest
        return manifest

    def _group_entry(self, index: int, group: int) -> dict[str, Any]:
        path = self.path / shard_name(index, group)
        if not path.is_file():
            raise ProbingError(f"{path}: shard missing after extraction")  # a worker process failed
        return {"file": shard_name(index, group), **_digest_fields(path)}

    def _drop_sidecars(self, shard_count: int, groups: Iterable[int]) -> None:
        for group in groups:  # the manifest holds the digests now
            for index in range(shard_count):
                for path in self._unit_paths(index, group):
                    checksum_sidecar(path).unlink(missing_ok=True)
                    sha256_sidecar(path).unlink(missing_ok=True)


def _write_sidecar(path: Path, digests: Mapping[str, str]) -> None:
    """The BLAKE3 of a shard's regions beside it, as the writer leaves them (`write_safetensors`)."""
    write_bytes(checksum_sidecar(path), json.dumps(dict(digests), sort_keys=True).encode())


def _sidecar_digest(path: Path) -> Recorded:
    """The digests written beside a shard: its regions' BLAKE3 (JSON), or the SHA-256 an extraction from before
    BLAKE3 left; None when there are none (or an empty file, which a crash can leave: the shard is then checked by
    parsing and given its digests)."""
    for sidecar in (checksum_sidecar(path), sha256_sidecar(path)):
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        if text:
            try:
                return json.loads(text) if sidecar.suffix == CHECKSUM_SUFFIX else text
            except ValueError:  # a sidecar cut short by a crash: damaged, the shard is checked by parsing instead
                return None
    return None


def _digest_fields(path: Path) -> dict[str, Any]:
    """A shard's manifest fields for its digests: from beside it (`blake3`, or `sha256` when an extraction from
    before BLAKE3 wrote it), computed now for a shard from before checksums."""
    recorded = _sidecar_digest(path)
    if isinstance(recorded, str):
        return {"sha256": recorded}
    return {"blake3": recorded if recorded is not None else file_digests(path)}
