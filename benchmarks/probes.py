"""Benchmark: K trials trained in one batched pass against K plain single-probe loops, same run.

Frozen: features of the real layout (32 x 768 = 24,576 per example, random values, labels a linear
function of them), batch 128, the same epochs for every trial. The plain way is `train_single`: the
standard PyTorch loop (DataLoader over a TensorDataset, nn.Linear probe, torch.optim.AdamW, LambdaLR,
evaluation each epoch), once per trial. Ours is `train_frozen` with all K trials in one pass.
Reported: seconds per trial (and per trial-epoch) both ways; the last line is
`speedup=<plain per-trial time / batched per-trial time>`.

Unfrozen (`--unfrozen`): the epoch time of unfrozen training with ViT outputs read from a vision store
against recomputing the ViT every batch, on the demo data with a tiny (CPU) or real-size (GPU) BLIP-2.

    python benchmarks/probes.py                         # CPU: 4,096 examples, K = 16
    python benchmarks/probes.py --examples 80000        # GPU: RefCOCOg-sized, bf16 features resident
    python benchmarks/probes.py --unfrozen              # adds the vision-store comparison
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from probing.train import ProbeData, TrainSettings, Trial, resolve_device, train_frozen, train_single


def synthetic(rows: int, width: int, seed: int) -> ProbeData:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, width, generator=generator, dtype=torch.float32).to(torch.float16)
    direction = torch.randn(width, generator=torch.Generator().manual_seed(99))
    labels = (features.float() @ direction > 0).float()
    return ProbeData("vsr", "bench", features, labels, list(range(rows)), [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frozen(args, device: torch.device) -> tuple[float, float]:
    width = 32 * 768
    train, val = synthetic(args.examples, width, 0), synthetic(max(args.examples // 8, 256), width, 1)
    settings = TrainSettings(task="vsr", probe=args.probe, batch_size=128, device=str(device))
    trials = [Trial(lr=1e-5 * (1.25 ** k), epochs=args.epochs, seed=k) for k in range(args.trials)]
    train_frozen(train, val, trials[:2], TrainSettings(**{**vars(settings)}))  # warm-up (allocator, kernels)
    _sync(device)
    started = time.perf_counter()
    train_frozen(train, val, trials, settings)
    _sync(device)
    batched = (time.perf_counter() - started) / len(trials)
    plain_trials = trials[:args.plain_trials]
    train_single(train, val, Trial(lr=1e-5, epochs=1), settings)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for trial in plain_trials:
        train_single(train, val, trial, settings)
    _sync(device)
    plain = (time.perf_counter() - started) / len(plain_trials)
    print(f"frozen {args.probe}: {args.examples} x {width} features, batch 128, {args.epochs} epochs, "
          f"K = {len(trials)} (plain measured on {len(plain_trials)} trials)")
    print(f"  batched: {batched:8.3f} s per trial ({batched / args.epochs:.4f} s per trial-epoch)")
    print(f"  plain:   {plain:8.3f} s per trial ({plain / args.epochs:.4f} s per trial-epoch)")
    return plain, batched


def unfrozen(args, device: torch.device) -> None:
    from probing.data import SPLITS, DataOptions, load_split
    from probing.data.synthetic import demo_data_options, make_demo_data
    from probing.extract import ExtractionRequest, extract
    from probing.features import FeatureStore
    from probing.models import load_resampler
    from probing.models.tiny import write_checkpoint
    from probing.probe_data import targets_for
    from probing.train import train_module
    from probing.unfrozen import VisionTable, unfrozen_run

    size = "real" if device.type == "cuda" else "tiny"
    init = "random" if size == "real" else "pretrained"
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_demo_data(scratch / "data", refcocog_images=20, vsr_images=args.vsr_images)
        options = DataOptions(task="vsr", **demo_data_options(scratch / "data")["vsr"])
        checkpoint = write_checkpoint(scratch / "model", "blip2", size=size, weights=size == "tiny")
        for split in SPLITS:
            extract(ExtractionRequest(model=str(checkpoint), data=options, split=split, out=scratch / "f" / split,
                                      layers="1", init=init, store_vision=True, progress=False, device=str(device)))
        examples = {s: load_split(options, s).examples for s in ("train", "val")}
        targets = {s: targets_for("vsr", examples[s], s) for s in examples}
        settings = TrainSettings(task="vsr", batch_size=args.unfrozen_batch, device=str(device))
        timings = {}
        for name in ("vision store", "recompute ViT"):
            resampler = load_resampler(str(checkpoint), init=init, device=device,
                                       vision_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            vision = None
            if name == "vision store":
                vision = {s: VisionTable(FeatureStore(scratch / "f" / s).vision) for s in ("train", "val")}
            trial = Trial(lr=1e-5, epochs=2)
            run = unfrozen_run(resampler, resampler.num_layers, (examples["train"], targets["train"]),
                               (examples["val"], targets["val"]), trial, settings, vision, workers=args.workers)
            _sync(device)
            started = time.perf_counter()
            train_module(run, trial, settings)
            _sync(device)
            timings[name] = (time.perf_counter() - started) / trial.epochs
        print(f"unfrozen ({size} BLIP-2, {len(examples['train'])} train examples, batch {args.unfrozen_batch}):")
        for name, seconds in timings.items():
            print(f"  {name:14s} {seconds:8.3f} s per epoch")
        print(f"  vision store speedup {timings['recompute ViT'] / timings['vision store']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--plain-trials", type=int, default=4, help="plain trials timed (per-trial mean)")
    parser.add_argument("--probe", default="linear")
    parser.add_argument("--unfrozen", action="store_true")
    parser.add_argument("--vsr-images", type=int, default=120)
    parser.add_argument("--unfrozen-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"torch={torch.__version__}", flush=True)
    if args.unfrozen:
        unfrozen(args, device)
    plain, batched = frozen(args, device)
    print(f"speedup={plain / batched:.2f}")


if __name__ == "__main__":
    sys.exit(main())
