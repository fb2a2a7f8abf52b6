"""Benchmark: K trials trained in one batched pass against K plain single-probe loops, same run.

Frozen: features of the real layout (32 x 768 = 24,576 per example, random values, labels a linear
function of them), batch 128, the same epochs for every trial. Two plain ways, once per trial each:
`train_single`, the standard PyTorch loop (DataLoader over a TensorDataset, nn.Linear probe,
torch.optim.AdamW, LambdaLR, evaluation each epoch), and the fastest plain loop we know: the same probe,
optimiser and schedule with the features resident on the device (bf16 on GPU) and batches sliced by index.
Ours is `train_frozen` with all K trials in one pass. Reported: seconds per trial (and per trial-epoch)
each way; the last line is `speedup=<resident plain per-trial time / batched per-trial time>` (against the
stronger baseline).

Unfrozen (`--unfrozen`): the epoch time of unfrozen training with ViT outputs read from a vision store
against recomputing the ViT every batch, on the demo data with a tiny (CPU) or real-size (GPU) BLIP-2.

    python benchmarks/probes.py                         # CPU: 4,096 examples, K = 16
    python benchmarks/probes.py --examples 80000        # GPU: RefCOCOg-sized, bf16 features resident
    python benchmarks/probes.py --unfrozen              # adds the vision-store comparison
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from probing.core.device_copies import to_device_chunked
from probing.probes.modules import new_probe
from probing.probes.train import (
    EVAL_CHUNK,
    ProbeData,
    TrainSettings,
    Trial,
    compute_dtype,
    parameter_groups,
    resolve_device,
    schedule_factor,
    train_frozen,
    train_single,
)


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
    trials = [Trial(lr=1e-5 * (1.25**k), epochs=args.epochs, seed=k) for k in range(args.trials)]
    train_frozen(train, val, trials[:2], TrainSettings(**{**vars(settings)}))  # warm-up (allocator, kernels)
    _sync(device)
    started = time.perf_counter()
    train_frozen(train, val, trials, settings)
    _sync(device)
    batched = (time.perf_counter() - started) / len(trials)
    plain_trials = trials[: args.plain_trials]
    train_single(train, val, Trial(lr=1e-5, epochs=1), settings)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for trial in plain_trials:
        train_single(train, val, trial, settings)
    _sync(device)
    standard = (time.perf_counter() - started) / len(plain_trials)

    def load():  # once for all trials, the same way as train_frozen (timed on both sides)
        dtype = compute_dtype(device)
        return (
            to_device_chunked(train.features, device, dtype),
            train.targets.to(device),
            to_device_chunked(val.features, device, dtype),
            val.targets.to(device),
        )

    resident_loop(*load(), Trial(lr=1e-5, epochs=1), settings)  # warm-up
    _sync(device)
    started = time.perf_counter()
    resident_data = load()
    _sync(device)
    loading = time.perf_counter() - started
    for trial in plain_trials:
        resident_loop(*resident_data, trial, settings)
    _sync(device)
    # one load spread over all the trials, as for the batched pass
    resident_seconds = (time.perf_counter() - started - loading) / len(plain_trials) + loading / len(trials)
    print(f"  features onto the device: {loading:.2f} s (in both the batched and the resident times)")
    print(
        f"frozen {args.probe}: {args.examples} x {width} features, batch 128, {args.epochs} epochs, "
        f"K = {len(trials)} (plain ways measured on {len(plain_trials)} trials)"
    )
    for name, seconds in (("batched", batched), ("plain, DataLoader", standard), ("plain, resident", resident_seconds)):
        print(f"  {name:18s} {seconds:8.3f} s per trial ({seconds / args.epochs:.4f} s per trial-epoch)")
    return resident_seconds, batched


def resident_loop(features, targets, val_features, val_targets, trial: Trial, settings: TrainSettings) -> float:
    """One probe, the plain way at its fastest: resident features sliced by index, torch.optim.AdamW, LambdaLR,
    validation each epoch (its metric read on the host, as early stopping needs)."""
    device, dtype = features.device, features.dtype
    head = settings.head
    probe = new_probe(settings.probe, features.shape[1], head.outputs, settings.hidden, trial.seed).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(probe.named_parameters(), settings.weight_decay), lr=trial.lr)
    steps = math.ceil(len(features) / settings.batch_size) * trial.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: schedule_factor(done + 1, steps, settings.warmup_fraction)
    )
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    metric = 0.0
    for _ in range(trial.epochs):
        order = torch.randperm(len(features), device=device)
        for start in range(0, len(features), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            with torch.autocast(**autocast):
                outputs = probe(features.index_select(0, rows))  # the fast gather, as ours
            head.loss(outputs.float(), targets[rows]).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), torch.autocast(**autocast):
            outputs = torch.cat(
                [probe(val_features[s : s + EVAL_CHUNK]).float() for s in range(0, len(val_features), EVAL_CHUNK)]
            )
        metric = float(head.metrics(outputs, val_targets)[head.main_metric])
    return metric


def unfrozen(args, device: torch.device) -> None:
    """Steady-state epoch time: (time of a 4-epoch run - time of a 1-epoch run) / 3 after a warm-up run, so that
    what a run pays once (accelerate's setup, kernel warm-up, the final weights) is left out."""
    from probing.data import DataOptions
    from probing.data.synthetic import demo_data_options, make_demo_data
    from probing.models import load_resampler
    from probing.models.tiny import write_checkpoint
    from probing.probes.train import train_module
    from probing.probes.unfrozen import VisionTable, unfrozen_run
    from probing.store.extract import ExtractionRequest, extract_loaded
    from probing.store.features import FeatureStore
    from probing.tasks import get_task, load_split

    size = "real" if device.type == "cuda" else "tiny"
    init = "random" if size == "real" else "pretrained"
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_demo_data(scratch / "data", refcocog_images=20, vsr_images=args.vsr_images)
        options = DataOptions(task="vsr", **demo_data_options(scratch / "data")["vsr"])
        checkpoint = write_checkpoint(scratch / "model", "blip2", size=size, weights=size == "tiny")
        # One resampler for everything: timing does not care that training changes its weights.
        resampler = load_resampler(
            str(checkpoint),
            init=init,
            device=device,
            vision_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
        for split in ("train", "val", "test"):
            extract_loaded(
                resampler,
                load_split(options, split),
                ExtractionRequest(
                    model=str(checkpoint),
                    data=options,
                    split=split,
                    out=scratch / "f" / split,
                    layers="1",
                    init=init,
                    store_vision=True,
                    progress=False,
                    device=str(device),
                    workers=args.workers,
                ),
            )
        examples = {s: load_split(options, s).examples for s in ("train", "val")}
        targets = {s: get_task("vsr").head.targets(examples[s], s) for s in examples}
        settings = TrainSettings(task="vsr", batch_size=args.unfrozen_batch, device=str(device))
        timings = {}
        for name in ("vision store", "recompute ViT"):
            vision = None
            if name == "vision store":
                vision = {s: VisionTable(FeatureStore(scratch / "f" / s).vision, device) for s in ("train", "val")}
            seconds = {}
            for epochs in (1, 1, 4):  # the first run of a mode only warms up (kernels, allocator, workers)
                trial = Trial(lr=1e-5, epochs=epochs)
                run = unfrozen_run(
                    resampler,
                    resampler.num_layers,
                    (examples["train"], targets["train"]),
                    (examples["val"], targets["val"]),
                    trial,
                    settings,
                    vision,
                    workers=args.workers,
                )
                _sync(device)
                started = time.perf_counter()
                train_module(run, trial, settings)
                _sync(device)
                seconds[epochs] = time.perf_counter() - started
            timings[name] = (seconds[4] - seconds[1]) / 3
            where = ("GPU" if vision["train"].on_gpu else "CPU") if vision else f"{args.workers} decoding workers"
            print(f"  {name:14s} one run of 1 epoch {seconds[1]:.2f} s, of 4 epochs {seconds[4]:.2f} s ({where})")
        print(
            f"unfrozen ({size} BLIP-2, {len(examples['train'])} train + {len(examples['val'])} val examples, "
            f"batch {args.unfrozen_batch}), steady-state epoch (training and validation):"
        )
        for name, seconds in timings.items():
            print(f"  {name:14s} {seconds:8.3f} s per epoch ({len(examples['train']) / seconds:.0f} train examples/s)")
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
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
        f"torch={torch.__version__}",
        flush=True,
    )
    if args.unfrozen:
        unfrozen(args, device)
    plain, batched = frozen(args, device)
    print(f"speedup={plain / batched:.2f}")


if __name__ == "__main__":
    sys.exit(main())
