"""`probing demo`: the embedded default run, end to end on synthetic data with tiny random models.

It is honest about what it is: random-weight models of the real architectures on synthetic shapes, a check
of the machinery (and later of the frozen-vs-unfrozen contrast), not the paper's numbers. Every stage goes
through the same functions, loaders and on-disk formats as a real run, and reuses what a previous demo run
already wrote (each output's manifest says whether it matches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probing.data import SPLITS, DataOptions
from probing.data.rcm import build_rcm
from probing.data.stats import data_stats
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.extract import ExtractionRequest, extract
from probing.features import FeatureStore
from probing.models.tiny import FAMILIES, ensure_checkpoint
from probing.runs import TrainRequest, run_training
from probing.train import TrainSettings, Trial, default_patience

TASKS = ("refcocog", "vsr", "rcm")


# Demo training settings: tiny random models need larger learning rates than the paper's search space.
FROZEN_EPOCHS = {"refcocog": 20, "vsr": 10, "rcm": 20}
UNFROZEN_EPOCHS = 4
DEMO_LR = {"frozen": 3e-3, "unfrozen": 1e-3}
DEMO_SEEDS = (0, 1, 2)


@dataclass
class DemoResult:
    data: Path
    rcm: Path
    checkpoints: dict[str, Path]
    stats: dict[str, dict[str, Any]]
    features: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (family, task, split) -> store
    runs: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (family, task, mode) -> metrics


def task_options(data_dir: Path, rcm_dir: Path) -> dict[str, DataOptions]:
    options = demo_data_options(data_dir)
    return {
        "refcocog": DataOptions(task="refcocog", **options["refcocog"]),
        "vsr": DataOptions(task="vsr", **options["vsr"]),
        "rcm": DataOptions(task="rcm", rcm=rcm_dir, images=options["refcocog"]["images"]),
    }


def run_demo(out: Path, say: Callable[[str], None] = print, refcocog_images: int = 300, vsr_images: int = 240,
             progress: bool = True) -> DemoResult:
    """Run every stage that exists on the demo data under `out`."""
    out = Path(out)
    data_dir, rcm_dir = out / "data", out / "rcm"
    say(f"[1/5] demo dataset -> {data_dir}")
    make_demo_data(data_dir, refcocog_images=refcocog_images, vsr_images=vsr_images)
    refcocog = demo_data_options(data_dir)["refcocog"]
    say(f"[2/5] Region Cell Matching -> {rcm_dir}")
    build_rcm(refcocog["refs"], refcocog["instances"], rcm_dir)
    options = task_options(data_dir, rcm_dir)
    stats = {task: data_stats(options[task]) for task in TASKS}
    say(f"[3/5] tiny random checkpoints -> {out / 'models'}")
    checkpoints = {family: ensure_checkpoint(out / "models" / family, family) for family in FAMILIES}
    result = DemoResult(data=data_dir, rcm=rcm_dir, checkpoints=checkpoints, stats=stats)
    say(f"[4/5] per-layer query features -> {out / 'features'}")
    for family, checkpoint in checkpoints.items():
        for task in TASKS:
            for split in SPLITS:
                store_dir = out / "features" / family / task / split
                extract(ExtractionRequest(model=str(checkpoint), data=options[task], split=split, out=store_dir,
                                          batch_size=64, shard_size=512, progress=progress, device="cpu",
                                          store_vision=True))
                result.features[(family, task, split)] = store_dir
    say(f"[5/5] linear probes on the last layer, frozen ({len(DEMO_SEEDS)} seeds) and unfrozen -> {out / 'runs'}")
    for family, checkpoint in checkpoints.items():
        last_layer = FeatureStore(result.features[(family, "vsr", "train")]).layers[-1]
        for task in TASKS:
            for mode in ("frozen", "unfrozen"):
                seeds = DEMO_SEEDS if mode == "frozen" else DEMO_SEEDS[:1]
                epochs = FROZEN_EPOCHS[task] if mode == "frozen" else UNFROZEN_EPOCHS
                trials = tuple(Trial(lr=DEMO_LR[mode], epochs=epochs, seed=seed, giou_scale=2.0, l1_scale=5.0)
                               for seed in seeds)
                settings = TrainSettings(task=task, batch_size=32 if mode == "unfrozen" else 128, device="cpu",
                                         patience=default_patience(task))
                result.runs[(family, task, mode)] = run_training(TrainRequest(
                    task=task, mode=mode, layer=last_layer, out=out / "runs" / family / task / mode, trials=trials,
                    settings=settings, features=out / "features" / family / task, data=options[task],
                    model=str(checkpoint)))
    return result


def results_table(result: DemoResult) -> list[str]:
    """The paper's Table 1 shape: test metric per model, task and mode (mean +- std over seeds)."""
    lines = [f"{'model':14s} {'task':9s} {'metric':9s} {'frozen':>17s} {'unfrozen':>10s}"]
    for family in result.checkpoints:
        for task in TASKS:
            cells = []
            for mode in ("frozen", "unfrozen"):
                metrics = result.runs[(family, task, mode)]
                value = metrics["summary"]["test"][metrics["metric"]]
                spread = f" +- {100 * value['std']:4.1f}" if value["std"] is not None else ""
                cells.append(f"{100 * value['mean']:5.1f}{spread}")
            lines.append(f"{family:14s} {task:9s} {metrics['metric']:9s} {cells[0]:>17s} {cells[1]:>10s}")
    return lines
