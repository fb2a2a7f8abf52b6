"""The `probing` command line: a thin typer layer over the typed stage functions.

No logic lives here: each command parses options, builds its request and calls one function. The options of
`extract`, `train` and `search` are derived from the request dataclasses' declarations (`probing.settings`),
so an option exists exactly where its setting does. User errors (`ProbingError`) are printed as one line on
stderr with exit status 2; `--verbose` (anywhere on the line) adds the traceback. Other exceptions are bugs:
traceback and exit status 1.
"""

from __future__ import annotations

import json
import logging
import os
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

TaskOption = Annotated[str, typer.Option("--task", help="A registered task (`probing tasks`) or a task YAML file.")]


def _parameter(name: str, kind: Any, default: Any = ..., **option: Any):
    """One explicit command parameter (the ones not declared on a request dataclass)."""
    import inspect

    flag = option.pop("flag", "--" + name.replace("_", "-"))
    info = typer.Argument(**option) if option.pop("argument", False) else typer.Option(flag, **option)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if default is ... else default,
        annotation=Annotated[kind, info],
    )


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logging.")] = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Trust the disk: read feature stores without checking their shards' SHA-256 "
            "(before the command: `probing --no-verify run ...`).",
        ),
    ] = False,
) -> None:
    """Probe whether a resampler's query outputs still encode where things are."""
    if no_verify:
        from probing.features import NO_VERIFY_VARIABLE

        # The environment, not a module global: the processes a command launches (accelerate) inherit it.
        os.environ[NO_VERIFY_VARIABLE] = "1"


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
    result = make_demo_data(
        out, seed=seed, refcocog_images=refcocog_images, vsr_images=vsr_images, vsr_version=vsr_version
    )
    manifest = result.value
    typer.echo(f"demo dataset {'already there' if result.reused else 'written'}: {out}")
    for split, counts in manifest["refcocog"].items():
        typer.echo(
            f"  refcocog {split:5s} images {counts['images']:5d}  refs {counts['refs']:5d}  "
            f"sentences {counts['sentences']:5d}"
        )
    for split, counts in manifest["vsr"].items():
        typer.echo(f"  vsr      {split:5s} examples {counts['examples']:5d}  true {counts['true']:5d}")
    options = demo_data_options(out)
    typer.echo("data options:")
    typer.echo(
        f"  refcocog: --refs '{options['refcocog']['refs']}' --instances {options['refcocog']['instances']} "
        f"--images {options['refcocog']['images']}"
    )
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

    result = build_rcm(refs, instances, out, seed=seed)
    typer.echo(f"RCM {'already there' if result.reused else 'written'}: {out}")
    for split, counts in result.value["splits"].items():
        typer.echo(
            f"  {split:5s} examples {counts['examples']:7d}  positives {counts['positives']:6d}  "
            f"negatives {counts['negatives']:6d}  ({counts['positives_per_cell']} per cell, "
            f"from {counts['sentences']} sentences)"
        )


@app.command("tasks")
def tasks_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    task: Annotated[list[str] | None, typer.Option("--task", help="Also a task YAML file (repeatable).")] = None,
) -> None:
    """Every registered task: its splits, head, main metric and the data options it reads."""
    from probing.tasks import get_task, registered_tasks

    for reference in task or []:
        get_task(reference)
    described = [spec.describe() for spec in registered_tasks()]
    if as_json:
        typer.echo(json.dumps({"tasks": described}, indent=2))
        return
    for item in described:
        options = " ".join(f"--{name}" for name in item["data_options"]) or f"(from {item['source']})"
        typer.echo(
            f"{item['name']:16s} {item['head']:6s} {item['metric']:9s} splits {','.join(item['splits']):22s} "
            f"data {options}"
        )


