"""The `probing` command line: a thin typer layer over the typed stage functions.

No logic lives here: each command parses options, builds its request and calls one function. The options of
`extract`, `train`, `search`, `zeroshot`, `mdl` and `data stats` are derived from the request dataclasses'
declarations (`probing.core.settings`), so an option exists exactly where its setting does. User errors
(`ProbingError`) are printed as one line on stderr with exit status 2; `--verbose` (anywhere on the line) adds the
traceback. Other exceptions are bugs: traceback and exit status 1.

Importing this module imports neither torch nor transformers: `probing --help` lists every command from its name
and one-line help, and a command's stage modules (and with them torch) are imported only when that command is run
or its own `--help` is asked for (`_LazyCommand`). Keep module-level imports here light.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.core
import typer.main

try:  # recent typer carries its own copy of click: its usage errors are these classes, not the click package's
    from typer._click import exceptions as usage_errors
except ImportError:  # typer releases built on the click package
    from click import exceptions as usage_errors

from probing.core.errors import ProbingError

# The help panels commands and options are grouped into.
DATA_PANEL = "Data"
STAGES_PANEL = "Stages"
RESULTS_PANEL = "Results"
PIPELINE_PANEL = "Pipelines"

# Old option spellings that still work, per command: each prints a one-line warning naming the new spelling.
DEPRECATED_OPTIONS: dict[str, dict[str, str]] = {
    "search": {"--batch": "--trials-per-batch", "--epochs": "--epoch-choices"},
}


class _LazyCommand(click.Command):
    """A command that `probing --help` lists by its name, one-line help and panel alone; `build()` makes the real
    command (importing its stage modules) only when it is run or its own help is asked for."""

    def __init__(self, name: str, help_text: str, panel: str, build: Callable[[], click.Command]) -> None:
        super().__init__(name, help=help_text)
        self.rich_help_panel = panel
        self.build = build


class _ProbingGroup(typer.core.TyperGroup):
    """The root group: builds a lazy command when it is resolved, and rewrites deprecated option spellings."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, (help_text, panel, build) in _LAZY_COMMANDS.items():
            self.commands[name] = _LazyCommand(name, help_text, panel, build)
        panels = [DATA_PANEL, STAGES_PANEL, RESULTS_PANEL, PIPELINE_PANEL]  # the order of the panels in the help
        ordered = sorted(self.commands.items(), key=lambda item: panels.index(item[1].rich_help_panel))
        self.commands = dict(ordered)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list]:
        name, command_, rest = super().resolve_command(ctx, args)
        if isinstance(command_, _LazyCommand):
            command_ = self.commands[name] = command_.build()
        return name, command_, _replace_deprecated(name, rest)


def _replace_deprecated(command_name: str | None, args: list[str]) -> list[str]:
    """`args` with each deprecated option spelling of the command replaced by its current one (a warning each)."""
    renamed = DEPRECATED_OPTIONS.get(command_name or "", {})
    replaced = []
    for index, arg in enumerate(args):
        if arg == "--":
            return replaced + args[index:]
        flag, equals, value = arg.partition("=")
        if flag in renamed:
            print(f"warning: {command_name} {flag} is deprecated, use {renamed[flag]}", file=sys.stderr)
            arg = renamed[flag] + equals + value
        replaced.append(arg)
    return replaced


# name -> (one-line help, panel, builder) of the commands built on demand (registered below).
_LAZY_COMMANDS: dict[str, tuple[str, str, Callable[[], click.Command]]] = {}

app = typer.Typer(
    name="probing",
    cls=_ProbingGroup,
    help="Probe whether a vision-and-language resampler (BLIP-2 / InstructBLIP Q-Former) encodes where things are.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_VERBOSE = False


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


def _check_out(values: dict[str, Any], *kinds: str, option: str = "--out") -> None:
    """Refuse an --out the command may not write (`probing.core.artifacts.check_output`), its inputs named: every path
    among the command's other values, and the model when it is a folder."""
    from probing.core.artifacts import check_output

    inputs = [value for name, value in values.items() if name != "out" and isinstance(value, Path)]
    if isinstance(values.get("model"), str) and Path(values["model"]).exists():
        inputs.append(Path(values["model"]))
    check_output(values["out"], kinds, option=option, inputs=tuple(inputs))


def _in_panel(parameters: list, panel: str) -> list:
    """`parameters` (typer options) shown under `panel` in their command's help."""
    for parameter in parameters:
        parameter.annotation.__metadata__[0].rich_help_panel = panel
    return parameters


def _print_version(value: bool) -> None:
    if value:
        from probing.core.artifacts import code_version

        typer.echo(f"probing {code_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logging.")] = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Trust the disk: read feature stores without checking their shards' digests (BLAKE3 per tensor; "
            "SHA-256 per file in older stores) (before the command: `probing --no-verify run ...`).",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Probe whether a resampler's query outputs still encode where things are."""
    if no_verify:
        from probing.store.features import NO_VERIFY_VARIABLE

        # The environment, not a module global: the processes a command launches (accelerate) inherit it.
        os.environ[NO_VERIFY_VARIABLE] = "1"


