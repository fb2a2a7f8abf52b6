"""Benchmark: how fast extraction writes its feature shards, same run.

Extraction's GPU work is followed by host work per shard: the finiteness check, safetensors serialisation,
the SHA-256 and the write with fsync. One H200 run (`benchmarks/gpu.sh`, extract step) gave 196 examples/s
whatever the image size or the decoding workers, and that host work, timed alone on a CPU, came to about
220 examples/s in one thread: the writer, not the GPU, set the pace. This benchmark times it alone.

Shards in the real layout (fp16 query states of 32 x 768 per example and layer, 13 layers, `--shard-size`
examples) are written to a fresh store twice:
- ours: `ShardWriters` as extraction runs it (`FeatureStoreWriter.write_shard`, whose finiteness check takes the
  smallest and largest values, in `--threads` threads with back-pressure);
- plain: one thread, each shard checked element by element (`torch.isfinite(...).all()`) and saved with
  safetensors' `save_file`, with its SHA-256 computed from the written file.
The last line is `speedup=<examples/s ours / examples/s plain>`.

    python benchmarks/write.py                      # 4 shards of 1,024 examples (about 2.6 GB), 2 threads
    python benchmarks/write.py --threads 4 --shards 8
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from probing.store.extract import ShardWriters, default_write_threads
from probing.store.features import FeatureStoreWriter, layer_key


def make_shards(count: int, size: int, layers: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shards = []
    for index in range(count):
        tensors = {"ids": torch.arange(index * size, (index + 1) * size, dtype=torch.int64)}
        for layer in range(layers):
            tensors[layer_key(layer)] = torch.randn(size, 32, 768, generator=generator).to(torch.float16)
        shards.append(tensors)
    return shards


def write_ours(folder: Path, shards: list[dict[str, torch.Tensor]], threads: int) -> float:
    writer = FeatureStoreWriter(folder, {"kind": "features", "benchmark": True})
    writer.prepare()
    started = time.perf_counter()
    with ShardWriters(writer, threads) as writers:
        for index, tensors in enumerate(shards):
            writers.submit(index, tensors, {"examples": len(tensors["ids"])})
    return time.perf_counter() - started


def write_plain(folder: Path, shards: list[dict[str, torch.Tensor]]) -> float:
    folder.mkdir()
    started = time.perf_counter()
    for index, tensors in enumerate(shards):
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}: not finite")
        path = folder / f"shard-{index:05d}.safetensors"
        save_file(tensors, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.with_suffix(".sha256").write_text(digest)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=1024, help="examples per shard (extraction's default)")
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--threads", type=int, default=max(2, default_write_threads()))
    args = parser.parse_args()
    shards = make_shards(args.shards, args.shard_size, args.layers)
    examples = args.shards * args.shard_size
    size_gb = sum(t.numel() * t.element_size() for shard in shards for t in shard.values()) / 1e9
    print(
        f"{args.shards} shards x {args.shard_size} examples x {args.layers} layers of 32 x 768 fp16 ({size_gb:.2f} GB),"
        f" {args.threads} writing threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        plain = write_plain(Path(scratch) / "plain", shards)
        ours = write_ours(Path(scratch) / "ours", shards, args.threads)
    print(f"ours:  {examples / ours:8.1f} examples/s ({ours:.2f} s)")
    print(f"plain: {examples / plain:8.1f} examples/s ({plain:.2f} s; one thread, elementwise check, save_file)")
    print(f"speedup={plain / ours:.2f}")


if __name__ == "__main__":
    main()
