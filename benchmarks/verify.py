"""Benchmark: what verifying a feature store costs, same run.

A synthetic store in the real layout (`FeatureStoreWriter`: fp16 query states of 32 x 768 per example and layer,
13 layers, shards of 64 examples) is loaded whole (every layer), alternately with verification, as a fresh
process's first load does, and with `PROBING_NO_VERIFY=1` (`probing --no-verify`); `--repeats` times each, the best
of each counts (alternating spreads the load of a shared machine over both). The files are read once before
timing, so both loads come from the page cache and the difference is the hashing. For reference, the same shards
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
`speedup=<seconds of the verified load / seconds of the unverified load>` (the goal: at most 1.2).

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
        verified, trusted, plain = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeats):
            verified = min(verified, load_all(folder, verify=True))
            trusted = min(trusted, load_all(folder, verify=False))
            plain = min(plain, plain_load(shards))
        threads = hash_threads()
        print(f"load with verification (first load, every region hashed, {threads} threads): {verified:.3f} s")
        print(f"load with --no-verify (one thread):                        {trusted:.3f} s")
        print(f"safetensors load_file of every shard, copied (reference):  {plain:.3f} s")
        print(f"verification adds {verified - trusted:.3f} s ({100 * (verified / trusted - 1):.0f} % of the load)")
        sha256 = hash_rate(lambda b: hashlib.sha256(b).digest(), data, args.repeats)
        one = hash_rate(lambda b: blake3.blake3(b).digest(), data, args.repeats)
        many = hash_rate(lambda b: blake3.blake3(b, max_threads=threads).digest(), data, args.repeats)
        print(
            f"on {platform.machine()}: sha256 {sha256:.2f} GB/s, blake3 {one:.2f} GB/s on one thread, "
            f"{many:.2f} GB/s on {threads} (blake3 / sha256 = {one / sha256:.1f} a thread)"
        )
        print(f"speedup={verified / trusted:.3f}")


if __name__ == "__main__":
    main()
