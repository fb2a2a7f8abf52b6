"""Benchmark: the feature-store writer against the disk, same run.

Extraction's GPU work is followed by host work per shard: the finiteness check, safetensors serialisation,
the SHA-256 and the write with fsync. One H200 run (`benchmarks/gpu.sh`, extract step) once gave 196 examples/s
whatever the image size or the decoding workers: the writer, not the GPU, set the pace. The goal is a writer at
the disk's speed, so this benchmark compares it with the disk:
- writer: `ShardWriters` as extraction runs it on a CPU: `FeatureStoreWriter.write_shard` in `--threads` threads
  with back-pressure, each shard checked for NaN and inf (smallest and largest values: on a GPU the check runs on
  the device instead and costs the writer nothing), written from the tensors' memory in safetensors' format while
  its SHA-256 is computed from the same bytes, one fsync, a rename;
- plain: the same bytes, already serialised, written with `write` and one `fsync` per shard file, one thread: what
  the disk gives a program that does nothing else.
Shards are in the real layout (fp16 query states of 32 x 768 per example and layer, `--layers` layers, `--shard-size`
examples, int64 ids). Each side runs `--repeats` times, alternating, into fresh folders; the best run counts.
The last line is `speedup=<writer GB/s / plain write+fsync GB/s>` (the goal: at least 0.8).

    python benchmarks/write.py                      # 4 shards of 512 examples x 13 layers (about 1.3 GB)
    python benchmarks/write.py --shards 8 --shard-size 1024 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

from probing.store.extract import ShardWriters, default_write_threads
from probing.store.features import _METADATA_KEY, FeatureStoreWriter, finite_per_layer, layer_key


def make_shards(count: int, size: int, layers: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shards = []
    for index in range(count):
        tensors = {"ids": torch.arange(index * size, (index + 1) * size, dtype=torch.int64)}
        for layer in range(1, layers + 1):
            tensors[layer_key(layer)] = torch.randn(size, 32, 768, generator=generator).to(torch.float16)
        shards.append(tensors)
    return shards


def metadata(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"examples": len(tensors["ids"])}


def device_flags(shards: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Per shard and layer, whether it is finite, computed before timing: a GPU extraction computes these on the
    device beside the cast (`finite_per_layer`) and hands them to the writer, which then checks nothing itself."""
    return [
        {
            name: finite_per_layer(tensor.unsqueeze(0))[0]
            for name, tensor in tensors.items()
            if name.startswith("layer_")
        }
        for tensors in shards
    ]


def write_ours(
    folder: Path, shards: list[dict[str, torch.Tensor]], threads: int, flags: list[dict[str, torch.Tensor]] | None
) -> float:
    writer = FeatureStoreWriter(folder, {"kind": "features", "benchmark": True})
    writer.prepare([int(name.removeprefix("layer_")) for name in shards[0] if name.startswith("layer_")])
    started = time.perf_counter()
    with ShardWriters(writer, threads) as writers:
        for index, tensors in enumerate(shards):
            writers.submit(index, tensors, metadata(tensors), finite=None if flags is None else flags[index])
    return time.perf_counter() - started


def write_plain(folder: Path, files: list[bytes]) -> float:
    """Raw bytes, `write` + one `fsync` per file, one thread."""
    folder.mkdir()
    started = time.perf_counter()
    for index, data in enumerate(files):
        with open(folder / f"shard-{index:05d}.safetensors", "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=512, help="examples per shard")
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--threads", type=int, default=max(2, default_write_threads()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--check",
        choices=("host", "device"),
        default="host",
        help="where NaN and inf are looked for: host (a CPU extraction: the writer does it) or device (a GPU "
        "extraction: flags computed beside the cast, the writer only reads them)",
    )
    args = parser.parse_args()

    shards = make_shards(args.shards, args.shard_size, args.layers)
    # the very bytes the writer puts on disk (its files equal safetensors' `save`: tests/test_store_growth.py)
    files = [save(t, {_METADATA_KEY: json.dumps(metadata(t), sort_keys=True)}) for t in shards]
    size = sum(len(data) for data in files)
    print(
        f"{args.shards} shards x {args.shard_size} examples x {args.layers} layers of 32 x 768 fp16 "
        f"({size / 1e9:.2f} GB), {args.threads} writing threads, finiteness checked on the {args.check}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    flags = device_flags(shards) if args.check == "device" else None
    ours, plain = float("inf"), float("inf")
    with tempfile.TemporaryDirectory(dir=".", prefix=".write-benchmark-") as scratch:
        for repeat in range(args.repeats):
            plain = min(plain, write_plain(Path(scratch) / f"plain-{repeat}", files))
            shutil.rmtree(Path(scratch) / f"plain-{repeat}")
            ours = min(ours, write_ours(Path(scratch) / f"ours-{repeat}", shards, args.threads, flags))
            written = sum(p.stat().st_size for p in (Path(scratch) / f"ours-{repeat}").glob("shard-*.safetensors"))
            assert written == size, (written, size)  # the same bytes on both sides
            shutil.rmtree(Path(scratch) / f"ours-{repeat}")
    examples = args.shards * args.shard_size
    best = f"best of {args.repeats}"
    print(f"writer: {size / ours / 1e9:6.2f} GB/s {examples / ours:8.1f} examples/s ({ours:.2f} s, {best})")
    print(
        f"plain:  {size / plain / 1e9:6.2f} GB/s {examples / plain:8.1f} examples/s ({plain:.2f} s, {best}; one thread)"
    )
    print(f"speedup={plain / ours:.2f}")


if __name__ == "__main__":
    main()
