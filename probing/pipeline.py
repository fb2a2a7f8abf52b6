"""`probing run CONFIG`: every stage of a config in order, each reused when its manifest matches.

    data (or the demo dataset) -> RCM (built when needed) -> models (tiny checkpoints written when asked) ->
    feature stores per model x task x split -> one search per experiment x task x model x mode x layer x probe
    (the mode "zeroshot": one zero-shot run per experiment x task x model, no store, no search) -> the report

Layout under the workspace:

    data/  rcm/  models/tiny-<family>/
    features/<model>/<task>/<layers>/<split>         (<layers>: e.g. layers-12-vision, layers-all)
    runs/<experiment>/<model>/<task>/<mode>/layer<L>-<probe>/     (a search folder; best/ inside)
    runs/<experiment>/<model>/<task>/zeroshot/                    (a zero-shot run folder)
        ...layer<L>-<probe>-control/                    (`controls: true`: the search on the control targets)
        ...layer<L>-<probe>[-control]-mdl/              (`mdl: true`: the online code of the best trial)
    report-<config name>/                            (README.md, tables/, figures/)

A second run with the same config recomputes nothing: every stage reports that it reused its output, and
the summary counts what was built and what was reused.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from probing.config import ZERO_SHOT, Config, Experiment, search_space
from probing.data.rcm import build_rcm
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.data.types import DataOptions
from probing.errors import ProbingError
from probing.extract import ExtractionRequest, extract
from probing.mdl import MdlRequest, run_mdl
from probing.models import ModelSource, qformer_layers
from probing.models.tiny import ensure_checkpoint
from probing.records import NO_PROBE, StageResult
from probing.report import write_report
from probing.search import SearchRequest, SearchSettings, run_search, trial_from
from probing.tasks import TaskSpec, get_task
from probing.train import TrainSettings
from probing.zeroshot import ZeroShotRequest, run_zeroshot


@dataclass(frozen=True)
class Unit:
    """One search: an experiment's task x model x mode x layer x probe (the mode "zeroshot": one zero-shot run,
    on the model's last layer, with no probe)."""

    experiment: Experiment
    task: str  # the task's reference as the config gives it (a name or a YAML file)
    model: str  # the label in config.models
    mode: str
    layer: int
    probe: str
    control: bool = False  # on the task's control targets (`controls: true`)

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)


@dataclass
class RunSummary:
    built: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    searches: list[Path] = field(default_factory=list)
    zeroshot: list[Path] = field(default_factory=list)
    codes: list[Path] = field(default_factory=list)  # online codes (`mdl: true`)
    report: Path | None = None

    def count(self, stage: str, result: StageResult) -> StageResult:
        (self.reused if result.reused else self.built)[stage] += 1
        return result


def _tasks(config: Config) -> dict[str, TaskSpec]:
    return {task: get_task(task) for experiment in config.experiments for task in experiment.tasks}


def _data_options(config: Config, summary: RunSummary, say: Callable[[str], None]) -> dict[str, DataOptions]:
    """Task reference -> the data options its reader needs (the demo dataset and RCM written when asked)."""
    data = config.data
    paths = {name: getattr(data, name) for name in ("images", "refs", "instances", "vsr", "rcm")}
    tasks = _tasks(config)
    if data.demo is not None:
        folder = config.workspace / "data"
        say(f"demo dataset -> {folder}")
        summary.count(
            "data",
            make_demo_data(
                folder, seed=data.demo.seed, refcocog_images=data.demo.refcocog_images, vsr_images=data.demo.vsr_images
            ),
        )
        demo = demo_data_options(folder)
        paths = {**demo["refcocog"], "vsr": demo["vsr"]["vsr"], "rcm": None}
    if paths["rcm"] is None and any("rcm" in spec.reader.options for spec in tasks.values()):
        paths["rcm"] = config.workspace / "rcm"
        say(f"Region Cell Matching -> {paths['rcm']}")
        summary.count("rcm", build_rcm(paths["refs"], paths["instances"], paths["rcm"], seed=data.rcm_seed))
    return {
        task: DataOptions(task=task, **{name: paths[name] for name in spec.reader.options})
        for task, spec in tasks.items()
    }