# ------------------------------------------------------------------ commands


@app.command(
    "make-demo-data",
    rich_help_panel=DATA_PANEL,
    epilog="Example: probing make-demo-data data/demo",
)
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
    _check_out({"out": out}, "demo-data", option="OUT")
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


@app.command(
    "build-rcm",
    rich_help_panel=DATA_PANEL,
    epilog="Example: probing build-rcm --refs 'data/refcocog/refs(umd).p' "
    "--instances data/refcocog/instances.json --out data/rcm",
)
def build_rcm_command(
    refs: Annotated[Path, typer.Option("--refs", help="RefCOCOg: REFER refs(umd).p")],
    instances: Annotated[Path, typer.Option("--instances", help="RefCOCOg: COCO instances.json")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for {train,val,test}.jsonl + manifest.json")],
    seed: Annotated[int, typer.Option(help="Random seed (the build is deterministic for a seed).")] = 0,
) -> None:
    """Build Region Cell Matching (3x3 grid cells) from RefCOCOg umd, balanced per cell, per split."""
    from probing.data.rcm import build_rcm

    _check_out({"out": out, "refs": refs, "instances": instances}, "rcm")
    result = build_rcm(refs, instances, out, seed=seed)
    typer.echo(f"RCM {'already there' if result.reused else 'written'}: {out}")
    for split, counts in result.value["splits"].items():
        typer.echo(
            f"  {split:5s} examples {counts['examples']:7d}  positives {counts['positives']:6d}  "
            f"negatives {counts['negatives']:6d}  ({counts['positives_per_cell']} per cell, "
            f"from {counts['sentences']} sentences)"
        )


@app.command(
    "tasks",
    rich_help_panel=DATA_PANEL,
    epilog="Example: probing tasks --json",
)
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


@app.command(
    "models",
    rich_help_panel=DATA_PANEL,
    epilog="Example: probing models --json",
)
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
    from probing.core.settings import from_cli
    from probing.data.types import DataOptions
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
    from probing.core.settings import from_cli
    from probing.store.extract import ExtractionRequest, extract

    request = from_cli(ExtractionRequest, values)
    _check_out(values, "features")
    store = extract(request).value
    bad = len(store.manifest["bad_images"])
    typer.echo(
        f"features: {values['out']} ({len(store)} examples, layers {store.layers}"
        + (f", {bad} bad images skipped" if bad else "")
        + ")"
    )


def _train(**values: Any) -> None:
    from probing.probes.run import TrainRequest, run_training

    request = TrainRequest.from_options(values)
    _check_out(values, "probe-run")
    result = run_training(request)
    if result.status == "elsewhere":
        return  # another process of the launch wrote the run and reports it
    record = result.value
    typer.echo(f"run {'already there' if result.reused else 'written'}: {request.out}")
    summary = record.summary
    for split in record.splits:
        value = summary[split][record.metric]
        spread = f" +- {value['std']:.4f}" if value["std"] is not None else ""
        typer.echo(f"  {split:4s} {record.metric} {value['mean']:.4f}{spread} ({value['seeds']} seed(s))")
    _echo_single_class(request.out)


def _echo_single_class(folder: Path) -> None:
    """After an accuracy: the note on a probe that answers one class (the reports' mark)."""
    from probing.report.tables import single_class_note

    note = single_class_note(folder)
    if note is not None:
        typer.echo(note)


def _search(**values: Any) -> None:
    from probing.studies.search import SearchRequest, run_search

    request = SearchRequest.from_options(values)
    _check_out(values, "search")
    result = run_search(request)
    summary = result.value
    best, metric = summary.best, summary.metric
    typer.echo(
        f"search {'already there' if result.reused else 'written'}: {request.out} ({summary.trials_complete} trials"
        + (", control task)" if request.control else ")")
    )
    typer.echo(f"  best trial {best['number']}: {json.dumps(best['params'], sort_keys=True)}")
    evaluated = "   ".join(
        f"{split} {metric} {best[split][metric]:.4f}"
        for split in best
        if isinstance(best[split], dict) and metric in best[split]
    )
    typer.echo(f"  {evaluated}")
    _echo_single_class(request.out)


def _zeroshot(**values: Any) -> None:
    from probing.baselines.zeroshot import ZeroShotRequest, run_zeroshot
    from probing.core.settings import from_cli

    request = from_cli(ZeroShotRequest, values)
    _check_out(values, "zeroshot-run")
    result = run_zeroshot(request)
    record = result.value
    typer.echo(f"zero-shot run {'already there' if result.reused else 'written'}: {request.out}")
    for split in record.splits:
        typer.echo(f"  {split:4s} {record.metric} {record.summary[split][record.metric]['mean']:.4f}")


def _mdl(**values: Any) -> None:
    from probing.studies.mdl import MdlRequest, run_mdl

    request = MdlRequest.from_options(values)
    _check_out(values, "mdl")
    result = run_mdl(request)
    record = result.value
    typer.echo(f"mdl {'already there' if result.reused else 'written'}: {request.out}")
    typer.echo(
        f"  {record.task}{' (control task)' if record.control else ''} layer {record.layer}: online codelength "
        f"{record.online_bits / 1000:.2f} kbits, uniform {record.uniform_bits / 1000:.2f} kbits, "
        f"compression {record.compression:.2f} ({record.examples} train examples, {len(record.ends)} blocks)"
    )


def _lazy(name: str, help_text: str, panel: str) -> Callable:
    """Register the decorated builder of command `name` (listed with `help_text` under `panel`)."""

    def register(build: Callable[[], click.Command]) -> Callable[[], click.Command]:
        _LAZY_COMMANDS[name] = (help_text, panel, build)
        return build

    return register


def _derived(name: str, parameters: list, body: Callable[..., None], example: str) -> click.Command:
    """The click command `name` with derived `parameters` calling `body`, its help from `_LAZY_COMMANDS`."""
    from probing.core.settings import command

    single = typer.Typer()
    command(single, name, parameters, body, _LAZY_COMMANDS[name][0])
    built = typer.main.get_group(single).commands[name]
    built.epilog = example
    return built


def built_command(name: str) -> click.Command:
    """The click command (or group) `name` of `probing`, built if it is built on demand: for introspection."""
    group = typer.main.get_command(app)
    found = group.commands[name]
    return found.build() if isinstance(found, _LazyCommand) else found


def _task() -> list:
    from probing.core.settings import cli_parameters
    from probing.probes.settings import TaskChoice

    return cli_parameters(TaskChoice)


def _probe_target() -> list:
    """--task and --layer, as `ProbeTarget` declares them (train, search, mdl)."""
    from probing.core.settings import cli_parameters
    from probing.probes.settings import ProbeTarget

    return cli_parameters(ProbeTarget)


def _data_options() -> list:
    from probing.core.settings import cli_parameters
    from probing.data.types import DataOptions

    return _in_panel(cli_parameters(DataOptions), DATA_PANEL)


def _model_options(**selected: Any) -> list:
    from probing.core.settings import cli_parameters
    from probing.models import ModelSource

    return _in_panel(cli_parameters(ModelSource, **selected), "Model")


@_lazy("data", "Inspect datasets before a long run.", DATA_PANEL)
def _build_data_group() -> click.Command:
    data_app = typer.Typer(help=_LAZY_COMMANDS["data"][0], no_args_is_help=True)
    stats = [
        *_task(),
        *_data_options(),
        _parameter("split", list[str] | None, None, help="train | val | test ... (repeatable; default all)"),
        _parameter("as_json", bool, False, flag="--json", help="Print one JSON object."),
    ]
    from probing.core.settings import command

    command(
        data_app,
        "stats",
        stats,
        _data_stats,
        "Per split: examples, images (existence checked, not decoded), missing images, per-category counts.",
    )
    group = typer.main.get_group(data_app)
    group.name = "data"
    group.commands["stats"].epilog = "Example: probing data stats --task vsr --vsr data/vsr --images data/coco --json"
    return group


@_lazy("extract", "Store per-layer query outputs of one split (sharded safetensors, resumable).", STAGES_PANEL)
def _build_extract() -> click.Command:
    from probing.core.settings import cli_parameters
    from probing.store.settings import ExtractionRequest

    parameters = [
        *_task(),
        *_data_options(),
        *cli_parameters(ExtractionRequest),  # the model source, the extraction settings and the store's label
        _parameter("split", str, help="A split of the task: train | val | test ..."),
        _parameter("out", Path, help="Feature store folder (resumed if it holds this request)"),
    ]
    return _derived(
        "extract",
        parameters,
        _extract,
        "Example: probing extract --model blip2 --task vsr --vsr data/vsr --images data/coco --split train "
        "--out features/blip2/vsr/train",
    )


def _probe_run_options() -> list:
    from probing.core.settings import cli_parameters
    from probing.probes.settings import ProbeInputs

    return [
        *_probe_target(),
        *_data_options(),
        *cli_parameters(ProbeInputs),
        *_model_options(optional=["model"]),
    ]


@_lazy(
    "train",
    "Train a probe on one layer (frozen on stored features, or unfrozen with the resampler); val and the task's "
    "evaluated splits.",
    STAGES_PANEL,
)
def _build_train() -> click.Command:
    from probing.core.settings import cli_parameters
    from probing.probes.settings import TrainSettings, Trial

    parameters = [
        *_probe_run_options(),
        *_in_panel(cli_parameters(TrainSettings), "Training"),
        *_in_panel(cli_parameters(Trial), "Hyper-parameters"),
        _parameter("seeds", str, "0", help="Comma-separated seeds (initialisation); mean and std are reported."),
        _parameter("out", Path, help="Run folder to write."),
    ]
    return _derived(
        "train",
        parameters,
        _train,
        "Example: probing train --task vsr --features features/blip2/vsr --layer 12 --lr 1e-4 --epochs 10 "
        "--seeds 0,1,2 --out runs/blip2-vsr-12",
    )


@_lazy(
    "search", "Optuna (TPE) search of the probe's hyper-parameters; the best trial is evaluated on test.", STAGES_PANEL
)
def _build_search() -> click.Command:
    from probing.core.settings import cli_parameters
    from probing.probes.settings import TrainSettings
    from probing.studies.settings import SearchSettings
    from probing.tasks.search_space import SearchSpace

    parameters = [
        *_probe_run_options(),
        *_in_panel(cli_parameters(TrainSettings, exclude=["order_seed"]), "Training"),
        *_in_panel(cli_parameters(SearchSettings), "Search"),
        *_in_panel(cli_parameters(SearchSpace, optional=["lr", "epochs"]), "Search space"),
        _parameter("out", Path, help="Search folder to write (summary, trials, plots, best/)."),
    ]
    return _derived(
        "search",
        parameters,
        _search,
        "Example: probing search --task vsr --features features/blip2/vsr --layer 12 --trials 10 "
        "--trials-per-batch 10 --epoch-choices 3,5,10 --out searches/blip2-vsr-12",
    )


@_lazy(
    "zeroshot",
    "The model answers without a probe (binary tasks): InstructBLIP prompted through its language model, or "
    "BLIP-2's image-text matching head; written as a run folder.",
    STAGES_PANEL,
)
def _build_zeroshot() -> click.Command:
    from probing.baselines.settings import ZeroShotSettings
    from probing.core.settings import cli_parameters

    parameters = [
        *_task(),
        *_data_options(),
        *_model_options(exclude=["init", "init_seed", "base", "fill_from_base"]),
        *cli_parameters(ZeroShotSettings),
        _parameter("out", Path, help="Run folder to write."),
    ]
    return _derived(
        "zeroshot",
        parameters,
        _zeroshot,
        "Example: probing zeroshot --task vsr --vsr data/vsr --images data/coco --model instructblip "
        "--out runs/zeroshot-vsr",
    )


@_lazy(
    "mdl",
    "MDL by the online code (Voita & Titov, 2020): codelength and compression of the train targets, prefix "
    "probes trained in one batched pass.",
    STAGES_PANEL,
)
def _build_mdl() -> click.Command:
    from probing.core.settings import cli_parameters
    from probing.probes.settings import TrainSettings, Trial
    from probing.studies.settings import MdlRequest

    parameters = [
        *_probe_target(),
        *_data_options(),
        *cli_parameters(MdlRequest, exclude=["task", "layer"]),
        *_in_panel(cli_parameters(TrainSettings), "Training"),
        *_in_panel(cli_parameters(Trial, exclude=["logreg_c"], optional=["lr", "epochs"]), "Hyper-parameters"),
        _parameter("seed", int, 0, help="Initialisation seed of every prefix's probe."),
        _parameter(
            "from_search", Path | None, None, help="Take lr, epochs and loss scales from this search's best trial."
        ),
        _parameter("out", Path, help="MDL folder to write (mdl.json, manifest.json)."),
    ]
    return _derived(
        "mdl",
        parameters,
        _mdl,
        "Example: probing mdl --task vsr --features features/blip2/vsr --layer 12 "
        "--from-search searches/blip2-vsr-12 --out mdl/blip2-vsr-12",
    )


@_lazy(
    "annotate",
    "The human baseline: an annotation page for a binary task, its scores (accuracy, Fleiss' kappa) and its answers.",
    RESULTS_PANEL,
)
def _build_annotate() -> click.Command:
    """`probing annotate serve | score | export`, a sub-app of its own module."""
    from probing.baselines.annotate.commands import annotate_app

    group = typer.main.get_group(annotate_app)
    group.name = "annotate"
    return group


@app.command(
    "analyze",
    rich_help_panel=RESULTS_PANEL,
    epilog="Example: probing analyze runs/blip2-vsr-12 --json",
)
def analyze_command(
    run: Annotated[Path, typer.Argument(help="A run folder (probing train) or a search folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Test accuracy with a 95% bootstrap CI, per category, ROC-AUC (binary tasks), Kendall correlations."""
    from probing.report.analysis import analyse, load_run, per_category
    from probing.report.tables import SINGLE_CLASS_NOTE, analysis_json, cell, single_class_mark

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
        f"{100 * test['ci_high']:.1f}]{single_class_mark(loaded)} ({test['seeds']} seed(s), "
        f"{test['examples']} examples)"
    )
    if result.get("roc_auc"):
        typer.echo(f"  ROC-AUC {result['roc_auc']['mean']:.3f}")
    for category, estimate in per_category(loaded).items():
        typer.echo(f"  {category:22s} {cell(estimate, loaded)}")
    for name, values in result.get("kendall", {}).items():
        tau = "undefined" if values["tau"] is None else f"{values['tau']:+.2f} (p {values['p_value']:.3f})"
        typer.echo(f"  Kendall tau vs {name}: {tau}{'' if values['significant'] else ' not significant'}")
    if single_class_mark(loaded):
        typer.echo(SINGLE_CLASS_NOTE)


@app.command(
    "plot",
    rich_help_panel=RESULTS_PANEL,
    epilog="Example: probing plot reports/demo --out figures",
)
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or search folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the figures (PNG + SVG).")],
) -> None:
    """Per-layer curves and per-category bars (frozen vs unfrozen) from run folders."""
    from probing.report.tables import check_named_runs, load_runs, write_figures

    _check_out({"out": out, **{f"run{index}": run for index, run in enumerate(runs)}})  # never into a run folder
    check_named_runs(runs)
    loaded, _ = load_runs(runs)
    written = write_figures(loaded, out)
    typer.echo(f"{len(written)} figure files in {out}")


@app.command(
    "report",
    rich_help_panel=RESULTS_PANEL,
    epilog="Example: probing report reports/demo --out reports/demo-report --compare-paper",
)
def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or search folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (README.md, tables/, figures/).")],
    compare_paper: Annotated[bool, typer.Option(help="Show the paper's Table 1 numbers beside ours.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an --out folder that holds files no report wrote (whole).")
    ] = False,
) -> None:
    """Tables in the shapes of the paper's Tables 1, 2, 3, 4, 5 (with CIs), per-layer table, figures, README."""
    from probing.report.tables import check_named_runs, write_report

    _check_out({"out": out, **{f"run{index}": run for index, run in enumerate(runs)}})
    check_named_runs(runs)
    written = write_report(runs, out, compare_paper=compare_paper, overwrite=overwrite)
    typer.echo(
        f"report of {written['runs']} run(s): {written['readme']} "
        f"({len(written['tables']) // 3} tables, {len({Path(p).stem for p in written['figures']})} figures)"
    )


@app.command(
    "dashboard",
    rich_help_panel=RESULTS_PANEL,
    epilog="Example: probing dashboard reports/demo --port 8080",
)
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
    from probing.studies.storages import gather_studies

    gathered = gather_studies(paths, storage or [])
    typer.echo(f"optuna-dashboard on {len(gathered.get_all_studies())} studies: http://{host}:{port}/")
    run_server(gathered, host=host, port=port)


@app.command(
    "run",
    rich_help_panel=PIPELINE_PANEL,
    epilog="Example: probing run experiments/table1.yaml --set data.vsr=/data/vsr --limit 50 --dry-run",
)
def run_command(
    config: Annotated[Path, typer.Argument(help="An experiment config (experiments/*.yaml).")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE: set a config field (dotted path, a number picks a list entry; the value is YAML), "
            "validated as the file is. Repeatable.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Read only the first N examples of each split (a smoke run, in <workspace>/limit-N; "
            "recorded in every identity).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the steps (reused / to run, sizes) and write nothing.")
    ] = False,
) -> None:
    """Run every stage of an experiment config in order, reusing what matches, and write its report."""
    from probing.runs.config import load_config
    from probing.runs.pipeline import describe, describe_plan, planned_steps, run_config

    loaded = load_config(config, overrides=set_ or [], limit=limit)
    if dry_run:
        for line in describe_plan(planned_steps(loaded)):
            typer.echo(line)
        return
    summary = run_config(loaded, say=typer.echo)
    for line in describe(summary):
        typer.echo(f"  {line}")
    typer.echo(f"report: {summary.report / 'README.md'}")


