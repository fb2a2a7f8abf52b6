"""Benchmark: what verifying a feature store costs, same run.

A synthetic store in the real layout (`FeatureStoreWriter`: fp16 query states of 32 x 768 per example and layer,
13 layers, shards of 64 examples) is loaded whole (every layer), alternately with verification, as a fresh
process's first load does, and with `PROBING_NO_VERIFY=1` (`probing --no-verify`); `--repeats` times each, the best
of each counts (alternating spreads the load of a shared machine over both). The files are read once before
timing, so both loads come from the page cache and the difference is the hashing.

How a store is verified: when it opens, every file it lists is hashed (SHA-256) by parallel threads (one per core,
at most 8; hashlib releases the GIL), each read into one reused buffer, and compared with the manifest; a verified
file is remembered per process by (path, inode, size, mtime), so later opens and loads do not hash it again.
Files a process has just written were hashed from the bytes in memory as they were written, and are not read back.
The cost is bounded below by the hashing: with c cores, about 1 + (hash time / c) / (load time).

Then SHA-256 against BLAKE2b (hashlib) on the same bytes: SHA-256 stays the digest because it is the faster of the
two on x86 CPUs with the SHA extensions (SHA-NI, which OpenSSL uses), because every tool has it (`sha256sum`
checks a shard by hand), and because every store written so far records it. The last line is
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

import torch

from probing.store.features import (
    _VERIFIED,
    NO_VERIFY_VARIABLE,
    FeatureStore,
    FeatureStoreWriter,
    _hash_threads,
    layer_key,
)


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
    _VERIFIED.clear()  # a fresh process: nothing verified yet
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


def hash_rate(name: str, data: bytes, repeats: int) -> float:
    """GB/s of hashlib's `name` over `data` (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        hashlib.new(name, data).digest()
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
        verified, trusted = float("inf"), float("inf")
        for _ in range(args.repeats):
            verified = min(verified, load_all(folder, verify=True))
            trusted = min(trusted, load_all(folder, verify=False))
        print(f"load with verification (first load, every shard hashed, {_hash_threads()} threads): {verified:.3f} s")
        print(f"load with --no-verify:                                    {trusted:.3f} s")
        print(f"verification adds {verified - trusted:.3f} s ({100 * (verified / trusted - 1):.0f} % of the load)")
        sha256 = hash_rate("sha256", data, args.repeats)
        blake2b = hash_rate("blake2b", data, args.repeats)
        print(
            f"hashlib on {platform.machine()}: sha256 {sha256:.2f} GB/s, blake2b {blake2b:.2f} GB/s "
            f"(sha256 / blake2b = {sha256 / blake2b:.2f})"
        )
        print(f"speedup={verified / trusted:.3f}")


if __name__ == "__main__":
    main()