def _models(config: Config, summary: RunSummary, say: Callable[[str], None]) -> dict[str, ModelSource]:
    """Label -> the model source to load (tiny checkpoints written into the workspace)."""
    sources = {}
    used = {label for experiment in config.experiments for label in experiment.models}
    for label in sorted(used):
        entry = config.models[label]
        source = ModelSource(**{f.name: getattr(entry, f.name) for f in fields(ModelSource)})
        if entry.tiny is not None:
            folder = config.workspace / "models" / f"tiny-{entry.tiny}"
            say(f"tiny random {entry.tiny} checkpoint -> {folder}")
            summary.count("models", ensure_checkpoint(folder, entry.tiny))
            source = replace(source, model=str(folder))
        sources[label] = source
    return sources


def model_depths(sources: dict[str, ModelSource]) -> dict[str, int]:
    """Label -> number of probe-able layers, read from each model's config."""
    return {label: qformer_layers(source) for label, source in sources.items()}


def plan(config: Config, depth: dict[str, int]) -> list[Unit]:
    """Every search the config asks for, with `last` and `all` resolved from the models' depths."""
    units = []
    for index, experiment in enumerate(config.experiments):
        for label in experiment.models:
            if experiment.layers == "last":
                layers = [depth[label]]
            elif experiment.layers == "all":
                layers = list(range(1, depth[label] + 1))
            else:
                layers = experiment.layers
                too_deep = [layer for layer in layers if layer > depth[label]]
                if too_deep:
                    raise ProbingError(
                        f"config field 'experiments[{index}].layers': {label} has layers "
                        f"1..{depth[label]}, not {too_deep[0]}"
                    )
            for task in experiment.tasks:
                for mode in experiment.modes:
                    if mode == ZERO_SHOT:
                        units.append(Unit(experiment, task, label, mode, depth[label], NO_PROBE))
                        continue
                    for layer in layers:
                        for probe in experiment.probes:
                            units.append(Unit(experiment, task, label, mode, layer, probe))
                            if experiment.controls:
                                units.append(Unit(experiment, task, label, mode, layer, probe, control=True))
    return units


def store_layouts(units: list[Unit], depth: dict[str, int]) -> dict[tuple[str, str], tuple[str, list[int], bool]]:
    """(model, examples) -> (a task reference, layers to store, whether to store ViT outputs): what the searches
    need; tasks that share their examples (`TaskSpec.examples_from`) share their stores."""
    needs: dict[tuple[str, str], tuple[str, set[int], bool]] = {}
    for unit in units:
        if unit.mode == ZERO_SHOT:  # the model answers from the images themselves
            continue
        key = (unit.model, unit.spec.examples_name)
        task, layers, vision = needs.get(key, (unit.task, set(), False))
        if unit.mode == "frozen":
            layers = layers | {unit.layer}
        needs[key] = (task, layers, vision or unit.mode == "unfrozen")
    return {key: (task, sorted(layers) or [depth[key[0]]], vision) for key, (task, layers, vision) in needs.items()}


def store_folder(config: Config, model: str, task: str, layers: list[int], vision: bool, depth: int) -> Path:
    name = "layers-all" if layers == list(range(1, depth + 1)) else "layers-" + "-".join(map(str, layers))
    folder = name + ("-vision" if vision else "")
    return config.workspace / "features" / model / get_task(task).examples_name / folder


def parse_store_name(name: str, depth: int) -> tuple[list[int], bool] | None:
    """(layers, has ViT outputs) from a store folder name written by `store_folder`, or None."""
    vision = name.endswith("-vision")
    body = name.removesuffix("-vision").removeprefix("layers-")
    if not name.startswith("layers-"):
        return None
    if body == "all":
        return list(range(1, depth + 1)), vision
    parts = body.split("-")
    return ([int(part) for part in parts], vision) if all(part.isdigit() for part in parts) else None