@app.command("models")
def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Every registered model family at its published size: layers, latents x width, parameters (no download)."""
    from probing.models.catalog import describe_families

    described = describe_families()
    if as_json:
        typer.echo(json.dumps({"families": described}, indent=2))
        return
    for item in described:
        shape = (
            f"{item['layers']:2d} layers  {item['latents']:4d} x {item['width']:<5d} latents  "
            f"vision {item['vision_parameters'] / 1e6:7.1f}M  {item['layer_owner']} "
            f"{item['resampler_parameters'] / 1e6:6.1f}M"
            if "latents" in item
            else "(no real-size config declared)"
        )
        text = "reads text" if item["reads_text"] else "image only"
        hub = ", ".join(item["aliases"].values()) or "-"
        typer.echo(f"{item['name']:19s} {shape}  {text:10s}  {hub}")


def _data_stats(**values: Any) -> None:
    from probing.data.types import DataOptions
    from probing.settings import from_cli
    from probing.tasks.stats import data_stats

    stats = data_stats(from_cli(DataOptions, values), values["split"])
    if values["as_json"]:
        typer.echo(json.dumps(stats, indent=2))  # keeps cells in row-major order
        return
    typer.echo(f"task {stats['task']}")
    for split, numbers in stats["splits"].items():
        typer.echo(
            f"  {split:5s} examples {numbers['examples']:7d}  images {numbers['images']:6d}  "
            f"missing images {numbers['missing_images']:6d}"
        )
        if numbers.get("first_missing_image"):
            typer.echo(f"        first missing: {numbers['first_missing_image']}")
        for category, count in numbers["categories"].items():
            shown = count if isinstance(count, int) else ", ".join(f"{k} {v}" for k, v in count.items())
            typer.echo(f"        {category:22s} {shown}")


def _extract(**values: Any) -> None:
    from probing.extract import ExtractionRequest, extract
    from probing.settings import from_cli

    request = from_cli(ExtractionRequest, values)
    store = extract(request).value
    bad = len(store.manifest["bad_images"])
    typer.echo(
        f"features: {values['out']} ({len(store)} examples, layers {store.layers}"
        + (f", {bad} bad images skipped" if bad else "")
        + ")"
    )


def _train(**values: Any) -> None:
    from dataclasses import replace

    from probing.probe_run import TrainRequest, run_training
    from probing.settings import check_as, comma_separated, from_cli
    from probing.train import Trial

    seeds = comma_separated(int, what="integers")(values["seeds"], "--seeds")
    for seed in seeds:
        check_as(Trial, "seed", seed, "--seeds")
    trial = from_cli(Trial, values)  # the hyper-parameters, once per seed
    request = from_cli(TrainRequest, values, trials=tuple(replace(trial, seed=seed) for seed in seeds))
    result = run_training(request)
    if result.status == "elsewhere":
        return  # another process of the launch wrote the run and reports it
    record = result.value
    typer.echo(f"run {'already there' if result.reused else 'written'}: {values['out']}")
    summary = record.summary
    for split in record.splits:
        value = summary[split][record.metric]
        spread = f" +- {value['std']:.4f}" if value["std"] is not None else ""
        typer.echo(f"  {split:4s} {record.metric} {value['mean']:.4f}{spread} ({value['seeds']} seed(s))")


def _search(**values: Any) -> None:
    from probing.search import SearchRequest, default_space, run_search
    from probing.search_space import SearchSpace
    from probing.settings import declared, from_cli

    task = values["task"]
    given = [field.name for field, _ in declared(SearchSpace) if values.get(field.name) is not None]
    parsed = from_cli(SearchSpace, {name: values[name] for name in given})  # the options' text, checked
    space = default_space(task, values["probe"]).overridden({name: getattr(parsed, name) for name in given}, None)
    # a search's batch order is its seed
    request = from_cli(SearchRequest, values | {"order_seed": values["seed"]}, space=space)
    result = run_search(request)
    summary = result.value
    best, metric = summary.best, summary.metric
    typer.echo(
        f"search {'already there' if result.reused else 'written'}: {values['out']} ({summary.trials_complete} trials"
        + (", control task)" if request.control else ")")
    )
    typer.echo(f"  best trial {best['number']}: {json.dumps(best['params'], sort_keys=True)}")
    evaluated = "   ".join(
        f"{split} {metric} {best[split][metric]:.4f}"
        for split in best
        if isinstance(best[split], dict) and metric in best[split]
    )
    typer.echo(f"  {evaluated}")


def _zeroshot(**values: Any) -> None:
    from probing.settings import from_cli
    from probing.zeroshot import ZeroShotRequest, run_zeroshot

    result = run_zeroshot(from_cli(ZeroShotRequest, values))
    record = result.value
    typer.echo(f"zero-shot run {'already there' if result.reused else 'written'}: {values['out']}")
    for split in record.splits:
        typer.echo(f"  {split:4s} {record.metric} {record.summary[split][record.metric]['mean']:.4f}")


def _mdl(**values: Any) -> None:
    from probing.mdl import MdlRequest, run_mdl
    from probing.records import SearchSummary
    from probing.settings import check_as, from_cli
    from probing.tasks import get_task
    from probing.train import Trial

    check_as(Trial, "seed", values["seed"], "--seed")
    search = values.pop("from_search")
    if search is not None:  # the hyper-parameters of a search's best trial
        if values["lr"] is not None or values["epochs"] is not None:
            raise ProbingError("--from-search: give it or --lr and --epochs, not both")
        summary = SearchSummary.read(search)
        asked = (get_task(values["task"]).name, values["layer"], values["probe"])
        if (summary.task, summary.layer, summary.probe) != asked:
            raise ProbingError(
                f"--from-search: {search} searched {summary.task} layer {summary.layer} {summary.probe}, "
                f"not {asked[0]} layer {asked[1]} {asked[2]}"
            )
        params = summary.best["params"]
        if "lr" not in params:
            raise ProbingError(f"--from-search: {search} found no learning rate (a {summary.probe} search)")
        values |= {
            "lr": params["lr"],
            "epochs": params["epochs"],
            **{name: params[name] for name in ("giou_scale", "l1_scale") if name in params},
        }
    request = from_cli(MdlRequest, values)
    result = run_mdl(request)
    record = result.value
    typer.echo(f"mdl {'already there' if result.reused else 'written'}: {values['out']}")
    typer.echo(
        f"  {record.task}{' (control task)' if record.control else ''} layer {record.layer}: online codelength "
        f"{record.online_bits / 1000:.2f} kbits, uniform {record.uniform_bits / 1000:.2f} kbits, "
        f"compression {record.compression:.2f} ({record.examples} train examples, {len(record.ends)} blocks)"
    )


def _register_derived_commands() -> None:
    """extract, train, search, zeroshot and data stats: their options derived from the request declarations."""
    from probing.data.types import DataOptions
    from probing.extract import ExtractionRequest
    from probing.models import ModelSource
    from probing.probe_run import ProbeInputs
    from probing.search import SearchSettings
    from probing.search_space import SearchSpace
    from probing.settings import cli_parameters, command
    from probing.train import TrainSettings, Trial
    from probing.zeroshot import ZeroShotSettings

    task = _parameter("task", str, help="A registered task (`probing tasks`) or a task YAML file.")
    data = cli_parameters(DataOptions)
    command(
        data_app,
        "stats",
        [
            task,
            *data,
            _parameter("split", list[str] | None, None, help="train | val | test ... (repeatable; default all)"),
            _parameter("as_json", bool, False, flag="--json", help="Print one JSON object."),
        ],
        _data_stats,
        "Per split: examples, images (existence checked, not decoded), missing images, per-category counts.",
    )
    command(
        app,
        "extract",
        [
            task,
            *data,
            *cli_parameters(ExtractionRequest),  # the model source, the extraction settings and the store's label
            _parameter("split", str, help="A split of the task: train | val | test ..."),
            _parameter("out", Path, help="Feature store folder (resumed if it holds this request)"),
        ],
        _extract,
        "Store per-layer query outputs of one split (sharded safetensors, resumable).",
    )
    run_options = [
        task,
        *data,
        _parameter("layer", int, help="Q-Former layer to probe (1..12 for the real models)."),
        *cli_parameters(ProbeInputs),
        *cli_parameters(ModelSource, optional=["model"]),
    ]
    command(
        app,
        "train",
        [
            *run_options,
            *cli_parameters(TrainSettings),
            *cli_parameters(Trial),
            _parameter("seeds", str, "0", help="Comma-separated seeds (initialisation); mean and std are reported."),
            _parameter("out", Path, help="Run folder to write."),
        ],
        _train,
        "Train a probe on one layer (frozen on stored features, or unfrozen with the resampler); val and "
        "the task's evaluated splits.",
    )
    command(
        app,
        "search",
        [
            *run_options,
            *cli_parameters(TrainSettings, exclude=["order_seed"]),
            *cli_parameters(SearchSettings),
            *cli_parameters(SearchSpace, optional=["lr", "epochs"]),
            _parameter("out", Path, help="Search folder to write (summary, trials, plots, best/)."),
        ],
        _search,
        "Optuna (TPE) search of the probe's hyper-parameters; the best trial is evaluated on test.",
    )
    command(
        app,
        "zeroshot",
        [
            task,
            *data,
            *cli_parameters(ModelSource, exclude=["init", "init_seed", "base", "fill_from_base"]),
            *cli_parameters(ZeroShotSettings),
            _parameter("out", Path, help="Run folder to write."),
        ],
        _zeroshot,
        "The model answers without a probe (binary tasks): InstructBLIP prompted through its language model, "
        "or BLIP-2's image-text matching head; written as a run folder.",
    )
    from probing.mdl import MdlRequest

    command(
        app,
        "mdl",
        [
            task,
            *data,
            _parameter("layer", int, help="Q-Former layer to probe (1..12 for the real models)."),
            *cli_parameters(MdlRequest),
            *cli_parameters(TrainSettings),
            *cli_parameters(Trial, exclude=["logreg_c"], optional=["lr", "epochs"]),
            _parameter("seed", int, 0, help="Initialisation seed of every prefix's probe."),
            _parameter(
                "from_search", Path | None, None, help="Take lr, epochs and loss scales from this search's best trial."
            ),
            _parameter("out", Path, help="MDL folder to write (mdl.json, manifest.json)."),
        ],
        _mdl,
        "MDL by the online code (Voita & Titov, 2020): codelength and compression of the train targets, "
        "prefix probes trained in one batched pass.",
    )


_register_derived_commands()


def _register_annotate() -> None:
    """`probing annotate serve | score | export` (the human baseline), a sub-app of its own module."""
    from probing.annotate.commands import annotate_app

    app.add_typer(annotate_app, name="annotate")


_register_annotate()


@app.command("analyze")
def analyze_command(
    run: Annotated[Path, typer.Argument(help="A run folder (probing train) or a search folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Test accuracy with a 95% bootstrap CI, per category, ROC-AUC (binary tasks), Kendall correlations."""
    from probing.analysis import analyse, load_run, per_category
    from probing.report import analysis_json, cell

    if as_json:
        typer.echo(analysis_json(run))
        return
    loaded = load_run(run)
    result = analyse(loaded)
    test = result["test"]
    typer.echo(
        f"{result['model']} {result['mode']} {result['task']}{' (control task)' if result['control'] else ''} "
        f"layer {result['layer']} {result['probe']}: "
        f"{result['split']} {result['metric']} {100 * test['mean']:.1f}% [{100 * test['ci_low']:.1f}, "
        f"{100 * test['ci_high']:.1f}] ({test['seeds']} seed(s), {test['examples']} examples)"
    )
    if result.get("roc_auc"):
        typer.echo(f"  ROC-AUC {result['roc_auc']['mean']:.3f}")
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
    from probing.report import load_runs, write_figures

    loaded, _ = load_runs(runs)
    written = write_figures(loaded, out)
    typer.echo(f"{len(written)} figure files in {out}")


