"""A small study from Python with `probing.api`: does a tiny BLIP-2 keep VSR's spatial relations per layer, and
more than the same model with re-drawn (random) weights?

It runs on a CPU in about a minute, with no network: synthetic images in the real VSR format
(`probing.data.synthetic`) and tiny random checkpoints of the real transformers classes (`probing.models.tiny`).
Its numbers check the machinery; they are not the paper's.

    python examples/small_study.py --out reports/small-study

Steps: a config given as a dict (what a YAML config holds) run end to end (data, checkpoints, features, one
Optuna search per model and layer, the report); then the outputs read back with the API: a feature store, each
search's best run, a paired comparison of the two models, and the report's results.csv in its documented types.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from probing import api

TRAINED, RANDOM = "BLIP-2 (tiny)", "BLIP-2 (random weights)"


def study_config(workspace: Path) -> api.Config:
    """The study: VSR, frozen linear probes on every layer of both models, a 3-trial search each."""
    return api.config_from_dict(
        {
            "name": "small-study",
            "workspace": str(workspace),
            "models": {TRAINED: {"tiny": "blip2"}, RANDOM: {"tiny": "blip2", "init": "random"}},
            "data": {"demo": {"refcocog_images": 20, "vsr_images": 60}},
            "extract": {"batch_size": 32, "workers": 0},
            "experiments": [
                {
                    "name": "layers",
                    "tasks": ["vsr"],
                    "models": [TRAINED, RANDOM],
                    "modes": ["frozen"],
                    "layers": "all",
                    "probes": ["linear"],
                    "search": {
                        "trials": 3,
                        "batch": 3,
                        "final_seeds": [0, 1],
                        "space": {"vsr": {"lr": [0.001, 0.03], "epochs": [10, 20]}},
                    },
                }
            ],
            "device": "cpu",
        }
    )


def main(argv: list[str] | None = None) -> api.RunSummary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/small-study"), help="the study's workspace")
    args = parser.parse_args(argv)
    config = study_config(args.out)
    summary = api.run_config(config, say=lambda line: print(line, flush=True), progress=False)

    # a feature store: per-layer query outputs [examples, queries, width], in store order
    store_folder = next(path.parent for path in sorted((args.out / "features").rglob("manifest.json")))
    store = api.FeatureStore(store_folder)
    print(f"store {store_folder}: layers {store.layers}, layer 1 {tuple(store.load(1).shape)}")

    # each search's best run: test accuracy with its 95 % bootstrap interval, per model and layer
    runs = [api.load_run(folder) for folder in summary.searches]
    for run in sorted(runs, key=lambda r: (r.label, r.layer)):
        estimate = api.overall(run)
        print(
            f"{run.label} layer {run.layer}: {100 * estimate.mean:.1f} [{100 * estimate.low:.1f}, "
            f"{100 * estimate.high:.1f}] % (chance {100 * api.chance_level(run):.1f})"
            + (", answers one class" if api.single_class(run) else "")  # the tables mark it ‡
        )

    # the two models on the same test examples at the last layer: paired bootstrap and McNemar's exact test
    last = max(run.layer for run in runs)
    trained, random = (next(r for r in runs if r.label == label and r.layer == last) for label in (TRAINED, RANDOM))
    compared = api.paired_comparison(trained, random)
    print(
        f"layer {last}, {TRAINED} - {RANDOM}: {100 * compared.difference.mean:+.1f} points, "
        f"McNemar p = {compared.p_value:.3g}"
    )

    # the report's numbers, in the column types docs/results-csv.md documents
    import pandas as pd

    results = pd.read_csv(summary.report / "results.csv", dtype=api.RESULT_DTYPES)
    accuracies = results[(results["metric"] == "accuracy") & results["category"].isna() & results["run"].notna()]
    print(f"report {summary.report}: {len(results)} numbers, {len(accuracies)} run accuracies; LaTeX in tables/")
    return summary


if __name__ == "__main__":
    main()
