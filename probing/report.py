"""`probing report RUN... --out DIR`: tables (Markdown + CSV) and figures in the paper's shapes.

Tables, each built from whichever runs are given (a table whose runs are absent is left out):
- Table 1: test accuracy per model x mode (frozen / unfrozen) x task, linear probe on the last layer given.
- Table 2: VSR accuracy per meta-category, same runs.
- Table 3: probe sizes (linear, SwiGLU 2 / 4 layers), frozen, last layer.
- Table 4: the best hyper-parameters each search found, with its val and test metrics.
- Table 5: Kendall tau between per-supercategory accuracy and the number of train examples, the mean box
  area and the mean centre distance (RefCOCOg and RCM); p > 0.05 marked with a dagger.
- Per layer: frozen linear probes, every layer given.
- Per category: RefCOCOg and RCM per COCO supercategory.
Cells read `mean [95% CI]` in percent, with `+- std` over seeds where several seeds were run. With
`--compare-paper` the paper's Table 1 numbers appear in their own rows, labelled "(paper)"; the paper
reports single runs without intervals.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probing.analysis import (
    KENDALL_PROPERTIES,
    Estimate,
    RunResults,
    deduplicate,
    kendall,
    last_layer_runs,
    load_run,
    overall,
    per_category,
)
from probing.artifacts import write_json
from probing.errors import ProbingError
from probing.plots import TASK_TITLES, category_figure, per_layer_figure

TASKS = ("refcocog", "vsr", "rcm")
MODES = ("frozen", "unfrozen")
PROBES = ("linear", "swiglu2", "swiglu4")
PROBE_NAMES = {"linear": "linear", "swiglu2": "SwiGLU 2 layers", "swiglu4": "SwiGLU 4 layers"}
VSR_META_CATEGORIES = ("Adjacency", "Directional", "Orientation", "Projective", "Proximity", "Topological",
                       "Unallocated")
PROPERTY_NAMES = {"train_examples": "train examples", "mean_area": "mean box area",
                  "mean_centre_distance": "mean centre distance"}
# The paper's Table 1 (test, %), for --compare-paper: (model, mode) -> task -> value.
PAPER_TABLE1 = {
    ("BLIP-2", "frozen"): {"refcocog": 30.26, "vsr": 64.97, "rcm": 69.49},
    ("BLIP-2", "unfrozen"): {"refcocog": 71.72, "vsr": 80.50, "rcm": 81.35},
    ("InstructBLIP", "frozen"): {"refcocog": 19.92, "vsr": 55.72, "rcm": 63.08},
    ("InstructBLIP", "unfrozen"): {"refcocog": 69.34, "vsr": 76.99, "rcm": 80.86},
}
NOT_SIGNIFICANT = "†"


def cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "–"
    text = f"{100 * estimate.mean:.1f} [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"
    if estimate.seed_std is not None:
        text += f" ±{100 * estimate.seed_std:.1f}"
    return text


@dataclass
class Table:
    name: str
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # numbers behind the cells, for the CSV
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join(" --- " for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"_{note}_" for note in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[Path]:
        markdown = folder / f"{self.name}.md"
        markdown.write_text(self.markdown(), encoding="utf-8")
        table_csv = folder / f"{self.name}.csv"
        labels = ["model", "mode", "probe", "layer", "task", "category", "property"]
        keys = {key for record in self.records for key in record}
        columns = [k for k in labels if k in keys] + sorted(keys - set(labels))
        with open(table_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.records)
        return [markdown, table_csv]


def _record(estimate: Estimate, **labels) -> dict[str, Any]:
    return {**labels, **estimate.as_dict()}


def table1(runs: Sequence[RunResults], compare_paper: bool) -> Table | None:
    chosen = last_layer_runs(runs)
    if not chosen:
        return None
    tasks = [t for t in TASKS if any(key[2] == t for key in chosen)]
    table = Table("table1", "Table 1: test accuracy, linear probe on the last layer (%)",
                  ["model", "mode", *[f"{TASK_TITLES[t]} ({'Acc@0.5' if t == 'refcocog' else 'acc'})" for t in tasks]])
    models = sorted({key[0] for key in chosen})
    for model in models:
        for mode in MODES:
            if not any((model, mode, t) in chosen for t in tasks):
                continue
            estimates = {t: overall(chosen[(model, mode, t)]) if (model, mode, t) in chosen else None for t in tasks}
            table.rows.append([model, mode, *[cell(estimates[t]) for t in tasks]])
            table.records += [_record(e, model=model, mode=mode, task=t, layer=chosen[(model, mode, t)].layer)
                              for t, e in estimates.items() if e is not None]
            paper = PAPER_TABLE1.get((model, mode))
            if compare_paper and paper:
                table.rows.append([f"{model} (paper)", mode, *[f"{paper[t]:.2f}" for t in tasks]])
                table.records += [{"model": f"{model} (paper)", "mode": mode, "task": t, "mean": paper[t] / 100}
                                  for t in tasks]
    layers = sorted({run.layer for run in chosen.values()})
    table.notes.append(f"mean [95% bootstrap CI over test examples] ±std over seeds; layers used: {layers}")
    if compare_paper:
        table.notes.append("rows marked (paper): numbers reported by Pantazopoulos et al. (2024), single runs")
    return table


def category_table(runs: Sequence[RunResults], task: str, name: str, title: str,
                   categories: Sequence[str] | None = None) -> Table | None:
    chosen = {key: run for key, run in last_layer_runs(runs).items() if key[2] == task}
    if not chosen:
        return None
    present = sorted({c for run in chosen.values() for c in run.categories})
    columns = [c for c in categories if c in present] if categories else present
    table = Table(name, title, ["model", "mode", *columns])
    for (model, mode, _), run in sorted(chosen.items()):
        estimates = per_category(run)
        table.rows.append([model, mode, *[cell(estimates.get(c)) for c in columns]])
        table.records += [_record(e, model=model, mode=mode, category=c) for c, e in estimates.items()]
    table.notes.append("mean [95% bootstrap CI] ±std over seeds, %; categories with no test example omitted")
    return table


def table3(runs: Sequence[RunResults]) -> Table | None:
    frozen = [r for r in runs if r.mode == "frozen"]
    by_probe = {probe: last_layer_runs(frozen, probe) for probe in PROBES}
    if sum(bool(v) for v in by_probe.values()) < 2:
        return None  # one probe size says nothing about probe size
    tasks = [t for t in TASKS if any(key[2] == t for runs_ in by_probe.values() for key in runs_)]
    table = Table("table3", "Table 3: probe size, frozen, last layer (%)",
                  ["model", "probe", *[TASK_TITLES[t] for t in tasks]])
    models = sorted({key[0] for runs_ in by_probe.values() for key in runs_})
    for model in models:
        for probe in PROBES:
            found = {t: by_probe[probe].get((model, "frozen", t)) for t in tasks}
            if not any(found.values()):
                continue
            estimates = {t: overall(run) if run else None for t, run in found.items()}
            table.rows.append([model, PROBE_NAMES[probe], *[cell(estimates[t]) for t in tasks]])
            table.records += [_record(e, model=model, probe=probe, task=t) for t, e in estimates.items() if e]
    return table


def table4(runs: Sequence[RunResults]) -> Table | None:
    """The best hyper-parameters each search found, with its val and test metrics (the paper's Table 4)."""
    searched = [run for run in runs if run.search is not None]
    if not searched:
        return None
    table = Table("table4", "Table 4: best trial of each search (hyper-parameters, val and test)",
                  ["model", "mode", "task", "layer", "probe", "lr", "epochs", "GIoU scale", "L1 scale", "trials",
                   "val (%)", "test (%)"])
    for run in sorted(searched, key=lambda r: (r.label, MODES.index(r.mode), TASKS.index(r.task), r.layer, r.probe)):
        best = run.search["best"]
        params = best["params"]
        metric = run.search["metric"]
        scales = [f"{params[name]:g}" if name in params else "–" for name in ("giou_scale", "l1_scale")]
        table.rows.append([run.label, run.mode, TASK_TITLES[run.task], str(run.layer), run.probe,
                           f"{params['lr']:.2e}", str(params["epochs"]), *scales,
                           str(run.search["trials_complete"]), f"{100 * best['val_search']:.1f}",
                           cell(overall(run))])
        table.records.append({"model": run.label, "mode": run.mode, "task": run.task, "layer": run.layer,
                              "probe": run.probe, **{f"param_{k}": v for k, v in params.items()},
                              "trials": run.search["trials_complete"], "val": best["val_search"],
                              **{f"test_{k}": v for k, v in overall(run).as_dict().items()}})
    table.notes.append(f"val: the best trial's val {metric} in the search; test: the best trial retrained with "
                       "its final seeds, mean [95% CI] ±std")
    return table


def table5(runs: Sequence[RunResults]) -> Table | None:
    chosen = {key: run for key, run in last_layer_runs(runs).items() if key[2] in ("refcocog", "rcm")}
    if not chosen:
        return None
    table = Table("table5", "Table 5: Kendall tau between per-supercategory accuracy and data properties",
                  ["model", "mode", "task", *[f"{PROPERTY_NAMES[p]}: tau (p)" for p in KENDALL_PROPERTIES]])
    for (model, mode, task), run in sorted(chosen.items()):
        correlations = kendall(run)
        cells = []
        for name in KENDALL_PROPERTIES:
            c = correlations[name]
            mark = "" if c.significant else NOT_SIGNIFICANT
            cells.append(f"{c.tau:+.2f} ({c.p_value:.3f}){mark}" if c.tau == c.tau else "undefined")
            table.records.append({"model": model, "mode": mode, "task": task, "property": name,
                                  "tau": c.tau if c.tau == c.tau else None,
                                  "p_value": c.p_value if c.p_value == c.p_value else None,
                                  "significant": c.significant, "categories": c.categories})
        table.rows.append([model, mode, TASK_TITLES[task], *cells])
    table.notes.append(f"{NOT_SIGNIFICANT} p > 0.05 (not significant); 'undefined': a constant column (no ranking)")
    return table


def per_layer_table(runs: Sequence[RunResults]) -> Table | None:
    frozen = [r for r in runs if r.mode == "frozen" and r.probe == "linear"]
    layers_seen = defaultdict(set)
    for run in frozen:
        layers_seen[(run.label, run.task)].add(run.layer)
    if not any(len(layers) > 1 for layers in layers_seen.values()):
        return None
    tasks = [t for t in TASKS if any(r.task == t for r in frozen)]
    table = Table("per_layer", "Per layer: frozen linear probes, test (%)",
                  ["model", "layer", *[TASK_TITLES[t] for t in tasks]])
    index = {(r.label, r.layer, r.task): r for r in frozen}
    for model in sorted({r.label for r in frozen}):
        for layer in sorted({r.layer for r in frozen if r.label == model}):
            estimates = {t: overall(index[(model, layer, t)]) if (model, layer, t) in index else None for t in tasks}
            table.rows.append([model, str(layer), *[cell(estimates[t]) for t in tasks]])
            table.records += [_record(e, model=model, layer=layer, task=t) for t, e in estimates.items() if e]
    return table


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run and search folders among `paths` (folders holding runs are searched, `best/` of a search once)."""
    found: list[Path] = []

    def finished(folder: Path, root: Path) -> bool:  # a hidden component is a half-written output (*.partial-*)
        return not any(part.startswith(".") for part in folder.relative_to(root).parts)

    for path in map(Path, paths):
        if not path.exists():
            raise ProbingError(f"{path}: not found")
        if (path / "summary.json").is_file() and (path / "best").is_dir():
            found.append(path)
        elif (path / "metrics.json").is_file() and (path / "manifest.json").is_file():
            found.append(path)
        elif path.is_dir():
            searches = {p.parent for p in path.rglob("summary.json")
                        if (p.parent / "best").is_dir() and finished(p.parent, path)}
            runs = {p.parent for p in path.rglob("metrics.json") if (p.parent / "manifest.json").is_file()
                    and p.parent.parent not in searches and finished(p.parent, path)}
            found += sorted(searches | runs)
        else:
            raise ProbingError(f"{path}: not a run or search folder")
    if not found:
        raise ProbingError(f"no run folders under {', '.join(map(str, paths))}")
    return found


def write_report(paths: Sequence[Path], out: Path, compare_paper: bool = False,
                 only: Sequence[str] | None = None) -> dict[str, Any]:
    """Load the runs, write tables (all, or those named in `only`), figures and `README.md` into `out`."""
    runs, dropped = deduplicate([load_run(path) for path in find_runs(paths)])
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    tables = [t for t in (
        table1(runs, compare_paper),
        category_table(runs, "vsr", "table2", "Table 2: VSR accuracy per meta-category (%)", VSR_META_CATEGORIES),
        table3(runs),
        table4(runs),
        table5(runs),
        per_layer_table(runs),
        category_table(runs, "refcocog", "categories_refcocog", "RefCOCOg Acc@0.5 per COCO supercategory (%)"),
        category_table(runs, "rcm", "categories_rcm", "RCM accuracy per COCO supercategory (%)"),
    ) if t is not None and (only is None or t.name in only)]
    written = {"tables": [], "figures": []}
    for table in tables:
        written["tables"] += [str(p.relative_to(out)) for p in table.write(out / "tables")]
    figures = []
    for task in ("vsr", "refcocog", "rcm"):
        figures += per_layer_figure(runs, task, out / "figures" / f"per_layer_{task}")
        figures += category_figure(runs, task, out / "figures" / f"categories_{task}")
    written["figures"] = [str(p.relative_to(out)) for p in figures]
    readme = ["# Report", "", f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs), ""]
    if dropped:
        readme += [f"{len(dropped)} run(s) repeat a kept configuration (model, task, mode, layer, probe) and are "
                   "left out: " + ", ".join(f"`{r.path}`" for r in dropped), ""]
    readme += [table.markdown() for table in tables]
    if figures:
        readme += ["## Figures", ""]
        readme += [f"![{p.stem}](figures/{p.name})" for p in figures if p.suffix == ".png"]
        readme += ["", "SVG versions sit beside the PNGs in `figures/`.", ""]
    readme += ["## Method", "",
               "Accuracies are means over seeds of per-example correctness on the test split (Acc@IoU>=0.5 for "
               "RefCOCOg), with 95% percentile bootstrap intervals over test examples (1,000 resamples, seeded) and "
               "the standard deviation across seeds where several seeds were run. Kendall tau is scipy's, across "
               "COCO supercategories.", ""]
    (out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    write_json(out / "report.json", {"runs": [str(r.path) for r in runs], **written,
                                     "compare_paper": compare_paper})
    return written | {"runs": len(runs), "dropped": len(dropped), "readme": str(out / "README.md")}


def analysis_json(path: Path) -> str:
    from probing.analysis import analyse

    return json.dumps(analyse(load_run(path)), indent=2, allow_nan=False)