@app.command("report")
def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or search folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (README.md, tables/, figures/).")],
    compare_paper: Annotated[bool, typer.Option(help="Show the paper's Table 1 numbers beside ours.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an --out folder that holds files no report wrote (whole).")
    ] = False,
) -> None:
    """Tables in the shapes of the paper's Tables 1, 2, 3, 4, 5 (with CIs), per-layer table, figures, README."""
    from probing.report import write_report

    written = write_report(runs, out, compare_paper=compare_paper, overwrite=overwrite)
    typer.echo(
        f"report of {written['runs']} run(s): {written['readme']} "
        f"({len(written['tables']) // 3} tables, {len({Path(p).stem for p in written['figures']})} figures)"
    )


@app.command("dashboard")
def dashboard_command(
    paths: Annotated[list[Path], typer.Argument(help="A workspace, search folders or study.log files.")],
    storage: Annotated[
        list[str] | None, typer.Option(help="Also the studies of a shared storage (repeatable).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """optuna-dashboard on every study of a workspace (a snapshot: per-epoch values, parameters, what trains)."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ProbingError(
            "probing dashboard: optuna-dashboard is not installed (pip install -e '.[dashboard]')"
        ) from None
    from probing.studies import gather_studies

    gathered = gather_studies(paths, storage or [])
    typer.echo(f"optuna-dashboard on {len(gathered.get_all_studies())} studies: http://{host}:{port}/")
    run_server(gathered, host=host, port=port)


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
    refcocog_images: Annotated[int | None, typer.Option(help="Demo RefCOCOg images (fewer: a quicker check).")] = None,
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
    typer.echo(
        f"Tiny random models on synthetic shapes: a check of the machinery and of the frozen-vs-unfrozen "
        f"contrast, not the paper's numbers. Done in {time.perf_counter() - started:.0f} s."
    )
    typer.echo(f"report: {summary.report / 'README.md'} (tables/, figures/)")


# ------------------------------------------------------------------ entry point


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to whatever `sys.stderr` is when it is logged, not to the stream of the first call: a
    stage called in-process after the command returned (a notebook, a test that swapped stderr) would otherwise
    write to a stream that may be closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    handler = _CurrentStderrHandler()
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
        from probing.plugins import load_plugins

        load_plugins()  # tasks, backends, probes and tables registered outside the package
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
