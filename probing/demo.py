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
from probing.models.tiny import FAMILIES, ensure_checkpoint

TASKS = ("refcocog", "vsr", "rcm")


@dataclass
class DemoResult:
    data: Path
    rcm: Path
    checkpoints: dict[str, Path]
    stats: dict[str, dict[str, Any]]
    features: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (family, task, split) -> store


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
    say(f"[1/4] demo dataset -> {data_dir}")
    make_demo_data(data_dir, refcocog_images=refcocog_images, vsr_images=vsr_images)
    refcocog = demo_data_options(data_dir)["refcocog"]
    say(f"[2/4] Region Cell Matching -> {rcm_dir}")
    build_rcm(refcocog["refs"], refcocog["instances"], rcm_dir)
    options = task_options(data_dir, rcm_dir)
    stats = {task: data_stats(options[task]) for task in TASKS}
    say(f"[3/4] tiny random checkpoints -> {out / 'models'}")
    checkpoints = {family: ensure_checkpoint(out / "models" / family, family) for family in FAMILIES}
    result = DemoResult(data=data_dir, rcm=rcm_dir, checkpoints=checkpoints, stats=stats)
    say(f"[4/4] per-layer query features -> {out / 'features'}")
    for family, checkpoint in checkpoints.items():
        for task in TASKS:
            for split in SPLITS:
                store_dir = out / "features" / family / task / split
                extract(ExtractionRequest(model=str(checkpoint), data=options[task], split=split, out=store_dir,
                                          batch_size=64, shard_size=512, progress=progress, device="cpu"))
                result.features[(family, task, split)] = store_dir
    return result
