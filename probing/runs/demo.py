"""`probing demo`: the embedded default run, on synthetic data with tiny random models, CPU, no network.

It runs the packaged config `probing/demo.yaml` (also at `experiments/demo.yaml`) through `probing run`'s
pipeline: demo dataset, RCM, tiny BLIP-2 and InstructBLIP checkpoints, features of every layer, frozen
searches on every layer and unfrozen searches on the last, then the report in `reports/demo/report-demo/`.
It is honest about what it is: random-weight models on synthetic shapes, a check of the machinery and of
the frozen-vs-unfrozen contrast, not the paper's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path

from probing.runs.config import Config, DemoData, check, from_dict
from probing.runs.pipeline import RunSummary, run_config


def demo_config(
    workspace: Path | None = None, refcocog_images: int | None = None, vsr_images: int | None = None
) -> Config:
    """The packaged demo config, with the workspace and dataset size optionally changed (quick checks)."""
    from probing.core.yaml_files import parse_yaml

    text = resources.files("probing.runs").joinpath("demo.yaml").read_text("utf-8")
    config = from_dict(Config, parse_yaml(text, "probing/demo.yaml")[0])
    demo = config.data.demo or DemoData()
    demo = replace(
        demo, refcocog_images=refcocog_images or demo.refcocog_images, vsr_images=vsr_images or demo.vsr_images
    )
    config = replace(config, workspace=workspace or config.workspace, data=replace(config.data, demo=demo))
    return check(config)


def run_demo(
    out: Path | None = None,
    say: Callable[[str], None] = print,
    refcocog_images: int | None = None,
    vsr_images: int | None = None,
    progress: bool = True,
) -> tuple[Config, RunSummary]:
    config = demo_config(out, refcocog_images, vsr_images)
    return config, run_config(config, say, progress=progress)


def test_accuracy_lines(report: Path) -> list[str]:
    """Table 1's test accuracies as a narrow text table (a row per model and mode, a column per task, `mean
    [95% CI]` in percent): what the demo prints. The whole table, with val and the std over seeds, is in the
    report (Markdown, CSV, LaTeX)."""
    import pandas as pd

    table = pd.read_csv(Path(report) / "tables" / "table1.csv")
    test = table[table["split"] == "test"]

    def cell(row) -> str:
        interval = "" if pd.isna(row["ci_low"]) else f" [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
        return f"{100 * row['mean']:.1f}{interval}"

    cells = test.assign(cell=test.apply(cell, axis=1))
    # rows in the table's order (models, then chance), columns in its task order
    shown = cells.pivot_table(index=["model", "mode"], columns="task", values="cell", aggfunc="first", sort=False)
    shown = shown.reindex(columns=list(dict.fromkeys(test["task"]))).fillna("–")
    shown.columns.name = "test (%)"
    return shown.to_string(sparsify=False).splitlines()  # every row names its model
