"""Pruning: the same 10-trial unfrozen search with and without Optuna's pruner (the default of unfrozen searches,
successive halving), same seed.

The plain way trains every trial to its last epoch; the pruned way stops trials whose per-epoch val metric falls
behind the other trials' at the same epoch (successive halving's rungs: epochs 1 and 4). Printed: epochs trained
and the best val metric both ways, the unpruned best's 95 % bootstrap interval (over val examples), and
`speedup=<epochs without / epochs with>`.
Target: at least 2x fewer epochs, the pruned best inside the unpruned best's interval.

    python benchmarks/search.py [--trials 10] [--epochs 9] [--task refcocog]
        [--pruner successive-halving|hyperband|median]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from probing.data import DataOptions
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.models.tiny import write_checkpoint
from probing.probes.train import TrainSettings
from probing.report.analysis import estimate
from probing.store.extract import ExtractionRequest, extract
from probing.studies.search import SearchRequest, run_search
from probing.tasks import get_task
from probing.tasks.search_space import SearchSpace


def search(out: Path, pruner: str, args, options, features, checkpoint) -> tuple[int, float, float, Path]:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    request = SearchRequest(
        task=args.task,
        mode="unfrozen",
        layer=4,
        out=out,
        model=str(checkpoint),
        settings=TrainSettings(task=args.task, batch_size=32, device="cpu"),
        space=SearchSpace(lr=(1e-4, 3e-2), epochs=(args.epochs,)),
        trials=args.trials,
        seed=0,
        pruner=pruner,
        features=features,
        data=options,
    )
    started = time.perf_counter()
    run_search(request)
    seconds = time.perf_counter() - started
    # the journal holds the search's one study (named after what it searches): no name needed to load it
    study = optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(out / "study.log"))))
    epochs = sum(len(trial.intermediate_values) for trial in study.trials)
    return epochs, study.best_value, seconds, out / "best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--task", default="refcocog")
    parser.add_argument("--images", type=int, default=160, help="demo RefCOCOg images")
    parser.add_argument(
        "--pruner",
        choices=("successive-halving", "hyperband", "median"),
        default="successive-halving",  # what `--pruner auto` gives an unfrozen search
        help="the pruned way's",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_demo_data(scratch / "data", refcocog_images=args.images, vsr_images=60)
        demo = demo_data_options(scratch / "data")
        options = DataOptions(task=args.task, **(demo["vsr"] if args.task == "vsr" else demo["refcocog"]))
        checkpoint = write_checkpoint(scratch / "model", "blip2", seed=7)
        for split in get_task(args.task).splits:  # the ViT once per image: trials read its outputs
            extract(
                ExtractionRequest(
                    model=str(checkpoint),
                    data=options,
                    split=split,
                    layers="4",
                    workers=0,
                    store_vision=True,
                    progress=False,
                    out=scratch / "features" / split,
                )
            )
        plain = search(scratch / "plain", "none", args, options, scratch / "features", checkpoint)
        pruned = search(scratch / "pruned", args.pruner, args, options, scratch / "features", checkpoint)
        records = [json.loads(line) for line in (plain[3] / "predictions" / "val.jsonl").read_text().splitlines()]
        interval = estimate([[float(r["correct"]) for r in records]])
        metric = get_task(args.task).metric
        print(f"unfrozen {args.task} search, tiny BLIP-2, {args.trials} trials of {args.epochs} epochs, seed 0:")
        for name, (epochs, best, seconds, _) in (("no pruning", plain), (args.pruner, pruned)):
            print(f"  {name:18s} {epochs:4d} epochs trained in {seconds:6.1f} s; best val {metric} {best:.4f}")
        inside = interval.low <= pruned[1] <= interval.high
        print(f"  unpruned best's 95% interval [{interval.low:.4f}, {interval.high:.4f}]; pruned best inside: {inside}")
        print(f"speedup={plain[0] / pruned[0]:.2f}")


if __name__ == "__main__":
    main()
