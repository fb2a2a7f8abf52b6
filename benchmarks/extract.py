"""Benchmark: `probing extract` against the plain way, measured in the same run.

The plain way is the model's own forward once per example: `Blip2ForImageTextRetrieval` in fp32, every
example with its own image through the ViT (no deduplication), images decoded in the loop, Q-Former hidden
states taken from the forward (`qformer.config.output_hidden_states`) and moved to the CPU. Our way is
`extract_loaded` (ViT once per unique image, images decoded in DataLoader workers, ViT in bf16 on GPU,
shards written to disk by a background thread). Both use the same batch size, the same examples and an
already-loaded model, so the figures are throughput of the work itself.

Data: the demo's synthetic RefCOCOg with sentences dropped until there are about 3.7 per image, the ratio
of RefCOCOg umd train (80,512 sentences / 21,899 images). At `--size real` its images are re-encoded at
COCO's usual 640 x 480 (`--image-size`): decoding a JPEG costs in proportion to its pixels, and the demo's
~250 px images would hide the host's share of the work.

    python benchmarks/extract.py                       # CPU, tiny model
    python benchmarks/extract.py --device cuda --size real --images 1500   # GPU, real-size ViT-g + Q-Former

`--size real` needs no download: the real architecture with random weights (`--init random`). `--layers` picks the
layers both ways keep (`benchmarks/gpu.sh` runs 1, 3 and 13). The last line printed is `speedup=<ours / plain>`.
"""

from __future__ import annotations

import argparse
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from probing.data import DataOptions
from probing.data.images import load_rgb_image
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.models import load_resampler
from probing.models.tiny import build_config, write_checkpoint
from probing.store.extract import ExtractionRequest, default_workers, extract_loaded, parse_layers
from probing.tasks import load_split

REFCOCOG_SENTENCES_PER_IMAGE = 80512 / 21899


def refcocog_like(root: Path, images: int, seed: int = 0) -> DataOptions:
    """Demo RefCOCOg data thinned to RefCOCOg's sentences-per-image ratio, every split in train."""
    make_demo_data(root, seed=seed, refcocog_images=images, vsr_images=10)
    options = demo_data_options(root)["refcocog"]
    refs = pickle.loads(options["refs"].read_bytes())
    rng = np.random.default_rng(seed)
    target = round(REFCOCOG_SENTENCES_PER_IMAGE * images)
    keep = {(i, 0) for i in range(len(refs))}  # every ref keeps one sentence, extra ones fill up to the target
    extra = [(i, j) for i, ref in enumerate(refs) for j in range(1, len(ref["sentences"]))]
    chosen = rng.choice(len(extra), size=min(max(target - len(keep), 0), len(extra)), replace=False)
    keep |= {extra[k] for k in chosen}
    for i, ref in enumerate(refs):
        ref["split"] = "train"
        ref["sentences"] = [s for j, s in enumerate(ref["sentences"]) if (i, j) in keep]
        ref["sent_ids"] = [s["sent_id"] for s in ref["sentences"]]
    options["refs"].write_bytes(pickle.dumps(refs, protocol=2))
    return DataOptions(task="refcocog", **options)


def resize_jpegs(images_dir: Path, size: tuple[int, int]) -> None:
    """Re-encode every JPEG under `images_dir` at `size` (width, height), quality 90 like COCO's files."""
    from PIL import Image

    for path in sorted(images_dir.rglob("*.jpg")):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize(size, Image.BICUBIC)
        resized.save(path, quality=90)


def plain_way(
    checkpoint: Path, size: str, examples, batch_size: int, device: torch.device, layers: str = "all"
) -> float:
    """Seconds for the model's own fp32 forward, one ViT pass per example, keeping the same layers as ours (the
    forward's cost does not depend on them; the copy to the host does)."""
    from transformers import Blip2ForImageTextRetrieval

    reference = load_resampler(str(checkpoint), init="pretrained" if size == "tiny" else "random", device="cpu")
    if size == "tiny":
        model = Blip2ForImageTextRetrieval.from_pretrained(checkpoint)
    else:
        config = build_config("blip2", "real", vocab_size=reference.config.qformer_config.vocab_size)
        with torch.device(device):
            model = Blip2ForImageTextRetrieval(config)
    model = model.to(device=device, dtype=torch.float32).eval()
    model.qformer.config.output_hidden_states = True
    kept = parse_layers(layers, model.config.qformer_config.num_hidden_layers)
    queries = model.config.num_query_tokens

    def run(batch):
        pixels = reference.preprocess([load_rgb_image(e.image_path) for e in batch]).to(device)
        tokens = reference.tokenize([e.text for e in batch])
        output = model(
            pixel_values=pixels,
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            use_image_text_matching_head=True,
        )
        states = torch.stack([output.text_model_output.hidden_states[k][:, :queries] for k in kept], 1)
        return states.to(torch.float16).cpu()

    with torch.inference_mode():
        for start in range(0, min(4 * batch_size, len(examples)), batch_size):  # warm-up (kernels, allocator)
            run(examples[start : start + batch_size])
        _sync(device)
        started = time.perf_counter()
        for start in range(0, len(examples), batch_size):
            run(examples[start : start + batch_size])
        _sync(device)
        return time.perf_counter() - started


