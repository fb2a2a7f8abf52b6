"""Figures in the paper's shapes (matplotlib, each saved as PNG and SVG).

- `per_layer_figure`: accuracy per Q-Former layer on an evaluated split, one line per model, frozen probes,
  with the 95 % bootstrap interval as a band (the paper's Fig. 2a for VSR, Fig. 4 for RefCOCOg).
- `category_figure`: accuracy per category, frozen and unfrozen side by side, one panel per model, with
  interval whiskers (Fig. 2b, Fig. 5).
Titles, chance levels and what a category is come from the runs' task (`probing.tasks`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from probing.analysis import RunResults, last_layer_runs, overall, per_category  # noqa: E402
from probing.records import NO_PROBE  # noqa: E402

METRIC_LABELS = {"acc@0.5": "Acc@0.5 (%)", "accuracy": "accuracy (%)"}
MODE_COLOURS = {"frozen": "#4C72B0", "unfrozen": "#DD8452", "human": "#55A868"}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, f"{metric} (%)")


def _save(figure, base: Path) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight")
    plt.close(figure)
    return paths


def per_layer_figure(runs: Sequence[RunResults], task: str, base: Path, probe: str = "linear") -> list[Path]:
    """Frozen accuracy per layer and model for one task (and the runs' split), with interval bands."""
    chosen = [r for r in runs if r.task == task and r.mode == "frozen" and r.probe == probe]
    if not chosen:
        return []
    by_model: dict[str, dict[int, RunResults]] = defaultdict(dict)
    for run in chosen:
        by_model[run.label][run.layer] = run
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for label, layers in sorted(by_model.items()):
        xs = sorted(layers)
        estimates = [overall(layers[x]) for x in xs]
        axes.plot(xs, [100 * e.mean for e in estimates], marker="o", label=label)
        axes.fill_between(xs, [100 * e.low for e in estimates], [100 * e.high for e in estimates], alpha=0.2)
    spec = chosen[0].spec
    if spec.chance is not None:
        axes.axhline(100 * spec.chance, color="grey", linestyle=":", linewidth=1, label="chance")
    all_layers = sorted({run.layer for run in chosen})
    axes.set_xticks(all_layers)
    axes.set_xlabel("Q-Former layer")
    axes.set_ylabel(f"{chosen[0].split} {metric_label(chosen[0].metric)}")
    axes.set_title(f"{chosen[0].column}: frozen {probe} probes per layer (95% bootstrap CI)")
    axes.grid(alpha=0.3)
    axes.legend(frameon=False)
    return _save(figure, base)


def category_runs(runs: Sequence[RunResults], task: str, probe: str = "linear") -> list[RunResults]:
    """The runs a category figure draws: per model and mode, the highest layer with the linear probe."""
    return [run for _, run in sorted(last_layer_runs(list(runs), probe).items()) if run.task == task]


def category_figure(runs: Sequence[RunResults], task: str, base: Path) -> list[Path]:
    """Per-category accuracy, frozen vs unfrozen side by side, one panel per model (last layer, linear)."""
    chosen = category_runs(runs, task)
    if not chosen:
        return []
    by_model: dict[str, dict[str, RunResults]] = defaultdict(dict)
    for run in chosen:
        by_model[run.label][run.mode] = run
    # people's answers (no probe) in the last panel
    models = sorted(by_model, key=lambda model: (all(r.probe == NO_PROBE for r in by_model[model].values()), model))
    categories = sorted({c for run in chosen for c in run.categories})
    width = max(5.0, 0.65 * len(categories) + 1.5)
    figure, panels = plt.subplots(1, len(models), figsize=(width * len(models), 4.2), sharey=True, squeeze=False)
    bar = 0.38
    for panel, model in zip(panels[0], models, strict=True):
        modes = [m for m in MODE_COLOURS if m in by_model[model]]
        for offset, mode in enumerate(modes):
            estimates = per_category(by_model[model][mode])
            xs = [i + (offset - (len(modes) - 1) / 2) * bar for i in range(len(categories))]
            means = [100 * estimates[c].mean if c in estimates else 0.0 for c in categories]
            errors = [
                [100 * (estimates[c].mean - estimates[c].low) if c in estimates else 0 for c in categories],
                [100 * (estimates[c].high - estimates[c].mean) if c in estimates else 0 for c in categories],
            ]
            panel.bar(xs, means, width=bar, yerr=errors, capsize=2, label=mode, color=MODE_COLOURS[mode])
        panel.set_xticks(range(len(categories)))
        panel.set_xticklabels(categories, rotation=35, ha="right")
        panel.set_title(model)
        panel.grid(axis="y", alpha=0.3)
        if chosen[0].spec.chance is not None:
            panel.axhline(100 * chosen[0].spec.chance, color="grey", linestyle=":", linewidth=1)
    panels[0][0].set_ylabel(f"{chosen[0].split} {metric_label(chosen[0].metric)}")
    handles = {}  # one legend for every panel's modes
    for panel in panels[0]:
        shown, labels = panel.get_legend_handles_labels()
        handles.update(zip(labels, shown, strict=True))
    panels[0][-1].legend(handles.values(), handles.keys(), frameon=False)
    figure.suptitle(f"{chosen[0].column} per {chosen[0].spec.category}: frozen vs unfrozen (95% bootstrap CI)")
    figure.tight_layout()
    return _save(figure, base)
