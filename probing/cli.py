"""The `probing` command line: a thin typer layer over the typed stage functions.

No logic lives here: each command parses options, calls one function and prints its result. User errors
(`ProbingError`) are printed as one line on stderr with exit status 2; `--verbose` (anywhere on the line)
adds the traceback. Other exceptions are bugs: traceback and exit status 1.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from probing.errors import ProbingError

app = typer.Typer(
    name="probing",
    help="Probe whether a vision-and-language resampler (BLIP-2 / InstructBLIP Q-Former) encodes where things are.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect datasets before a long run.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_VERBOSE = False

# ------------------------------------------------------------------ data options, the same on every command
TaskOption = Annotated[str, typer.Option("--task", help="refcocog | vsr | rcm")]
RefsOption = Annotated[Path | None, typer.Option("--refs", help="RefCOCOg: REFER refs(umd).p")]
InstancesOption = Annotated[Path | None, typer.Option("--instances", help="RefCOCOg: COCO instances.json")]
ImagesOption = Annotated[
    Path | None,
    typer.Option("--images", help="Image root: train2014/ and/or train2017/ (RefCOCOg, RCM); "
                                   "trainval2017/ or train2017/ + val2017/ (VSR)"),
]
VsrOption = Annotated[Path | None, typer.Option("--vsr", help="VSR: folder with train.jsonl, dev.jsonl, test.jsonl")]
RcmOption = Annotated[Path | None, typer.Option("--rcm", help="RCM: folder written by `probing build-rcm`")]


# ------------------------------------------------------------------ options shared by train and search
ProbeOption = Annotated[str, typer.Option(help="linear | swiglu2 | swiglu4")]
HiddenOption = Annotated[int, typer.Option(help="Width of the SwiGLU probes' hidden layers.")]
PatienceOption = Annotated[int | None, typer.Option(help="Early-stopping patience in epochs; 0 = none (default: "
                                                         "10 for RCM, none otherwise).")]
BatchSizeOption = Annotated[int, typer.Option(help="Training batch size.")]
ModelOption = Annotated[str | None, typer.Option(help="Unfrozen: the model (as for probing extract).")]
InitOption = Annotated[str, typer.Option(help="Unfrozen: pretrained | random.")]
RevisionOption = Annotated[str | None, typer.Option(help="Unfrozen: Hub branch, tag or commit.")]
WorkersOption = Annotated[int, typer.Option(help="Unfrozen: image decoding processes.")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if available).")]


def _optional_data_options(task: str, refs, instances, images, vsr, rcm):
    """Data options when any is given (training can also find its data through the stores' manifests)."""
    given = any(value is not None for value in (refs, instances, images, vsr, rcm))
    return _data_options(task, refs, instances, images, vsr, rcm) if given else None


def _patience(task: str, patience: int | None) -> int | None:
    from probing.train import default_patience

    return default_patience(task) if patience is None else (patience or None)


def _data_options(task: str, refs, instances, images, vsr, rcm):
    from probing.data import DataOptions

    return DataOptions(task=task, images=images, refs=refs, instances=instances, vsr=vsr, rcm=rcm)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logging.")] = False,
) -> None:
    """Probe whether a resampler's query outputs still encode where things are."""


# ------------------------------------------------------------------ commands

