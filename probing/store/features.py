"""The on-disk feature store: per-layer Q-Former query outputs, sharded safetensors plus a manifest.

Layout of a store folder:

    manifest.json                     what made it (model, data fingerprint, preprocessing, layers, dtypes ...),
                                      "complete": false until every shard exists
    shard-00000.safetensors ...       tensors `ids` [n] (int64) and `layer_01` ... [n, Q, H], metadata per shard
    vision/shard-00000.safetensors    with --store-vision: `ids` (image ids) and `image_embeds` [m, V, D]

A backend whose queries read no text has the same states for every example of an image: its store keeps
one row per image (`"rows": "per image"` in the request): a shard then holds `layer_XX` [m, Q, H] for its m
images, `image_ids` [m] and `example_rows` [n], the row each of its n examples reads.

A shard is written under a temporary name and renamed when complete, so a killed run leaves only whole
shards; a rerun with the same request keeps them and computes the rest. A store whose manifest differs from
the request is refused with the differing field named, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from probing.core.artifacts import (
    MANIFEST_NAME,
    PARTIAL_MARK,
    first_difference,
    json_normalised,
    read_manifest,
    safetensors_bytes,
    sweep_stale_partials,
    write_bytes,
    write_json,
)
from probing.core.errors import ProbingError

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1  # the request's "format_version": bump when the layout or the values change
PER_IMAGE = "per image"  # the request's "rows" for backends that read no text (absent: one row per example)
VISION_FOLDER = "vision"
_METADATA_KEY = "probing"
CHECKSUM_SUFFIX = ".sha256"
NO_VERIFY_VARIABLE = "PROBING_NO_VERIFY"


def layer_key(layer: int) -> str:
    return f"layer_{layer:02d}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write one shard atomically (temporary name, fsync, rename), its SHA-256 beside it first: a shard on disk
    without one beside it is from before checksums, never one whose digest was lost."""
    # One metadata key holding sorted JSON: safetensors keeps metadata in a hash map whose order changes from
    # process to process, which would make identical shards differ in bytes.
    data = safetensors_bytes(tensors, {_METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})
    write_bytes(checksum_sidecar(path), hashlib.sha256(data).hexdigest().encode())
    write_bytes(path, data)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity. Its smallest and largest values tell (a NaN makes both NaN,
    +inf is the largest, -inf the smallest), and `torch.aminmax` finds them about 20 times faster than
    `torch.isfinite(tensor).all()` on a CPU's fp16 shard (0.07 s against 1.4 s for 1,024 examples of 13 layers):
    the full check had been the shard writer's largest cost."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def checksum_sidecar(shard: Path) -> Path:
    """Where a shard's SHA-256 waits until the store's manifest records it (a resumed extraction checks a
    shard it finds against it, and recomputes a damaged one)."""
    return shard.with_name(shard.name + CHECKSUM_SUFFIX)


def verification_enabled() -> bool:
    """Stores are verified on read unless `probing --no-verify` (which sets the variable, so that the
    processes a command launches inherit it) says the disk is trusted."""
    return os.environ.get(NO_VERIFY_VARIABLE, "") not in ("1", "true", "yes")


def _file_state(path: Path) -> tuple[str, int, int, int]:
    status = path.stat()
    return (str(path.resolve()), status.st_ino, status.st_size, status.st_mtime_ns)


# Shards verified in this process, by (path, inode, size, mtime) and digest: a layer sweep opens a store once
# per layer, and its shards are hashed once.
_VERIFIED: set[tuple[tuple[str, int, int, int], str]] = set()