def covering_store(
    config: Config, model: str, task: str, layers: list[int], vision: bool, depth: int
) -> tuple[list[int], bool]:
    """The layout of an existing store that already holds what is needed (configs sharing a workspace extract
    once: Table 1's last layer with ViT outputs also serves Table 3's frozen probes), else the one asked for."""
    spec = get_task(task)
    root = config.workspace / "features" / model / spec.examples_name
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        parsed = parse_store_name(folder.name, depth)
        if parsed is None or not all((folder / split / "manifest.json").is_file() for split in spec.splits):
            continue
        stored_layers, stored_vision = parsed
        if set(layers) <= set(stored_layers) and (stored_vision or not vision):
            return stored_layers, stored_vision
    return layers, vision


def store_requests(
    config: Config,
    units: list[Unit],
    options: dict[str, DataOptions],
    sources: dict[str, ModelSource],
    depth: dict[str, int],
    progress: bool = True,
) -> dict[tuple[str, str], list[ExtractionRequest]]:
    """(model, examples) -> the extraction of each split into the store the searches need (an existing store that
    covers them is taken instead)."""
    requests = {}
    for (label, examples), (task, *needed) in sorted(store_layouts(units, depth).items()):
        layers, vision = covering_store(config, label, task, *needed, depth[label])
        folder = store_folder(config, label, task, layers, vision, depth[label])
        settings = replace(
            config.extract, layers=tuple(layers), store_vision=vision, device=config.device, progress=progress
        )
        requests[(label, examples)] = [
            ExtractionRequest(
                **vars(sources[label]), **vars(settings), data=options[task], split=split, out=folder / split
            )
            for split in get_task(task).splits
        ]
    return requests


def search_request(
    config: Config, unit: Unit, sources: dict[str, ModelSource], options: dict[str, DataOptions], features: Path
) -> SearchRequest:
    """The search of one unit: the experiment's search settings, the config's train settings for its mode."""
    spec = unit.spec
    out = (
        config.workspace
        / "runs"
        / unit.experiment.name
        / unit.model
        / spec.name
        / unit.mode
        / f"layer{unit.layer}-{unit.probe}{'-control' if unit.control else ''}"
    )
    search, train = unit.experiment.search, config.train
    settings = TrainSettings(
        task=unit.task,
        probe=unit.probe,
        hidden=train.hidden,
        warmup_fraction=train.warmup_fraction,
        weight_decay=train.weight_decay,
        latents=train.latents,
        order_seed=search.seed,
        device=config.device,
        batch_size=train.batch_size if unit.mode == "frozen" else train.unfrozen_batch_size,
        patience=train.patience.get(unit.task, train.patience.get(spec.name)),
    )
    index = config.experiments.index(unit.experiment)
    search_settings = {f.name: getattr(search, f.name) for f in fields(SearchSettings)}
    search_settings["study_name"] = f"{config.name}/{out.relative_to(config.workspace)}" if search.storage else None
    return SearchRequest(
        **search_settings,
        **vars(sources[unit.model]),
        task=unit.task,
        mode=unit.mode,
        layer=unit.layer,
        out=out,
        settings=settings,
        space=search_space(unit.experiment, index, unit.task).for_probe(unit.probe),
        features=features,
        data=options[unit.task],
        workers=config.extract.workers or 0,
        label=unit.model,
        control=unit.control,
        control_seed=unit.experiment.control_seed,
        # unfrozen probes read the texts themselves, as the config's stores were extracted
        **(vars(config.extract.text_settings) if unit.mode == "unfrozen" else {}),
    )


def mdl_request(request: SearchRequest, best_params: dict) -> MdlRequest:
    """The online code of a frozen search's best trial (its first final seed), on the search's own targets."""
    return MdlRequest(
        task=request.task,
        layer=request.layer,
        out=request.out.with_name(request.out.name + "-mdl"),
        settings=request.settings,
        trial=trial_from(best_params, request.seeds_of_best[0]),
        features=request.features,
        shuffle_seed=request.seed,
        label=request.label,
        data=request.data,
        control=request.control,
        control_seed=request.control_seed,
    )