@app.command("make-demo-data")
def make_demo_data_command(
    out: Annotated[Path, typer.Argument(help="Folder to write the demo dataset into.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    refcocog_images: Annotated[int, typer.Option(help="Number of RefCOCOg-style images.")] = 300,
    vsr_images: Annotated[int, typer.Option(help="Number of VSR-style images.")] = 240,
    vsr_version: Annotated[str, typer.Option(help="VSR file version: current | original.")] = "current",
) -> None:
    """Write the embedded demo dataset (synthetic shapes) in the real RefCOCOg / COCO / VSR formats."""
    from probing.data.synthetic import demo_data_options, make_demo_data

    if vsr_version not in ("current", "original"):
        raise ProbingError(f"--vsr-version: unknown version '{vsr_version}' (choose current or original)")
    manifest = make_demo_data(out, seed=seed, refcocog_images=refcocog_images, vsr_images=vsr_images,
                              vsr_version=vsr_version)
    verb = "already there" if manifest["reused"] else "written"
    typer.echo(f"demo dataset {verb}: {out}")
    for split, counts in manifest["refcocog"].items():
        typer.echo(f"  refcocog {split:5s} images {counts['images']:5d}  refs {counts['refs']:5d}  "
                   f"sentences {counts['sentences']:5d}")
    for split, counts in manifest["vsr"].items():
        typer.echo(f"  vsr      {split:5s} examples {counts['examples']:5d}  true {counts['true']:5d}")
    options = demo_data_options(out)
    typer.echo("data options:")
    typer.echo(f"  refcocog: --refs '{options['refcocog']['refs']}' --instances {options['refcocog']['instances']} "
               f"--images {options['refcocog']['images']}")
    typer.echo(f"  vsr:      --vsr {options['vsr']['vsr']} --images {options['vsr']['images']}")


@app.command("build-rcm")
def build_rcm_command(
    refs: Annotated[Path, typer.Option("--refs", help="RefCOCOg: REFER refs(umd).p")],
    instances: Annotated[Path, typer.Option("--instances", help="RefCOCOg: COCO instances.json")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for {train,val,test}.jsonl + manifest.json")],
    seed: Annotated[int, typer.Option(help="Random seed (the build is deterministic for a seed).")] = 0,
) -> None:
    """Build Region Cell Matching (3x3 grid cells) from RefCOCOg umd, balanced per cell, per split."""
    from probing.data.rcm import build_rcm

    manifest = build_rcm(refs, instances, out, seed=seed)
    verb = "already there" if manifest["reused"] else "written"
    typer.echo(f"RCM {verb}: {out}")
    for split, counts in manifest["splits"].items():
        typer.echo(f"  {split:5s} examples {counts['examples']:7d}  positives {counts['positives']:6d}  "
                   f"negatives {counts['negatives']:6d}  ({counts['positives_per_cell']} per cell, "
                   f"from {counts['sentences']} sentences)")


@data_app.command("stats")
def data_stats_command(
    task: TaskOption,
    refs: RefsOption = None,
    instances: InstancesOption = None,
    images: ImagesOption = None,
    vsr: VsrOption = None,
    rcm: RcmOption = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="train | val | test (repeatable; default all)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per split: examples, images (existence checked, not decoded), missing images, per-category counts."""
    from probing.data.stats import data_stats

    stats = data_stats(_data_options(task, refs, instances, images, vsr, rcm), split)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))  # keeps cells in row-major order
        return
    _print_stats(stats)


def _print_stats(stats: dict[str, Any]) -> None:
    typer.echo(f"task {stats['task']}")
    for split, values in stats["splits"].items():
        typer.echo(f"  {split:5s} examples {values['examples']:7d}  images {values['images']:6d}  "
                   f"missing images {values['missing_images']:6d}")
        if values.get("first_missing_image"):
            typer.echo(f"        first missing: {values['first_missing_image']}")
        for category, count in values["categories"].items():
            shown = count if isinstance(count, int) else ", ".join(f"{k} {v}" for k, v in count.items())
            typer.echo(f"        {category:22s} {shown}")


@app.command("extract")
def extract_command(
    model: Annotated[str, typer.Option("--model", help="blip2 | blip2-coco | instructblip, a Hub id, a local "
                                                        "checkpoint folder, or a LAVIS .pth file")],
    task: TaskOption,
    split: Annotated[str, typer.Option("--split", help="train | val | test")],
    out: Annotated[Path, typer.Option("--out", help="Feature store folder (resumed if it holds this request)")],
    refs: RefsOption = None,
    instances: InstancesOption = None,
    images: ImagesOption = None,
    vsr: VsrOption = None,
    rcm: RcmOption = None,
    layers: Annotated[str, typer.Option(help="all | comma-separated Q-Former layers, e.g. 1,6,12 (0 = the "
                                             "constant embedding output)")] = "all",
    shard_size: Annotated[int, typer.Option(help="Examples per shard (the unit of resumption).")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Images and texts per forward pass.")] = 64,
    init: Annotated[str, typer.Option(help="pretrained | random (same architecture, seeded random weights: "
                                           "the control baseline)")] = "pretrained",
    store_vision: Annotated[bool, typer.Option(help="Also store per-image ViT outputs for unfrozen training.")]
    = False,
    dtype: Annotated[str, typer.Option(help="Storage dtype of the query states: float16 | bfloat16 | float32.")]
    = "float16",
    vision_dtype: Annotated[str | None, typer.Option(help="ViT compute dtype (default bfloat16 on GPU, float32 "
                                                          "on CPU).")] = None,
    qformer_dtype: Annotated[str, typer.Option(help="Q-Former compute dtype.")] = "float32",
    compile_vision: Annotated[bool, typer.Option(help="Compile the ViT with torch.compile (fused kernels; the "
                                                      "first batches wait for the compiler).")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")] = None,
    family: Annotated[str | None, typer.Option(help="blip2 | instructblip (for a LAVIS .pth).")] = None,
    base: Annotated[str | None, typer.Option(help="For a LAVIS .pth: where the config, tokenizer and image "
                                                  "processor come from (default: the family's Hub id).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --init random.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Image decoding processes (default: cores - 2, 1..16).")]
    = None,
    skip_bad_images: Annotated[bool, typer.Option(help="Record missing or corrupt images in the manifest and "
                                                       "leave their examples out, instead of stopping.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: accelerate's choice).")]
    = None,
) -> None:
    """Store per-layer Q-Former query outputs of one split (sharded safetensors, resumable)."""
    from probing.extract import ExtractionRequest, extract

    store = extract(ExtractionRequest(
        model=model, data=_data_options(task, refs, instances, images, vsr, rcm), split=split, out=out,
        layers=layers, shard_size=shard_size, batch_size=batch_size, init=init, store_vision=store_vision,
        dtype=dtype, vision_dtype=vision_dtype, qformer_dtype=qformer_dtype, compile_vision=compile_vision,
        revision=revision, family=family, base=base, seed=seed, workers=workers, skip_bad_images=skip_bad_images,
        device=device,
    ))
    bad = len(store.manifest["bad_images"])
    typer.echo(f"features: {out} ({len(store)} examples, layers {store.layers}"
               + (f", {bad} bad images skipped" if bad else "") + ")")


@app.command("train")
def train_command(
    task: TaskOption,
    layer: Annotated[int, typer.Option("--layer", help="Q-Former layer to probe (1..12 for the real models).")],
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")],
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs (the best epoch by val is kept).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    mode: Annotated[str, typer.Option(help="frozen (probe on stored features) | unfrozen (Q-Former + probe).")]
    = "frozen",
    features: Annotated[Path | None, typer.Option(help="Folder with train/ val/ test/ feature stores (frozen); "
                                                      "for unfrozen, optional stores with --store-vision.")] = None,
    probe: ProbeOption = "linear",
    hidden: HiddenOption = 768,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (initialisation); mean and std are reported.")]
    = "0",
    giou_scale: Annotated[float, typer.Option(help="RefCOCOg: weight of the GIoU loss.")] = 1.0,
    l1_scale: Annotated[float, typer.Option(help="RefCOCOg: weight of the L1 loss.")] = 1.0,
    patience: PatienceOption = None,
    batch_size: BatchSizeOption = 128,
    order_seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    model: ModelOption = None,
    init: InitOption = "pretrained",
    revision: RevisionOption = None,
    refs: RefsOption = None,
    instances: InstancesOption = None,
    images: ImagesOption = None,
    vsr: VsrOption = None,
    rcm: RcmOption = None,
    workers: WorkersOption = 0,
    device: DeviceOption = None,
) -> None:
    """Train a probe on one layer (frozen on stored features, or unfrozen with the Q-Former); val + test."""
    from probing.runs import TrainRequest, run_training
    from probing.train import TrainSettings, Trial

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ProbingError(f"--seeds: '{seeds}' is not a comma-separated list of integers") from None
    if not seed_list:
        raise ProbingError("--seeds: no seed given")
    data = _optional_data_options(task, refs, instances, images, vsr, rcm)
    settings = TrainSettings(task=task, probe=probe, hidden=hidden, batch_size=batch_size, order_seed=order_seed,
                             patience=_patience(task, patience), device=device)
    trials = tuple(Trial(lr=lr, epochs=epochs, seed=s, giou_scale=giou_scale, l1_scale=l1_scale) for s in seed_list)
    metrics = run_training(TrainRequest(task=task, mode=mode, layer=layer, out=out, trials=trials, settings=settings,
                                        features=features, data=data, model=model, init=init, revision=revision,
                                        workers=workers))
    if not metrics.get("main_process", True):
        return  # another process of the launch wrote the run and reports it
    verb = "already there" if metrics["reused"] else "written"
    name = metrics["metric"]
    typer.echo(f"run {verb}: {out}")
    for split in ("val", "test"):
        value = metrics["summary"][split][name]
        spread = f" +- {value['std']:.4f}" if value["std"] is not None else ""
        typer.echo(f"  {split:4s} {name} {value['mean']:.4f}{spread} ({value['seeds']} seed(s))")


@app.command("search")
def search_command(
    task: TaskOption,
    layer: Annotated[int, typer.Option("--layer", help="Q-Former layer to probe.")],
    out: Annotated[Path, typer.Option("--out", help="Search folder to write (summary, trials, plots, best/).")],
    mode: Annotated[str, typer.Option(help="frozen | unfrozen")] = "frozen",
    features: Annotated[Path | None, typer.Option(help="Folder with train/ val/ test/ feature stores.")] = None,
    probe: ProbeOption = "linear",
    hidden: HiddenOption = 768,
    trials: Annotated[int, typer.Option(help="Trials to finish (shared by every worker of a study).")] = 10,
    batch: Annotated[int, typer.Option(help="Frozen: trials trained together in one pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of every trial's probe.")] = 0,
    storage: Annotated[str | None, typer.Option(help="sqlite:///file.db | postgresql://... | journal:PATH "
                                                     "(default: in memory).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study to create or resume in --storage.")] = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between a running trial's heartbeats; a trial silent "
                                                  "for 4x as long is retried.")] = 30.0,
    lr_range: Annotated[str | None, typer.Option(help="low,high of the log-uniform lr (default 1e-5,5e-4).")]
    = None,
    epochs: Annotated[str | None, typer.Option(help="Comma-separated epoch choices (default: the paper's).")]
    = None,
    patience: PatienceOption = None,
    batch_size: BatchSizeOption = 128,
    model: ModelOption = None,
    init: InitOption = "pretrained",
    revision: RevisionOption = None,
    refs: RefsOption = None,
    instances: InstancesOption = None,
    images: ImagesOption = None,
    vsr: VsrOption = None,
    rcm: RcmOption = None,
    workers: WorkersOption = 0,
    device: DeviceOption = None,
) -> None:
    """Optuna (TPE) search of lr, epochs and loss scales; the best trial is evaluated on test."""
    from dataclasses import replace

    from probing.search import SearchRequest, default_space, run_search
    from probing.train import TrainSettings

    space = default_space(task) if task in ("refcocog", "vsr", "rcm") else None
    if space is None:
        raise ProbingError(f"--task: unknown task '{task}' (choose refcocog, vsr, rcm)")
    if lr_range is not None:
        space = replace(space, lr=_numbers(lr_range, "--lr-range", float, 2))
    if epochs is not None:
        space = replace(space, epochs=_numbers(epochs, "--epochs", int))
    settings = TrainSettings(task=task, probe=probe, hidden=hidden, batch_size=batch_size, order_seed=seed,
                             patience=_patience(task, patience), device=device)
    outcome = run_search(SearchRequest(
        task=task, mode=mode, layer=layer, out=out, settings=settings, space=space, trials=trials, batch=batch,
        seed=seed, storage=storage, study_name=study_name, heartbeat=heartbeat, features=features,
        data=_optional_data_options(task, refs, instances, images, vsr, rcm), model=model, init=init,
        revision=revision, workers=workers))
    best = outcome.summary["best"]
    metric = outcome.summary["metric"]
    typer.echo(f"search {'already there' if outcome.reused else 'written'}: {out} "
               f"({outcome.summary['trials_complete']} trials)")
    typer.echo(f"  best trial {best['number']}: {json.dumps(best['params'], sort_keys=True)}")
    typer.echo(f"  val {metric} {best['val'][metric]:.4f}   test {metric} {best['test'][metric]:.4f}")


def _numbers(text: str, option: str, kind, count: int | None = None) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ProbingError(f"{option}: '{text}' is not a comma-separated list of numbers") from None
    if not values or (count is not None and len(values) != count):
        raise ProbingError(f"{option}: expected {count or 'some'} comma-separated numbers, got '{text}'")
    return values


@app.command("analyze")
def analyze_command(
    run: Annotated[Path, typer.Argument(help="A run folder (probing train) or a search folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Test accuracy with a 95% bootstrap CI, per category, and Kendall correlations (RefCOCOg, RCM)."""
    from probing.analysis import analyse, load_run
    from probing.report import analysis_json, cell

    if as_json:
        typer.echo(analysis_json(run))
        return
    loaded = load_run(run)
    result = analyse(loaded)
    test = result["test"]
    typer.echo(f"{result['model']} {result['mode']} {result['task']} layer {result['layer']} {result['probe']}: "
               f"test {result['metric']} {100 * test['mean']:.1f}% [{100 * test['ci_low']:.1f}, "
               f"{100 * test['ci_high']:.1f}] ({test['seeds']} seed(s), {test['examples']} examples)")
    from probing.analysis import per_category

    for category, estimate in per_category(loaded).items():
        typer.echo(f"  {category:22s} {cell(estimate)}")
    for name, values in result.get("kendall", {}).items():
        tau = "undefined" if values["tau"] is None else f"{values['tau']:+.2f} (p {values['p_value']:.3f})"
        typer.echo(f"  Kendall tau vs {name}: {tau}{'' if values['significant'] else ' not significant'}")


@app.command("plot")
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or search folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the figures (PNG + SVG).")],
) -> None:
    """Per-layer curves and per-category bars (frozen vs unfrozen) from run folders."""
    from probing.analysis import deduplicate, load_run
    from probing.plots import category_figure, per_layer_figure
    from probing.report import find_runs

    loaded, _ = deduplicate([load_run(path) for path in find_runs(runs)])
    written = []
    for task in ("vsr", "refcocog", "rcm"):
        written += per_layer_figure(loaded, task, out / f"per_layer_{task}")
        written += category_figure(loaded, task, out / f"categories_{task}")
    typer.echo(f"{len(written)} figure files in {out}")


@app.command("report")
def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or search folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (README.md, tables/, figures/).")],
    compare_paper: Annotated[bool, typer.Option(help="Show the paper's Table 1 numbers beside ours.")] = False,
) -> None:
    """Tables in the shapes of the paper's Tables 1, 2, 3, 5 (with CIs), per-layer table, figures, README."""
    from probing.report import write_report

    written = write_report(runs, out, compare_paper=compare_paper)
    typer.echo(f"report of {written['runs']} run(s): {written['readme']} "
               f"({len(written['tables']) // 2} tables, {len(written['figures']) // 2} figures)")


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="An experiment config (experiments/*.yaml).")],
) -> None:
    """Run every stage of an experiment config in order, reusing what matches, and write its report."""
    from probing.pipeline import describe, run_config_file

    loaded, summary = run_config_file(config, say=typer.echo)
    for line in describe(summary):
        typer.echo(f"  {line}")
    typer.echo(f"report: {summary.report / 'README.md'}")


