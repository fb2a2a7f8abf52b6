"""Benchmark: the Q-Former with cross-attention keys and values once per image, against once per text.

Extraction hands the Q-Former a batch of texts and the table of their images (`query_states(...,
image_slots=...)`): each cross-attention layer projects every distinct image once. The plain way gives every
text its own copy of its image's ViT output, so the projections run once per text, as the model's forward
does. Both go through the same module with the same inputs; only the Q-Former is timed (no ViT, no data
loading). Texts per image follow RefCOCOg's ratio (3.68) in a batch grouped by image, as extraction makes.

    python benchmarks/qformer.py                          # 2 CPU cores: real size, a few batches
    python benchmarks/qformer.py --device cuda --repeats 50 [--dtype bfloat16]

The last line printed is `speedup=<plain seconds / ours>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from probing.models import load_resampler
from probing.models.tiny import write_checkpoint

TEXTS_PER_IMAGE = 80512 / 21899  # RefCOCOg umd train
SENTENCES = [
    "the man in the red shirt on the left",
    "a brown dog lying next to the white couch",
    "second chair from the right",
    "woman holding an umbrella near the bus stop sign",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "real"), default="real")
    parser.add_argument("--dtype", default="float32", help="Q-Former compute dtype")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per way (default 3 CPU, 30 GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (30 if device.type == "cuda" else 3)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = write_checkpoint(Path(scratch) / "model", "blip2", size=args.size, weights=False)
        resampler = load_resampler(
            str(checkpoint), init="random", device=device, qformer_dtype=getattr(torch, args.dtype)
        )
    resampler.eval()
    images = max(1, round(args.batch_size / TEXTS_PER_IMAGE))
    generator = torch.Generator().manual_seed(0)
    slots = torch.sort(torch.randint(0, images, (args.batch_size,), generator=generator)).values
    patches_per_side = resampler.config.vision_config.image_size // resampler.config.vision_config.patch_size
    table = torch.randn(
        images, patches_per_side**2 + 1, resampler.config.vision_config.hidden_size, generator=generator
    ).to(device)
    tokens = resampler.tokenize([SENTENCES[i % len(SENTENCES)] for i in range(args.batch_size)])
    layers = list(range(1, resampler.num_layers + 1))
    per_text = table[slots.to(device)]

    def ours():
        return resampler.query_states(table, tokens, layers, image_slots=slots)

    def plain():
        return resampler.query_states(per_text, tokens, layers)

    def seconds(way) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        way()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
        f"size={args.size} dtype={args.dtype} batch={args.batch_size} images={images} "
        f"texts/image={args.batch_size / images:.2f} torch={torch.__version__}",
        flush=True,
    )
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    with torch.inference_mode():
        for way in (ours, plain):  # warm-up: kernels, allocator
            way()
        for _ in range(repeats):  # interleaved, so drifts in clock speed hit both ways alike
            times["ours"].append(seconds(ours))
            times["plain"].append(seconds(plain))
    ours_s, plain_s = statistics.median(times["ours"]), statistics.median(times["plain"])
    print(
        f"ours:  {args.batch_size / ours_s:9.1f} texts/s (median {ours_s * 1e3:.1f} ms per batch; keys and "
        "values once per image)"
    )
    print(f"plain: {args.batch_size / plain_s:9.1f} texts/s (median {plain_s * 1e3:.1f} ms per batch; once per text)")
    print(f"speedup={plain_s / ours_s:.2f}")


if __name__ == "__main__":
    sys.exit(main())
