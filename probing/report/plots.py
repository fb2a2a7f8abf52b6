"""Figures in the paper's shapes (matplotlib, each saved as PDF, PNG and SVG), in one house style.

- `per_layer_figure`: accuracy per Q-Former layer on an evaluated split, one line per model, frozen probes,
  with the 95 % bootstrap interval as a band (the paper's Fig. 2a for VSR, Fig. 4 for RefCOCOg); none from a
  single layer (a "curve" of one point says nothing per layer).
- `category_figure`: accuracy per category, frozen and unfrozen side by side, one panel per model, with
  interval whiskers and n under each category (Fig. 2b, Fig. 5); a category a run has no example of is
  drawn as missing (a gap marked "n/a"), never as a 0 % bar, and a task with a fixed list of categories (VSR's
  meta-categories) shows each of them, with n=0 where no run has an example.
- `learning_curve_figure`: the per-epoch validation metric of a search's best trial, one line per final seed,
  from the history stored in its `metrics.json`.
House style (`house_style`): applied inside a `matplotlib.rc_context` around each figure, never globally, so
it neither leaks into nor takes from other plotting in the process (Optuna's plots set the ggplot style
globally; `rcdefaults` inside the context starts every figure from matplotlib's defaults). Sizes fit a paper:
a column (3.3 in) or the page width (6.9 in), text of at least 7 pt, legends outside the data.
No figure bakes a title into the image (the paper's caption says what it shows; the file name says it too);
the value axis spans the data (intervals and chance) rounded out to tens, the same on every panel, not a fixed
0-100 % (bars start at 0). Chance levels and what a category is come from the runs' task (`probing.tasks`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from probing.core.records import NO_PROBE, MetricsRecord  # noqa: E402
from probing.report.analysis import (  # noqa: E402
    FamilyRow,
    RunResults,
    category_rows,
    last_layer_runs,
    overall,
    per_category,
)

METRIC_LABELS = {"acc@0.5": "Acc@0.5 (%)", "accuracy": "accuracy (%)"}
COLUMN_WIDTH = 3.3  # inches: one column of a two-column paper
PAGE_WIDTH = 6.9  # inches: the text width
FONT_SIZE = 8  # points
MIN_FONT_SIZE = 7  # points: the smallest text a figure holds (print)
FORMATS = (".pdf", ".png", ".svg")
# Colour-blind-safe (Okabe-Ito) colours; hatches tell the modes apart in greyscale too
MODE_STYLES = {
    "frozen": {"color": "#0072B2", "hatch": ""},
    "unfrozen": {"color": "#E69F00", "hatch": "//"},
    "human": {"color": "#009E73", "hatch": ".."},
}
LINE_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000"]
LINE_STYLES = ["-", "--", "-.", ":"]
BAND_ALPHA = 0.12  # interval bands: light enough that overlapping bands and the lines stay readable
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
HOUSE_STYLE = {
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": MIN_FONT_SIZE,
    "ytick.labelsize": MIN_FONT_SIZE,
    "legend.fontsize": MIN_FONT_SIZE,
    "figure.titlesize": FONT_SIZE + 1,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "pdf.fonttype": 42,  # TrueType in PDFs (editable text, accepted by publishers)
    "svg.fonttype": "none",
    "savefig.dpi": 300,
}


@contextmanager
def house_style() -> Iterator[None]:
    """The house style for the figures drawn inside the block, from matplotlib's defaults (whatever style the
    process set globally, e.g. Optuna's ggplot), restored on exit."""
    with plt.rc_context():
        matplotlib.rcdefaults()
        matplotlib.use("Agg")
        plt.rcParams.update(HOUSE_STYLE)
        yield


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, f"{metric} (%)")


def _save(figure, base: Path) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(suffix) for suffix in FORMATS]
    for path in paths:
        figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return paths


def value_limits(lows: Sequence[float], highs: Sequence[float], chance: float | None = None) -> tuple[float, float]:
    """The value axis (percent) for these interval ends and chance: the data's range rounded out to tens, within
    0-100 (a figure of accuracies between 40 and 60 % is not drawn on a 0-100 axis)."""
    import math

    values = [*lows, *highs, *([] if chance is None else [100 * chance])]
    low = max(0.0, 10 * math.floor(min(values) / 10 - 0.05))
    high = min(100.0, 10 * math.ceil(max(values) / 10 + 0.05))
    return low, max(high, low + 10)


def _legend_below(axes) -> None:
    """The legend under the axes, off the data, keeping the figure a column wide."""
    axes.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)