def our_way(
    checkpoint: Path,
    size: str,
    data,
    batch_size: int,
    workers: int,
    device: torch.device,
    scratch: Path,
    qformer_dtype: str,
    compile_vision: bool,
    layers: str = "all",
) -> float:
    init = "pretrained" if size == "tiny" else "random"
    vision_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    resampler = load_resampler(
        str(checkpoint),
        init=init,
        device=device,
        vision_dtype=vision_dtype,
        qformer_dtype=getattr(torch, qformer_dtype),
    )
    request = dict(
        model=str(checkpoint),
        data=data,
        split="train",
        layers=layers,
        batch_size=batch_size,
        workers=workers,
        init=init,
        progress=False,
        shard_size=1024,
        device=str(device),
        qformer_dtype=qformer_dtype,
        compile_vision=compile_vision,
    )
    # Warm-up on one shard: texts of every length meet their kernels once (each padded length is a new shape
    # for the Q-Former), the allocators and the page-locked cache fill, a compiled ViT is compiled (for the full
    # batch and the shard's last). A real extraction runs for minutes.
    warm = load_split(data, "train")
    warm = type(warm)(warm.task, warm.split, warm.examples[:1024], warm.fingerprint + "-warm", warm.sources)
    extract_loaded(resampler, warm, ExtractionRequest(out=scratch / "warm", **request))
    split = load_split(data, "train")
    _sync(device)
    started = time.perf_counter()
    extract_loaded(resampler, split, ExtractionRequest(out=scratch / "store", **request))
    _sync(device)
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "real"), default=None, help="default: real on GPU, tiny on CPU")
    parser.add_argument("--images", type=int, default=None, help="unique images (default 300 tiny, 1500 real)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="image decoding processes (default: extract's)")
    parser.add_argument(
        "--image-size",
        default=None,
        help="re-encode the images at WIDTHxHEIGHT (default: 640x480 real, the demo's sizes tiny)",
    )
    parser.add_argument("--qformer-dtype", default="float32", help="ours only (the plain way is the fp32 forward)")
    parser.add_argument("--compile-vision", action="store_true", help="ours only: torch.compile the ViT")
    parser.add_argument(
        "--layers",
        default="all",
        help="the layers both ways keep, as `probing extract --layers` (e.g. 12, 4,8,12, or 0,1,...,12 for all 13 "
        "outputs with the embedding output)",
    )
    parser.add_argument(
        "--plain-examples",
        type=int,
        default=None,
        help="time the plain way on the first N examples only (its cost is per example)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "tiny")
    images = args.images or (300 if size == "tiny" else 1500)
    workers = args.workers if args.workers is not None else default_workers()
    image_size = args.image_size or ("640x480" if size == "real" else None)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data = refcocog_like(scratch / "data", images)
        if image_size:
            width, height = (int(part) for part in image_size.lower().split("x"))
            resize_jpegs(data.images, (width, height))
        checkpoint = write_checkpoint(scratch / "model", "blip2", size=size, weights=size == "tiny")
        examples = load_split(data, "train").examples
        unique = len({e.image_path for e in examples})
        print(
            f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
            f"size={size} examples={len(examples)} images={unique} ratio={len(examples) / unique:.2f} "
            f"image_size={image_size or 'demo'} batch={args.batch_size} workers={workers} torch={torch.__version__}",
            flush=True,
        )
        ours = our_way(
            checkpoint,
            size,
            data,
            args.batch_size,
            workers,
            device,
            scratch,
            args.qformer_dtype,
            args.compile_vision,
            args.layers,
        )
        ours_rate = len(examples) / ours
        print(
            f"ours:  {ours_rate:9.1f} examples/s ({ours:.2f} s; ViT {'bf16' if device.type == 'cuda' else 'fp32'} "
            f"once per image{', compiled' if args.compile_vision else ''}, Q-Former {args.qformer_dtype}, layers "
            f"{args.layers} stored fp16)",
            flush=True,
        )
        timed = examples[: args.plain_examples] if args.plain_examples else examples
        plain = plain_way(checkpoint, size, timed, args.batch_size, device, args.layers)
        plain_rate = len(timed) / plain
        print(
            f"plain: {plain_rate:9.1f} examples/s ({plain:.2f} s for {len(timed)} examples; fp32 forward once per "
            "example)"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(f"peak_rss_mb={peak:.0f} peak_gpu_gib={gpu_peak:.1f}")
    print(f"speedup={ours_rate / plain_rate:.2f}")


if __name__ == "__main__":
    sys.exit(main())
