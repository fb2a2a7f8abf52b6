"""Benchmark: what verifying a feature store costs, same run.

A synthetic store in the real layout (`FeatureStoreWriter`: fp16 query states of 32 x 768 per example and layer,
13 layers, shards of 64 examples) is loaded whole (every layer), alternately with verification, as a fresh
process's first load does, and with `PROBING_NO_VERIFY=1` (`probing --no-verify`); `--repeats` times each, the best
of each counts (alternating spreads the load of a shared machine over both), twice:
- from the disk ("cold"): before each load the store's files leave the page cache (`posix_fadvise(DONTNEED)`, which
  drops a file's clean cached pages without privileges), as for a fresh process reading a store written hours ago or
  one larger than the memory (RefCOCOg at every layer is about 60 GB a model). The reading thread waits on the disk
  while the hashing threads keep up, so the hashing hides behind the read;
- from the page cache ("warm"): the files were just read, so the load is a memory copy, and hashing on the other
  core has to keep pace with it; on two cores it cannot quite (see docs/performance.md).
For reference, the same shards
loaded with `safetensors.torch.load_file` (every tensor of every shard copied out of the mapped file, no
verification, nothing concatenated).

How a store is verified (`probing/store/regions.py`): its manifest records, per file, the BLAKE3 of the header and
of each tensor's bytes. Opening it checks the headers (their digests, the files' sizes); `load(layer)` reads each
shard's region of that layer once, with `readinto`, 1 MB at a time, straight into the preallocated result, and
hashes the bytes it read in a thread while it reads the next chunk (one hashing thread per core but the reader's;
the reader hashes its latest chunk itself when the threads fall behind), then compares with the manifest before
returning. The unverified load is the same read without the hashing (one thread). A verified region is remembered
per process by its file's (device, inode, size, mtime, ctime), so later loads do not hash it again; files a process
has just written were hashed from memory as they were written.

Then SHA-256 (hashlib, which stores written before BLAKE3 record) against BLAKE3 (one thread, and one per core) on
the same bytes: why the digest is BLAKE3. The last line is
`speedup=<seconds of the verified load / seconds of the unverified load>` from the disk (the goal: at most 1.2;
the page cache's ratio where the system cannot drop a file's cached pages, and with `--warm`).

    python benchmarks/verify.py                       # 500 examples x 13 layers (about 320 MB)
    python benchmarks/verify.py --examples 128        # a quicker check
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path

import blake3
import torch
from safetensors.torch import load_file

from probing.store.features import (
    NO_VERIFY_VARIABLE,
    FeatureStore,
    FeatureStoreWriter,
    layer_key,
)
from probing.store.regions import forget_verified, hash_threads


def write_store(folder: Path, examples: int, layers: int, queries: int, width: int, shard: int) -> None:
    writer = FeatureStoreWriter(folder, {"kind": "features", "benchmark": True})
    writer.prepare(list(range(1, layers + 1)))
    generator = torch.Generator().manual_seed(0)
    shards = (examples + shard - 1) // shard
    for index in range(shards):
        rows = min(shard, examples - index * shard)
        tensors = {"ids": torch.arange(index * shard, index * shard + rows, dtype=torch.int64)}
        for layer in range(1, layers + 1):
            tensors[layer_key(layer)] = torch.randn(rows, queries, width, generator=generator).to(torch.float16)
        writer.write_shard(index, tensors, {"examples": rows})
    writer.finish(shards, {})


def load_all(folder: Path, verify: bool) -> float:
    """Seconds to open the store (verifying or not) and load every layer."""
    forget_verified()  # a fresh process: nothing verified, no header read yet
    if verify:
        os.environ.pop(NO_VERIFY_VARIABLE, None)
    else:
        os.environ[NO_VERIFY_VARIABLE] = "1"
    started = time.perf_counter()
    store = FeatureStore(folder)
    total = sum(store.load(layer).numel() for layer in store.layers)
    seconds = time.perf_counter() - started
    assert total > 0
    os.environ.pop(NO_VERIFY_VARIABLE, None)
    return seconds


def drop_cached(folder: Path) -> bool:
    """Drop the store's files from the page cache (their pages are clean: the writer fsynced them); False where the
    system has no `posix_fadvise`."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
    return True


