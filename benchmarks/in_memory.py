"""Benchmark: a frozen search whose features never touch disk, against extracting a store and searching on it,
same run.

The plain way is what a study did before `--in-memory`: `probing extract` writes each split's feature store
(sharded safetensors, checksums, fsync), then `probing search --features` reads them back. Ours is
`probing search --in-memory`: the searched layer is extracted straight into the training device's memory and
the batched probes train there. Both run the same search (VSR, one layer, the same trials and seeds) on the same
demo data and checkpoint, and must find the same best trial with the same val and test numbers (the script stops
with exit 1 if not). Printed: seconds of each way, their parts, and `speedup=<plain seconds / in-memory seconds>`.

    python benchmarks/in_memory.py                                  # tiny BLIP-2 on the CPU
    python benchmarks/in_memory.py --device cuda --size real        # real-size ViT-g + Q-Former, random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from probing.data import DataOptions
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.models import load_resampler
from probing.models.tiny import write_checkpoint
from probing.probes.settings import TrainSettings
from probing.store.extract import ExtractionRequest, extract
from probing.studies.search import SearchRequest, run_search
from probing.tasks import get_task
from probing.tasks.search_space import SearchSpace


def search(out: Path, args, options: DataOptions, checkpoint: Path, features: Path | None) -> dict:
    request = SearchRequest(
        task="vsr",
        layer=args.layer,
        out=out,
        model=str(checkpoint),
        init="pretrained" if args.size == "tiny" else "random",
        settings=TrainSettings(task="vsr", batch_size=64, device=args.device),
        space=SearchSpace(lr=(1e-3, 3e-2), epochs=(args.epochs,)),
        trials=args.trials,
        batch=args.trials,
        seed=0,
        features=features,
        in_memory=features is None,
        data=options,
    )
    run_search(request)
    return json.loads((out / "summary.json").read_text())["best"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--vsr-images", type=int, default=400, help="demo VSR images")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    args.layer = 4 if args.size == "tiny" else 12  # the last layer of the tiny and of the real Q-Former
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_demo_data(scratch / "data", refcocog_images=20, vsr_images=args.vsr_images)
        options = DataOptions(task="vsr", **demo_data_options(scratch / "data")["vsr"])
        checkpoint = write_checkpoint(scratch / "model", "blip2", size=args.size, weights=args.size == "tiny", seed=7)

        # loaded once untimed: the first load imports transformers' modules, which neither way should pay
        load_resampler(str(checkpoint), init="pretrained" if args.size == "tiny" else "random", device=args.device)
        started = time.perf_counter()
        for split in get_task("vsr").splits:
            extract(
                ExtractionRequest(
                    model=str(checkpoint),
                    init="pretrained" if args.size == "tiny" else "random",
                    data=options,
                    split=split,
                    layers=str(args.layer),
                    device=args.device,
                    workers=0,
                    progress=False,
                    out=scratch / "features" / split,
                )
            )
        extracted = time.perf_counter() - started
        plain = search(scratch / "plain", args, options, checkpoint, scratch / "features")
        plain_seconds = time.perf_counter() - started

        started = time.perf_counter()
        ours = search(scratch / "ours", args, options, checkpoint, None)
        ours_seconds = time.perf_counter() - started

        trials = f"{args.trials} trials of {args.epochs} epochs"
        print(f"frozen VSR search, {args.size} BLIP-2 layer {args.layer}, {trials}:")
        searched = plain_seconds - extracted
        print(f"  store: extract {extracted:6.1f} s + search {searched:6.1f} s = {plain_seconds:6.1f} s")
        print(f"  in memory:                                 {ours_seconds:6.1f} s")
        same = plain == ours
        print(f"  same best trial, val and test numbers: {same}")
        if not same:
            print(f"  store: {plain}\n  in memory: {ours}")
            sys.exit(1)
        print(f"ours: {ours_seconds:.1f} s in memory")
        print(f"speedup={plain_seconds / ours_seconds:.2f}")


if __name__ == "__main__":
    main()