def zeroshot_request(
    config: Config, unit: Unit, sources: dict[str, ModelSource], options: dict[str, DataOptions], progress: bool = True
) -> ZeroShotRequest:
    """The zero-shot run of one unit: the experiment's `zeroshot` settings, the model under its label."""
    spec = unit.spec
    out = config.workspace / "runs" / unit.experiment.name / unit.model / spec.name / ZERO_SHOT
    settings = {f.name: getattr(unit.experiment.zeroshot, f.name) for f in fields(unit.experiment.zeroshot)}
    if settings["workers"] is None:
        settings["workers"] = config.extract.workers
    settings["label"] = settings["label"] or unit.model
    return ZeroShotRequest(
        **vars(sources[unit.model]),
        **settings,
        device=config.device,
        progress=progress,
        data=options[unit.task],
        out=out,
    )


def run_config(config: Config, say: Callable[[str], None] = print, progress: bool = True) -> RunSummary:
    """Run a config end to end; returns what was built and reused, the searches and the report."""
    summary = RunSummary()
    config.workspace.mkdir(parents=True, exist_ok=True)
    options = _data_options(config, summary, say)
    sources = _models(config, summary, say)
    depth = model_depths(sources)
    units = plan(config, depth)
    stores = {}
    planned = list(store_requests(config, units, options, sources, depth, progress).items())
    # Workers started on one config (other GPUs, machines sharing the workspace) begin at different stores, so
    # that each extracts its own; a store another worker holds is waited for, then reused.
    start = os.getpid() % len(planned) if planned else 0
    for (label, examples), requests in planned[start:] + planned[:start]:
        folder = requests[0].out.parent
        vision = " + ViT outputs" if requests[0].store_vision else ""
        say(f"features {label} {examples} layers {list(requests[0].layers)}{vision} -> {folder}")
        for request in requests:
            summary.count("features", extract(request))
        stores[(label, examples)] = folder
    for unit in units:
        if unit.mode == ZERO_SHOT:
            request = zeroshot_request(config, unit, sources, options, progress)
            say(f"zero-shot {unit.experiment.name}: {unit.model} {unit.spec.name} -> {request.out}")
            summary.count("zero-shot runs", run_zeroshot(request))
            summary.zeroshot.append(request.out)
            continue
        request = search_request(config, unit, sources, options, stores[(unit.model, unit.spec.examples_name)])
        control = " (control task)" if unit.control else ""
        say(
            f"search {unit.experiment.name}: {unit.model} {unit.spec.name} {unit.mode} layer {unit.layer} "
            f"{unit.probe}{control}"
        )
        searched = summary.count("searches", run_search(request))
        summary.searches.append(request.out)
        if unit.experiment.mdl and unit.mode == "frozen":
            code = mdl_request(request, searched.value.best["params"])
            say(f"mdl {unit.experiment.name}: {unit.model} {unit.spec.name} layer {unit.layer} {unit.probe}{control}")
            summary.count("mdl", run_mdl(code))
            summary.codes.append(code.out)
    say(f"report -> {config.report_dir}")
    write_report(
        summary.searches + summary.zeroshot + summary.codes,
        config.report_dir,
        compare_paper=config.report.compare_paper,
        only=config.report.tables,
    )
    summary.report = config.report_dir
    return summary


def describe(summary: RunSummary) -> list[str]:
    stages = sorted(set(summary.built) | set(summary.reused))
    return [f"{stage}: {summary.built.get(stage, 0)} built, {summary.reused.get(stage, 0)} reused" for stage in stages]


def run_config_file(path: Path, say: Callable[[str], None] = print) -> tuple[Config, RunSummary]:
    from probing.config import load_config

    config = load_config(path)
    return config, run_config(config, say)