def per_layer_figure(runs: Sequence[RunResults], task: str, base: Path, probe: str = "linear") -> list[Path]:
    """Frozen accuracy per layer and model for one task (and the runs' split), with interval bands; nothing
    when no model has more than one layer."""
    chosen = [r for r in runs if r.task == task and r.mode == "frozen" and r.probe == probe]
    by_model: dict[str, dict[int, RunResults]] = defaultdict(dict)
    for run in chosen:
        by_model[run.label][run.layer] = run
    if not any(len(layers) > 1 for layers in by_model.values()):
        return []
    spec = chosen[0].spec
    ends = [overall(run) for run in chosen]
    with house_style():
        figure, axes = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
        for index, (label, layers) in enumerate(sorted(by_model.items())):
            xs = sorted(layers)
            estimates = [overall(layers[x]) for x in xs]
            colour = LINE_COLOURS[index % len(LINE_COLOURS)]
            if len(xs) == 1:  # one layer (e.g. the random-weights model, last layer only): a marker and its CI
                e = estimates[0]
                axes.errorbar(
                    xs,
                    [100 * e.mean],
                    yerr=[[100 * (e.mean - e.low)], [100 * (e.high - e.mean)]],
                    color=colour,
                    marker=MARKERS[index % len(MARKERS)],
                    linestyle="none",
                    capsize=2,
                    label=f"{label} (layer {xs[0]} only)",
                )
                continue
            axes.plot(
                xs,
                [100 * e.mean for e in estimates],
                color=colour,
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                marker=MARKERS[index % len(MARKERS)],
                label=label,
            )
            axes.fill_between(
                xs,
                [100 * e.low for e in estimates],
                [100 * e.high for e in estimates],
                color=colour,
                alpha=BAND_ALPHA,
                linewidth=0,
            )
        if spec.chance is not None:
            axes.axhline(100 * spec.chance, color="grey", linestyle=":", linewidth=1, label="chance")
        axes.set_xticks(sorted({run.layer for run in chosen}))
        axes.set_xlabel("Q-Former layer")
        axes.set_ylabel(f"{chosen[0].split} {metric_label(chosen[0].metric)}")
        axes.set_ylim(*value_limits([100 * e.low for e in ends], [100 * e.high for e in ends], spec.chance))
        _legend_below(axes)
        return _save(figure, base)