def shard_digest(path: Path) -> str:
    """The SHA-256 of a shard's bytes (read in chunks: a shard may be larger than memory allows twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _readable_shard(path: Path) -> bool:
    """A shard whose header and ids parse (what can be checked of a shard written before checksums)."""
    try:
        with safe_open(path, framework="pt") as handle:
            handle.get_tensor("ids")
            json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))
        return True
    except Exception:  # noqa: BLE001 - safetensors raises several kinds for a truncated or altered file
        return False


def _intact(path: Path, recorded: str | None) -> bool:
    """Whether a shard's bytes have the recorded SHA-256 (a shard from before checksums, recorded None: whether
    it parses). Remembered per process while the file is unchanged."""
    if not path.is_file():
        return False
    state = _file_state(path)
    if recorded is None:
        return _readable_shard(path)
    if (state, recorded) in _VERIFIED:
        return True
    if shard_digest(path) != recorded:
        return False
    _VERIFIED.add((state, recorded))
    return True


def _verify_shards(folder: Path, entries: list[dict[str, Any]], count_key: str) -> bool:
    """Check each listed shard against its recorded SHA-256 and its recorded count; a shard listed without a
    digest (a store written before checksums) is checked for parsing and gets its digest recorded (True:
    entries changed). A damaged shard is a ProbingError naming it."""
    changed = False
    for entry in entries:
        path = folder / entry["file"]
        if not path.is_file():
            raise ProbingError(f"{path}: shard missing; rerun the same `probing extract` to recompute it")
        if not _intact(path, entry.get("sha256")):
            reason = "it does not parse" if entry.get("sha256") is None else "its SHA-256 differs from the manifest's"
            raise ProbingError(f"{path}: shard damaged ({reason}); rerun the same `probing extract` to recompute it")
        if entry.get("sha256") is None:
            entry["sha256"] = shard_digest(path)
            _VERIFIED.add((_file_state(path), entry["sha256"]))
            changed = True
        found = _shard_metadata(path).get(count_key)
        if found != entry.get(count_key):
            raise ProbingError(f"{path}: holds {found} {count_key} but the manifest lists {entry.get(count_key)}")
    return changed


def verify_store(path: Path, manifest: dict[str, Any]) -> None:
    """Check a complete store's shards against its manifest: their SHA-256 and example counts, and the total.

    A store written before checksums is trusted once: its shards' digests are recorded in its manifest (when
    the folder is writable), so that every later read checks them.
    """
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and "file" in e for e in shards):
        raise ProbingError(f"{path / MANIFEST_NAME}: field 'shards' is damaged")
    changed = _verify_shards(path, shards, "examples")
    if manifest.get("examples") != sum(int(entry["examples"]) for entry in shards):
        raise ProbingError(
            f"{path / MANIFEST_NAME}: field 'examples' is {manifest.get('examples')!r} but its shards hold "
            f"{sum(int(entry['examples']) for entry in shards)}"
        )
    if manifest.get("vision"):
        changed |= _verify_shards(path / VISION_FOLDER, manifest["vision"]["shards"], "images")
    if changed:
        try:
            write_json(path / MANIFEST_NAME, manifest)
            log.info("%s: recorded the SHA-256 of its shards (a store written before checksums)", path)
        except OSError as error:  # a read-only store: verified by parsing this time, digests not kept
            log.warning("%s: could not record its shards' checksums (%s)", path, error.strerror)


def _shard_metadata(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))


class _ShardedTensors:
    """Read side shared by FeatureStore and VisionStore: ids and named tensors concatenated over shards."""

    def __init__(self, folder: Path, shard_files: Sequence[str]):
        self.folder = folder
        self.shard_files = list(shard_files)
        missing = [name for name in self.shard_files if not (folder / name).is_file()]
        if missing:
            raise ProbingError(f"{folder / missing[0]}: shard missing ({len(missing)} of {len(self.shard_files)})")

    @cached_property
    def ids(self) -> list[int]:
        ids: list[int] = []
        for name in self.shard_files:
            with safe_open(self.folder / name, framework="pt") as handle:
                ids.extend(handle.get_tensor("ids").tolist())
        return ids

    def example_rows(self) -> torch.Tensor:
        """Per-image stores: the row of `load`'s result that each example reads, `[N]` (shard offsets added)."""
        rows, offset = [], 0
        for name in self.shard_files:
            with safe_open(self.folder / name, framework="pt") as handle:
                rows.append(handle.get_tensor("example_rows") + offset)
                offset += handle.get_slice("image_ids").get_shape()[0]
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)

    def load(
        self, key: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Concatenate `key` over shards into one preallocated tensor (one shard in memory at a time)."""
        if not self.shard_files:
            raise ProbingError(f"{self.folder}: store has no shards")
        total = 0
        for name in self.shard_files:  # shapes from the headers: nothing is read yet
            with safe_open(self.folder / name, framework="pt") as handle:
                total += handle.get_slice(key).get_shape()[0]
        result: torch.Tensor | None = None
        offset = 0
        for name in self.shard_files:
            with safe_open(self.folder / name, framework="pt") as handle:
                part = handle.get_tensor(key)
            if len(part) == 0:
                # Adds no row, and its other dimensions may be placeholders (a vision shard whose images were
                # all bad is written as [0, 0, 0]): the output is shaped by the first shard with rows.
                continue
            if result is None:
                result = torch.empty((total, *part.shape[1:]), dtype=dtype or part.dtype, device=device)
            result[offset : offset + len(part)] = part.to(device=result.device, dtype=result.dtype)
            offset += len(part)
        if result is None:  # every shard is empty: no row to return
            return torch.empty((0, *part.shape[1:]), dtype=dtype or part.dtype, device=device)
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
        self.path = Path(path)
        self.manifest: dict[str, Any] = _read_complete_manifest(self.path, "feature store")
        if verification_enabled() if verify is None else verify:
            verify_store(self.path, self.manifest)
        self._tensors = _ShardedTensors(self.path, [s["file"] for s in self.manifest["shards"]])

    @property
    def ids(self) -> list[int]:
        return self._tensors.ids

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["request"]["layers"])

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
        if layer not in self.layers:
            raise ProbingError(f"{self.path}: layer {layer} is not in the store (it has {self.layers})")
        states = self._tensors.load(layer_key(layer), dtype=dtype, device=device)
        return states, (self._tensors.example_rows() if self.per_image else None)

    @property
    def vision(self) -> VisionStore:
        return VisionStore(self.path / VISION_FOLDER)


class VisionStore:
    """Per-image ViT outputs written with --store-vision: `.ids` are image ids, `.load() -> [M, V, D]`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        parent = _read_complete_manifest(self.path.parent, "feature store")
        if not parent.get("vision"):
            raise ProbingError(f"{self.path.parent}: extracted without --store-vision")
        self.manifest = parent
        self._tensors = _ShardedTensors(self.path, [s["file"] for s in parent["vision"]["shards"]])

    @property
    def ids(self) -> list[int]:
        return self._tensors.ids

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        return self._tensors.load("image_embeds", dtype=dtype, device=device)


class FeatureStoreWriter:
    """Write side: checks an existing store against the request, lists finished shards, finalises.

    `identity` is the part of the manifest that defines the request; an existing store whose identity
    differs is refused, naming the first differing field. Safe with several processes (accelerate): each
    writes its own shards; the main process writes the manifests.
    """

    def __init__(self, path: Path, identity: Mapping[str, Any]):
        """Read-only checks (safe on every process at once); `prepare()` then creates the store."""
        self.path = Path(path)
        self.identity = json_normalised(identity)
        if self.path.exists() and not self.path.is_dir():
            raise ProbingError(f"{self.path}: exists and is not a directory")
        existing = read_manifest(self.path) if self.path.is_dir() else None
        if existing is None and self.path.is_dir() and any(self.path.iterdir()):
            raise ProbingError(f"{self.path}: not empty and has no {MANIFEST_NAME}; choose another output directory")
        if existing is not None:
            differing = first_difference(self.identity, existing.get("request", {}))
            if differing is not None:
                raise ProbingError(
                    f"{self.path}: holds features made with a different '{differing}'; "
                    "choose another output directory or remove it"
                )
        self.exists = existing is not None
        self.complete = bool(existing and existing.get("complete"))

    def prepare(self) -> None:
        """Create the folder and its first manifest (main process only, before any shard is written)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.exists:  # the manifest first, so that the folder is never ours without saying so
            write_json(self.path / MANIFEST_NAME, {"request": self.identity, "complete": False})
        if self.identity.get("store_vision"):
            (self.path / VISION_FOLDER).mkdir(exist_ok=True)
        self._sweep_partials()

    def _sweep_partials(self) -> None:
        for folder in (self.path, self.path / VISION_FOLDER):
            if folder.is_dir():
                sweep_stale_partials(folder, f".*{PARTIAL_MARK}*")

    def _shard_paths(self, index: int) -> list[Path]:
        paths = [self.path / shard_name(index)]
        if self.identity.get("store_vision"):
            paths.insert(0, self.path / VISION_FOLDER / shard_name(index))
        return paths

    def shard_done(self, index: int) -> bool:
        """Whether shard `index` is on disk and whole: its bytes match the SHA-256 written beside it (a shard
        from before checksums, with none beside it, must parse and gets one). A damaged shard is deleted and
        reported not done, so that a resumed extraction recomputes it."""
        paths = self._shard_paths(index)
        if not paths[-1].is_file():  # the query shard is written last: without it the unit of work is not done
            return False
        for path in paths:
            sidecar = checksum_sidecar(path)
            whole = path.is_file()
            if whole and sidecar.is_file():
                whole = sidecar.read_text(encoding="utf-8").strip() == shard_digest(path)
            elif whole:
                whole = _readable_shard(path)
                if whole:
                    write_bytes(sidecar, shard_digest(path).encode())
            if not whole:
                log.warning("%s: damaged; computing it again", path)
                for damaged in paths:
                    damaged.unlink(missing_ok=True)
                    checksum_sidecar(damaged).unlink(missing_ok=True)
                return False
        return True

    def write_shard(
        self,
        index: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        vision: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write one unit of work: the vision shard first (a query shard on disk means its unit is done), each
        shard's SHA-256 beside it before the shard itself (a shard without one is from before checksums)."""
        for name, tensor in [*tensors.items(), *(vision or {}).items()]:
            if tensor.is_floating_point() and not all_finite(tensor):
                raise ProbingError(
                    f"{self.path / shard_name(index)}: '{name}' holds non-finite values (NaN or inf) for example "
                    f"ids {tensors['ids'].tolist()[:5]}...: the model's outputs overflowed or a checkpoint is "
                    "damaged; nothing of this shard was written"
                )
        if vision is not None:
            save_shard(self.path / VISION_FOLDER / shard_name(index), vision, {"images": len(vision["ids"])})
        save_shard(self.path / shard_name(index), tensors, metadata)

    def damaged_shards(self) -> list[int]:
        """The shards of a complete store that are missing or whose bytes differ from the manifest's SHA-256
        (unparsable, for a store from before checksums)."""
        manifest = read_manifest(self.path) or {}
        listed = [("", manifest.get("shards", [])), (VISION_FOLDER, (manifest.get("vision") or {}).get("shards", []))]
        damaged: set[int] = set()
        for folder, entries in listed:
            for index, entry in enumerate(entries):
                if not _intact(self.path / folder / entry["file"], entry.get("sha256")):
                    damaged.add(index)
        return sorted(damaged)

    def reopen(self, damaged: Sequence[int]) -> None:
        """Make a complete store resumable again with shards `damaged` to compute (main process only): the good
        shards keep the digests the manifest recorded (beside them again), the damaged ones are removed."""
        manifest = read_manifest(self.path) or {}
        entries = {"": manifest.get("shards", []), VISION_FOLDER: (manifest.get("vision") or {}).get("shards", [])}
        for folder, listed in entries.items():
            for index, entry in enumerate(listed):
                path = self.path / folder / entry["file"]
                if index in damaged:
                    path.unlink(missing_ok=True)
                elif entry.get("sha256"):
                    write_bytes(checksum_sidecar(path), entry["sha256"].encode())
        write_json(self.path / MANIFEST_NAME, {"request": self.identity, "complete": False})
        self.exists, self.complete = True, False

    def finish(self, shard_count: int, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Check every shard exists, gather per-shard metadata, write the complete manifest."""
        shards, bad_images, examples = [], [], 0
        for index in range(shard_count):
            path = self.path / shard_name(index)
            if not path.is_file():
                raise ProbingError(f"{path}: shard missing after extraction")  # a worker process failed
            metadata = _shard_metadata(path)
            shards.append({"file": shard_name(index), "examples": metadata["examples"], "sha256": _sidecar(path)})
            examples += metadata["examples"]
            bad_images += metadata.get("bad_images", [])
        manifest: dict[str, Any] = {
            "request": self.identity,
            "complete": True,
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
                    {"file": shard_name(index), "images": _shard_metadata(path)["images"], "sha256": _sidecar(path)}
                )
            manifest["vision"] = {"shards": vision_shards, "images": sum(s["images"] for s in vision_shards)}
        write_json(self.path / MANIFEST_NAME, manifest)
        for index in range(shard_count):  # the manifest holds the digests now
            for path in self._shard_paths(index):
                checksum_sidecar(path).unlink(missing_ok=True)
        return manifest


def _sidecar(path: Path) -> str:
    """The SHA-256 written beside a shard (computed now for a shard from before checksums)."""
    sidecar = checksum_sidecar(path)
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else shard_digest(path)