def cold_load(folder: Path, verify: bool) -> float:
    """`load_all` with the store's files read from the disk."""
    drop_cached(folder)
    return load_all(folder, verify)


def plain_load(shards: list[Path]) -> float:
    """Seconds to load every tensor of every shard with safetensors itself (no verification, no concatenation),
    each copied into the process's memory (`load_file` maps the file and copies nothing until a tensor is read)."""
    started = time.perf_counter()
    total = sum(tensor.clone().numel() for path in shards for tensor in load_file(path).values())
    seconds = time.perf_counter() - started
    assert total > 0
    return seconds


def hash_rate(digest, data: bytes, repeats: int) -> float:
    """GB/s of `digest(data)` (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        digest(data)
        best = min(best, time.perf_counter() - started)
    return len(data) / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm", action="store_true", help="the last line from the page cache, not the disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probing-verify-") as root:
        folder = Path(root) / "store"
        started = time.perf_counter()
        write_store(folder, args.examples, args.layers, args.queries, args.width, args.shard_size)
        shards = sorted(folder.glob("shard-*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        print(
            f"store: {args.examples} examples x {args.layers} layers x {args.queries} x {args.width} fp16, "
            f"{len(shards)} shards, {size / 1e6:.0f} MB, written in {time.perf_counter() - started:.1f} s"
        )
        data = b"".join(p.read_bytes() for p in shards)  # also warms the page cache for both loads
        cold = drop_cached(folder)
        best = {key: float("inf") for key in ("verified", "trusted", "cold verified", "cold trusted", "plain")}
        for _ in range(args.repeats):
            best["verified"] = min(best["verified"], load_all(folder, verify=True))
            best["trusted"] = min(best["trusted"], load_all(folder, verify=False))
            best["plain"] = min(best["plain"], plain_load(shards))
            if cold:
                best["cold verified"] = min(best["cold verified"], cold_load(folder, verify=True))
                best["cold trusted"] = min(best["cold trusted"], cold_load(folder, verify=False))
        threads = hash_threads()
        print(f"hashing threads beside the reader: {max(1, threads - 1)}")
        for where, prefix in (("page cache", ""), ("disk", "cold ")):
            if prefix and not cold:
                print("disk: not measured (no posix_fadvise here to drop the store from the page cache)")
                continue
            verified, trusted = best[prefix + "verified"], best[prefix + "trusted"]
            print(
                f"from the {where}: verified {verified:.3f} s ({size / verified / 1e9:.2f} GB/s), --no-verify "
                f"{trusted:.3f} s ({size / trusted / 1e9:.2f} GB/s): {verified / trusted:.2f}x"
            )
        print(f"safetensors load_file of every shard, copied, page cache (reference): {best['plain']:.3f} s")
        sha256 = hash_rate(lambda b: hashlib.sha256(b).digest(), data, args.repeats)
        one = hash_rate(lambda b: blake3.blake3(b).digest(), data, args.repeats)
        many = hash_rate(lambda b: blake3.blake3(b, max_threads=threads).digest(), data, args.repeats)
        print(
            f"on {platform.machine()}: sha256 {sha256:.2f} GB/s, blake3 {one:.2f} GB/s on one thread, "
            f"{many:.2f} GB/s on {threads} (blake3 / sha256 = {one / sha256:.1f} a thread)"
        )
        prefix = "" if args.warm or not cold else "cold "
        print(f"speedup={best[prefix + 'verified'] / best[prefix + 'trusted']:.3f}")


if __name__ == "__main__":
    main()