def families_figure(rows: Sequence[FamilyRow], base: Path) -> list[Path]:
    """Accuracy against the number of latents, one panel per task column: each trained model a filled marker
    with its interval, its family's random-weights model the same marker hollow; nothing when no row knows its
    latent count. The x axis is logarithmic (latent counts run from tens to hundreds) with the counts as ticks."""
    rows = [row for row in rows if row.latents is not None]
    columns = list(dict.fromkeys(column for row in rows for column in row.runs))
    if not rows or not columns:
        return []
    with house_style():
        figure, panels = plt.subplots(
            1, len(columns), figsize=(min(PAGE_WIDTH, COLUMN_WIDTH * len(columns)), 2.4), squeeze=False
        )
        for axes, column in zip(panels[0], columns, strict=True):
            ends, spec, split, metric = [], None, "test", "accuracy"
            for index, row in enumerate(rows):
                pair = row.runs.get(column)
                if pair is None:
                    continue
                colour, marker = LINE_COLOURS[index % len(LINE_COLOURS)], MARKERS[index % len(MARKERS)]
                for run, hollow in zip(pair, (False, True), strict=True):
                    if run is None:
                        continue
                    spec, split, metric = run.spec, run.split, run.metric
                    e = overall(run)
                    ends.append(e)
                    axes.errorbar(
                        [row.latents[0] * (1.12 if hollow else 1.0)],  # beside its model's marker, not on it
                        [100 * e.mean],
                        yerr=[[100 * (e.mean - e.low)], [100 * (e.high - e.mean)]],
                        color=colour,
                        marker=marker,
                        markerfacecolor="white" if hollow else colour,
                        linestyle="none",
                        capsize=2,
                        label=f"{row.label}: random weights" if hollow else row.label,
                    )
            if spec is not None and spec.chance is not None:
                axes.axhline(100 * spec.chance, color="grey", linestyle=":", linewidth=1, label="chance")
            counts = sorted({row.latents[0] for row in rows})
            axes.set_xscale("log")
            axes.set_xticks(counts, [str(count) for count in counts])
            axes.minorticks_off()
            axes.set_xlim(counts[0] / 1.6, counts[-1] * 1.6)
            axes.set_xlabel(f"{column}: latents")
            axes.set_ylabel(f"{split} {metric_label(metric)}")
            chance = spec.chance if spec is not None else None
            axes.set_ylim(*value_limits([100 * e.low for e in ends], [100 * e.high for e in ends], chance))
        legend: dict[str, Any] = {}  # label -> handle, over every panel (a model may miss a task)
        for axes in panels[0]:
            for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        handles, labels = list(legend.values()), list(legend)
        figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.02))
        figure.subplots_adjust(bottom=0.2 + 0.06 * ((len(labels) + 1) // 2))
        return _save(figure, base)


def category_runs(runs: Sequence[RunResults], task: str, probe: str = "linear") -> list[RunResults]:
    """The runs a category figure draws: per model and mode, the highest layer with the linear probe."""
    return [run for _, run in sorted(last_layer_runs(list(runs), probe).items()) if run.task == task]


def category_figure(runs: Sequence[RunResults], task: str, base: Path) -> list[Path]:
    """Per-category accuracy, frozen vs unfrozen side by side, one panel per model (last layer, linear), n under
    each category, a category without examples drawn as missing."""
    chosen = category_runs(runs, task)
    if not chosen:
        return []
    by_model: dict[str, dict[str, RunResults]] = defaultdict(dict)
    for run in chosen:
        by_model[run.label][run.mode] = run
    # people's answers (no probe) in the last panel
    models = sorted(by_model, key=lambda model: (all(r.probe == NO_PROBE for r in by_model[model].values()), model))
    spec = chosen[0].spec
    # a task with a fixed list of categories shows each (one no run has an example of drawn as missing, n=0);
    # otherwise the categories the runs have examples of
    present = sorted({c for run in chosen for c in category_rows(run)})
    categories = list(spec.category_order) if spec.category_order else present
    counts = {c: max(run.categories.count(c) for run in chosen) for c in categories}
    drawn = [e for run in chosen for e in per_category(run).values()]
    # bars measure from zero (a bar cut at 40 % misstates its ratio to another); the top follows the data
    limits = value_limits([0.0], [100 * e.high for e in drawn], spec.chance)
    with house_style():
        height = 1.6 + (0.04 * max(len(c) for c in categories) if len(categories) >= 7 else 0.0)  # per panel
        figure, panels = plt.subplots(
            len(models), 1, figsize=(PAGE_WIDTH, height * len(models)), sharey=True, squeeze=False
        )
        bar = 0.38
        for panel, model in zip(panels[:, 0], models, strict=True):
            modes = [m for m in MODE_STYLES if m in by_model[model]]
            for offset, mode in enumerate(modes):
                estimates = per_category(by_model[model][mode])
                style = MODE_STYLES[mode]
                for i, category in enumerate(categories):
                    x = i + (offset - (len(modes) - 1) / 2) * bar
                    if category not in estimates:  # no example: a gap marked as missing, never a 0 % bar
                        panel.text(x, 1, "n/a", ha="center", va="bottom", fontsize=MIN_FONT_SIZE, color="grey")
                        continue
                    e = estimates[category]
                    panel.bar(
                        x,
                        100 * e.mean,
                        width=bar,
                        yerr=[[100 * (e.mean - e.low)], [100 * (e.high - e.mean)]],
                        capsize=1.5,
                        color=style["color"],
                        hatch=style["hatch"],
                        edgecolor="white",
                        linewidth=0.4,
                        error_kw={"elinewidth": 0.6},
                        label=mode if i == 0 or mode not in panel.get_legend_handles_labels()[1] else None,
                    )
            panel.set_xticks(range(len(categories)))
            panel.set_xticklabels(
                [f"{c}\nn={counts[c]}" for c in categories],
                rotation=0 if len(categories) < 7 else 40,
                ha="center" if len(categories) < 7 else "right",
            )
            panel.set_title(model, loc="left")
            panel.grid(axis="x", visible=False)
            panel.set_ylim(*limits)  # shared by the panels (sharey)
            if spec.chance is not None:
                panel.axhline(100 * spec.chance, color="grey", linestyle=":", linewidth=1, label="chance")
            panel.set_ylabel(f"{chosen[0].split} {metric_label(chosen[0].metric)}")
        handles = {}  # one legend for every panel's modes, above the panels (off the data)
        for panel in panels[:, 0]:
            shown, labels = panel.get_legend_handles_labels()
            handles.update(zip(labels, shown, strict=True))
        figure.legend(
            handles.values(),
            handles.keys(),
            frameon=False,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=len(handles),
        )
        figure.tight_layout()
        return _save(figure, base)


def learning_curve_figure(search: RunResults, base: Path) -> list[Path]:
    """The per-epoch validation metric of a search's best trial (its final seeds, one line each), from the
    history in the best run's `metrics.json`; nothing when no history was stored."""
    record = MetricsRecord.read(search.path)
    metric = record.metric
    curves = [
        (run.seed, [(entry["epoch"], entry[metric]) for entry in run.history or [] if metric in entry])
        for run in record.runs
    ]
    curves = [(seed, points) for seed, points in curves if len(points) > 1]
    if not curves:
        return []
    with house_style():
        figure, axes = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
        for index, (seed, points) in enumerate(curves):
            axes.plot(
                [epoch for epoch, _ in points],
                [100 * value for _, value in points],
                color=LINE_COLOURS[index % len(LINE_COLOURS)],
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                label=f"seed {seed}",
            )
        axes.set_xlabel("epoch")
        axes.set_ylabel(f"val {metric_label(metric)}")
        _legend_below(axes)
        return _save(figure, base)