@app.command("demo")
def demo_command(
    out: Annotated[Path | None, typer.Option(help="Workspace for the demo (default reports/demo).")] = None,
    refcocog_images: Annotated[int | None, typer.Option(help="Demo RefCOCOg images (fewer: a quicker check).")]
    = None,
    vsr_images: Annotated[int | None, typer.Option(help="Demo VSR images.")] = None,
) -> None:
    """The embedded default: the whole pipeline on synthetic shapes with tiny random models (CPU, no network)."""
    import time

    from probing.demo import run_demo
    from probing.pipeline import describe

    started = time.perf_counter()
    config, summary = run_demo(out, say=typer.echo, refcocog_images=refcocog_images, vsr_images=vsr_images)
    typer.echo("")
    typer.echo((summary.report / "tables" / "table1.md").read_text().rstrip())
    typer.echo("")
    for line in describe(summary):
        typer.echo(f"  {line}")
    typer.echo(f"Tiny random models on synthetic shapes: a check of the machinery and of the frozen-vs-unfrozen "
               f"contrast, not the paper's numbers. Done in {time.perf_counter() - started:.0f} s.")
    typer.echo(f"report: {summary.report / 'README.md'} (tables/, figures/)")


# ------------------------------------------------------------------ entry point

def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("probing")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the typer app, turning ProbingError into one line and exit status 2."""
    global _VERBOSE
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    _VERBOSE = any(flag in ("--verbose", "-v") for flag in args[:cut])
    # --verbose is accepted anywhere on the line, not only before the command.
    args = [a for i, a in enumerate(args) if i >= cut or a not in ("--verbose", "-v")]
    _configure_logging(_VERBOSE)
    try:
        app(args=args, prog_name="probing")
    except ProbingError as error:
        if _VERBOSE:
            traceback.print_exc()
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