@app.command(
    "demo",
    rich_help_panel=PIPELINE_PANEL,
    epilog="Example: probing demo --out reports/demo",
)
def demo_command(
    out: Annotated[Path | None, typer.Option(help="Workspace for the demo (default reports/demo).")] = None,
    refcocog_images: Annotated[int | None, typer.Option(help="Demo RefCOCOg images (fewer: a quicker check).")] = None,
    vsr_images: Annotated[int | None, typer.Option(help="Demo VSR images.")] = None,
) -> None:
    """The embedded default: the whole pipeline on synthetic shapes with tiny random models (CPU, no network)."""
    import time

    from probing.runs.demo import run_demo, test_accuracy_lines
    from probing.runs.pipeline import describe

    if out is not None:
        _check_out({"out": out})  # a workspace: never the current folder, a file, a link or another's output
    started = time.perf_counter()
    config, summary = run_demo(out, say=typer.echo, refcocog_images=refcocog_images, vsr_images=vsr_images)
    typer.echo("")
    for line in test_accuracy_lines(summary.report):
        typer.echo(line)
    typer.echo("")
    for line in describe(summary):
        typer.echo(f"  {line}")
    typer.echo("Tiny random models on synthetic shapes: a check of the machinery and of the frozen-vs-unfrozen")
    typer.echo(f"contrast, not the paper's numbers. Done in {time.perf_counter() - started:.0f} s.")
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
    # huggingface_hub logs each failed request before raising; the error it raises is the one line shown
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if verbose else logging.ERROR)


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
        from probing.core.plugins import load_plugins

        load_plugins()  # tasks, backends, probes and tables registered outside the package
        code = app(args=args, prog_name="probing", standalone_mode=False)
    except usage_errors.NoArgsIsHelpError as error:  # `probing` or a group alone: its help, as click shows it
        error.show()
        sys.exit(error.exit_code)
    except usage_errors.UsageError as error:
        print(f"error: {usage_line(error)}", file=sys.stderr)
        sys.exit(2)
    except ProbingError as error:
        if _VERBOSE:
            traceback.print_exc()
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if _VERBOSE:
            traceback.print_exc()
        # a fault, not a bug: what was written before it is whole (every file goes through a rename), so the
        # same command resumes once there is room
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror}; free some space and run the same command again", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:  # typer.Exit(code) and --help's exit, returned when not standalone
        sys.exit(code)


def usage_line(error: usage_errors.UsageError) -> str:
    """typer's usage error as one line naming the option or command, with the nearest spelling when one is close
    (typer's own boxes span several lines and list every option that shares a prefix)."""
    import difflib

    where = f" ({error.ctx.command_path} --help)" if error.ctx is not None else ""
    if isinstance(error, usage_errors.NoSuchOption):
        options = [name for parameter in error.ctx.command.params for name in parameter.opts] if error.ctx else []
        nearest = difflib.get_close_matches(error.option_name, options, n=1, cutoff=0.5)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        return f"{error.option_name}: no such option{hint}{where}"
    return " ".join(error.format_message().split()) + where


if __name__ == "__main__":
    main()
