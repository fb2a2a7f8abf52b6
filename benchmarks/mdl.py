"""Benchmark: the online code of `probing mdl` with every prefix's probe in one batched pass, against training
each prefix on its own, same run.

Features of the real layout (32 x 768 = 24,576 per example, random values, labels a linear function of
them), Voita & Titov's blocks (0.1 ... 100 % of train, so 10 prefix probes), batch 128, the same epochs for
every prefix. The plain way is the toolkit's own frozen trainer (`train_frozen`, features resident on the
device, batches sliced by index) run once per prefix on a copy of that prefix's rows, which is how one would
compute the code without the batched pass; ours is `online_code(..., batched=True)`. Both code the blocks the
same way afterwards, and both codelengths are printed (they agree to rounding). The last line is
`speedup=<plain seconds / batched seconds>`.

    python benchmarks/mdl.py                          # CPU: 4,096 examples
    python benchmarks/mdl.py --examples 80000         # GPU: RefCOCOg-sized, bf16 features resident
"""

from __future__ import annotations

import argparse
import time

import torch

from probing.probes.train import ProbeData, TrainSettings, Trial, resolve_device
from probing.studies.mdl import block_ends, online_code


def synthetic(rows: int, width: int, seed: int) -> ProbeData:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, width, generator=generator, dtype=torch.float32).to(torch.float16)
    direction = torch.randn(width, generator=torch.Generator().manual_seed(99))
    labels = (features.float() @ direction > 0).float()
    return ProbeData("vsr", "bench", features, labels, list(range(rows)), [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(train: ProbeData, val: ProbeData, trial: Trial, settings: TrainSettings, batched: bool):
    device = resolve_device(settings.device)
    _sync(device)
    started = time.perf_counter()
    code = online_code(train, val, trial, settings, shuffle_seed=0, batched=batched)
    _sync(device)
    return time.perf_counter() - started, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4096, help="train examples")
    parser.add_argument("--width", type=int, default=32 * 768, help="features per example")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--probe", default="linear")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    train = synthetic(args.examples, args.width, 0)
    val = synthetic(max(args.examples // 8, 256), args.width, 1)
    settings = TrainSettings(task="vsr", probe=args.probe, batch_size=128, device=str(device))
    trial = Trial(lr=1e-4, epochs=args.epochs, seed=0)
    warm = synthetic(512, args.width, 2)  # warm-up both ways (allocator, kernels)
    timed(warm, val, Trial(lr=1e-4, epochs=1), settings, True)
    timed(warm, val, Trial(lr=1e-4, epochs=1), settings, False)
    ends = block_ends(args.examples)
    print(
        f"online code, {args.probe} probes: {args.examples} x {args.width} features on {device}, batch 128, "
        f"{args.epochs} epochs, blocks ending at {ends} ({len(ends) - 1} prefix probes)"
    )
    plain_seconds, plain = timed(train, val, trial, settings, False)
    batched_seconds, batched = timed(train, val, trial, settings, True)
    for name, seconds, code in (
        ("each prefix alone", plain_seconds, plain),
        ("one batched pass", batched_seconds, batched),
    ):
        print(
            f"  {name:18s} {seconds:8.2f} s   codelength {code.online_bits / 1000:9.3f} kbits   "
            f"compression {code.compression:.4f}"
        )
    print(f"speedup={plain_seconds / batched_seconds:.2f}")


if __name__ == "__main__":
    main()
