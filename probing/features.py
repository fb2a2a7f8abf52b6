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

import json
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probing.artifacts import (
    MANIFEST_NAME,
    PARTIAL_MARK,
    first_difference,
    json_normalised,
    read_manifest,
    sweep_stale_partials,
    write_json,
)
from probing.errors import ProbingError

STORE_FORMAT_VERSION = 1  # the request's "format_version": bump when the layout or the values change
PER_IMAGE = "per image"  # the request's "rows" for backends that read no text (absent: one row per example)
VISION_FOLDER = "vision"
_METADATA_KEY = "probing"


def layer_key(layer: int) -> str:
    return f"layer_{layer:02d}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def save_shard(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write one shard atomically: temporary name, fsync, rename."""
    temporary = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    # One metadata key holding sorted JSON: safetensors keeps metadata in a hash map whose order changes from
    # process to process, which would make identical shards differ in bytes.
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(temporary),
        metadata={_METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)},
    )
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest: dict[str, Any] = _read_complete_manifest(self.path, "feature store")
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

    def shard_done(self, index: int) -> bool:
        return (self.path / shard_name(index)).is_file()

    def write_shard(
        self,
        index: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        vision: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        # The vision shard goes first: a query shard on disk means its whole unit of work is done.
        if vision is not None:
            save_shard(self.path / VISION_FOLDER / shard_name(index), vision, {"images": len(vision["ids"])})
        save_shard(self.path / shard_name(index), tensors, metadata)

    def finish(self, shard_count: int, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Check every shard exists, gather per-shard metadata, write the complete manifest."""
        shards, bad_images, examples = [], [], 0
        for index in range(shard_count):
            path = self.path / shard_name(index)
            if not path.is_file():
                raise ProbingError(f"{path}: shard missing after extraction")  # a worker process failed
            metadata = _shard_metadata(path)
            shards.append({"file": shard_name(index), "examples": metadata["examples"]})
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
            vision_shards = [
                {"file": shard_name(i), "images": _shard_metadata(self.path / VISION_FOLDER / shard_name(i))["images"]}
                for i in range(shard_count)
            ]
            manifest["vision"] = {"shards": vision_shards, "images": sum(s["images"] for s in vision_shards)}
        write_json(self.path / MANIFEST_NAME, manifest)
        return manifest
