"""Benchmark: `probing zeroshot`'s batched scoring against the model's own `generate` once per example, in the
same run, and its memory as the split grows.

The plain way is what the transformers documentation shows for InstructBLIP: for each example, decode its image,
build the input with `InstructBlipProcessor`, call `generate` (greedy, one new token, restricted to the two
answers with `prefix_allowed_tokens_fn`, their logits returned) and read the answer. Our way is `score_split`:
images decoded in DataLoader workers, each batch's distinct images through the ViT once, the batch's
instructions through the Q-Former and the language model in one forward pass (left padded, `generate`'s
position ids), only the next-token log-probabilities kept. Both use the same loaded weights (fp32 here) and
the same examples; the answers agree (checked and printed).

Memory: our way keeps one float and a small dict per example, so its peak should not grow with the split.
Python allocations are traced (tracemalloc) while a quarter of the split and then the whole split are scored,
and the process's peak resident memory is read after each.

    python benchmarks/zeroshot.py                      # CPU, tiny random InstructBLIP on the demo's VSR
    python benchmarks/zeroshot.py --vsr-images 600     # a larger split

The last line printed is `speedup=<ours / plain>` (examples per second).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from probing.baselines.zeroshot import ZeroShotRequest, score_split
from probing.data import DataOptions
from probing.data.images import load_rgb_image
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.models import ModelSource, family_named
from probing.models.answering import PromptScorer
from probing.models.checkpoint import CheckpointSource
from probing.models.loading import load_config
from probing.models.tiny import write_checkpoint
from probing.store.extract import default_workers
from probing.tasks import load_split


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_way(scorer: PromptScorer, checkpoint: Path, examples, device: torch.device) -> tuple[float, list[int]]:
    """Seconds for `generate` once per example, and the answers (0 = positive) it picks."""
    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration, InstructBlipProcessor

    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint).to(device).eval()
    processor = InstructBlipProcessor(
        image_processor=scorer.image_processor,
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        qformer_tokenizer=AutoTokenizer.from_pretrained(checkpoint / "qformer_tokenizer"),
        num_query_tokens=model.config.num_query_tokens,
    )
    allowed = [tokens[0] for tokens in scorer.answer_tokens]
    picks = []
    started = time.perf_counter()
    with torch.inference_mode():
        for example in examples:
            image = load_rgb_image(example.image_path)
            inputs = processor(images=image, text=scorer.prompts([example.text])[0], return_tensors="pt").to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=1,
                do_sample=False,
                prefix_allowed_tokens_fn=lambda row, ids: allowed,
                output_logits=True,
                return_dict_in_generate=True,
            )
            picks.append(allowed.index(int(output.sequences[0, -1])))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, picks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vsr-images", type=int, default=240, help="demo VSR images (about 2.3 captions each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="image decoding processes (ours)")
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = args.workers if args.workers is not None else default_workers()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_demo_data(scratch / "data", seed=0, refcocog_images=20, vsr_images=args.vsr_images)
        data = DataOptions(task="vsr", **demo_data_options(scratch / "data")["vsr"])
        checkpoint = write_checkpoint(scratch / "model", "instructblip", seed=0)
        examples = load_split(data, "train").examples
        source = CheckpointSource(str(checkpoint))
        settings = PromptScorer.resolved({"llm_dtype": "float32"}, device)
        scorer = PromptScorer(
            source,
            load_config(source),
            family_named("instructblip"),
            settings,
            ModelSource(model=str(checkpoint)),
            device,
        )
        scorer.load()
        request = ZeroShotRequest(
            model=str(checkpoint), data=data, out=scratch / "unused", batch_size=args.batch_size, workers=workers,
            device=str(device), progress=False,
        )  # fmt: skip
        images = len({e.image_path for e in examples})
        print(
            f"device={device} examples={len(examples)} images={images} batch={args.batch_size} workers={workers} "
            f"torch={torch.__version__} (tiny random InstructBLIP: ViT, Q-Former and a 4-layer Llama, fp32)",
            flush=True,
        )
        score_split(scorer, examples[: args.batch_size], request)  # warm-up
        ours = score_split(scorer, examples, request)
        ours_rate = len(examples) / ours.seconds
        print(f"ours:  {ours_rate:8.1f} examples/s ({ours.seconds:.2f} s; batched, ViT once per image per batch)")
        plain_seconds, picks = plain_way(scorer, checkpoint, examples, device)
        plain_rate = len(examples) / plain_seconds
        print(f"plain: {plain_rate:8.1f} examples/s ({plain_seconds:.2f} s; generate once per example)")
        agree = sum(int(pick == int(logit <= 0)) for pick, logit in zip(picks, ours.logits.tolist(), strict=True))
        print(f"same answers: {agree} of {len(examples)}")
        # Memory as the split grows: a quarter of it, then all of it.
        gc.collect()
        for share, part in (("1/4", examples[: len(examples) // 4]), ("all", examples)):
            tracemalloc.start()
            score_split(scorer, part, request)
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(
                f"memory ({share} of the split, {len(part)} examples): traced Python peak "
                f"{traced_peak / 2**20:.2f} MiB, process peak RSS {peak_rss_mb():.0f} MiB",
                flush=True,
            )
    print(f"speedup={ours_rate / plain_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
