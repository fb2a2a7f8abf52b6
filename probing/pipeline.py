"""`probing run CONFIG`: every stage of a config in order, each reused when its manifest matches.

    data (or the demo dataset) -> RCM (built when needed) -> models (tiny checkpoints written when asked) ->
    feature stores per model x task x split -> one search per experiment x task x model x mode x layer x probe
    -> the report

Layout under the workspace:

    data/  rcm/  models/tiny-<family>/
    features/<model>/<task>/<layers>/<split>         (<layers>: e.g. layers-12-vision, layers-all)
    runs/<experiment>/<model>/<task>/<mode>/layer<L>-<probe>/     (a search folder; best/ inside)
    report-<config name>/                            (README.md, tables/, figures/)

A second run with the same config recomputes nothing: every output's manifest matches and is kept (the
summary counts what was built and what was reused, by the outputs' manifest timestamps).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from probing.config import Config, Experiment
from probing.data import SPLITS, DataOptions
from probing.data.rcm import build_rcm
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.errors import ProbingError
from probing.extract import ExtractionRequest, extract
from probing.models import qformer_layers
from probing.models.tiny import ensure_checkpoint
from probing.report import write_report
from probing.search import SearchRequest, SearchSpace, default_space, run_search
from probing.train import TrainSettings


@dataclass(frozen=True)
class Unit:
    """One search: an experiment's task x model x mode x layer x probe."""

    experiment: Experiment
    task: str
    model: str  # the label in config.models
    mode: str
    layer: int
    probe: str


@dataclass
class RunSummary:
    built: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    searches: list[Path] = field(default_factory=list)
    report: Path | None = None

    def count(self, stage: str, manifest: Path, stamp_before: int | None) -> None:
        stamp_after = manifest.stat().st_mtime_ns if manifest.is_file() else None
        (self.reused if stamp_before is not None and stamp_after == stamp_before else self.built)[stage] += 1


def _stamp(folder: Path) -> int | None:
    manifest = folder / "manifest.json"
    return manifest.stat().st_mtime_ns if manifest.is_file() else None


def _data_options(config: Config, summary: RunSummary, say: Callable[[str], None]) -> dict[str, DataOptions]:
    data = config.data
    tasks = {task for experiment in config.experiments for task in experiment.tasks}
    if data.demo is not None:
        folder = config.workspace / "data"
        before = _stamp(folder)
        say(f"demo dataset -> {folder}")
        make_demo_data(folder, seed=data.demo.seed, refcocog_images=data.demo.refcocog_images,
                       vsr_images=data.demo.vsr_images)
        summary.count("data", folder / "manifest.json", before)
        demo = demo_data_options(folder)
        refs, instances, images, vsr = (demo["refcocog"]["refs"], demo["refcocog"]["instances"],
                                        demo["refcocog"]["images"], demo["vsr"]["vsr"])
    else:
        refs, instances, images, vsr = data.refs, data.instances, data.images, data.vsr
    options = {}
    if "refcocog" in tasks:
        options["refcocog"] = DataOptions(task="refcocog", refs=refs, instances=instances, images=images)
    if "vsr" in tasks:
        options["vsr"] = DataOptions(task="vsr", vsr=vsr, images=images)
    if "rcm" in tasks:
        rcm = data.rcm if data.rcm is not None and data.demo is None else None
        if rcm is None:
            rcm = config.workspace / "rcm"
            before = _stamp(rcm)
            say(f"Region Cell Matching -> {rcm}")
            build_rcm(refs, instances, rcm, seed=data.rcm_seed)
            summary.count("rcm", rcm / "manifest.json", before)
        options["rcm"] = DataOptions(task="rcm", rcm=rcm, images=images)
    return options


def _models(config: Config, summary: RunSummary, say: Callable[[str], None]) -> dict[str, str]:
    """Label -> model spec for `load_resampler` (tiny checkpoints written into the workspace)."""
    specs = {}
    used = {label for experiment in config.experiments for label in experiment.models}
    for label in sorted(used):
        entry = config.models[label]
        if entry.tiny is not None:
            folder = config.workspace / "models" / f"tiny-{entry.tiny}"
            before = _stamp(folder)
            say(f"tiny random {entry.tiny} checkpoint -> {folder}")
            ensure_checkpoint(folder, entry.tiny)
            summary.count("models", folder / "manifest.json", before)
            specs[label] = str(folder)
        else:
            specs[label] = entry.model
    return specs


def model_depths(config: Config, specs: dict[str, str]) -> dict[str, int]:
    """Label -> number of Q-Former layers, read from each model's config."""
    return {label: qformer_layers(spec, config.models[label].revision, config.models[label].base)
            for label, spec in specs.items()}


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
                    raise ProbingError(f"config field 'experiments[{index}].layers': {label} has layers "
                                       f"1..{depth[label]}, not {too_deep[0]}")
            for task in experiment.tasks:
                for mode in experiment.modes:
                    for layer in layers:
                        for probe in experiment.probes:
                            units.append(Unit(experiment, task, label, mode, layer, probe))
    return units


def store_layouts(units: list[Unit], depth: dict[str, int]) -> dict[tuple[str, str], tuple[list[int], bool]]:
    """(model, task) -> (layers to store, whether to store ViT outputs): what the searches need."""
    needs: dict[tuple[str, str], tuple[set[int], bool]] = defaultdict(lambda: (set(), False))
    for unit in units:
        layers, vision = needs[(unit.model, unit.task)]
        if unit.mode == "frozen":
            layers = layers | {unit.layer}
        needs[(unit.model, unit.task)] = (layers, vision or unit.mode == "unfrozen")
    return {key: (sorted(layers) or [depth[key[0]]], vision) for key, (layers, vision) in needs.items()}


def store_folder(config: Config, model: str, task: str, layers: list[int], vision: bool, depth: int) -> Path:
    name = "layers-all" if layers == list(range(1, depth + 1)) else "layers-" + "-".join(map(str, layers))
    return config.workspace / "features" / model / task / (name + ("-vision" if vision else ""))


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


def covering_store(config: Config, model: str, task: str, layers: list[int], vision: bool, depth: int
                   ) -> tuple[list[int], bool]:
    """The layout of an existing store that already holds what is needed (configs sharing a workspace extract
    once: Table 1's last layer with ViT outputs also serves Table 3's frozen probes), else the one asked for."""
    root = config.workspace / "features" / model / task
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        parsed = parse_store_name(folder.name, depth)
        if parsed is None or not all((folder / split / "manifest.json").is_file() for split in SPLITS):
            continue
        stored_layers, stored_vision = parsed
        if set(layers) <= set(stored_layers) and (stored_vision or not vision):
            return stored_layers, stored_vision
    return layers, vision


def search_space(experiment: Experiment, index: int, task: str) -> SearchSpace:
    """The paper's space for `task` with the experiment's overrides, checked (errors name the config field)."""
    space = default_space(task)
    override = experiment.search.space.get(task)
    if override is None:
        return space
    where = f"experiments[{index}].search.space.{task}"
    changes = {name: tuple(value) for name, value in vars(override).items() if value is not None}
    if "lr" in changes and len(changes["lr"]) != 2:
        raise ProbingError(f"config field '{where}.lr': expected [low, high]")
    try:
        return replace(space, **changes).check()
    except ProbingError as error:
        raise ProbingError(f"config field '{where}': {error}") from None


def validate(config: Config) -> None:
    """What needs the search code to check: every experiment's search spaces (before any stage runs)."""
    for index, experiment in enumerate(config.experiments):
        for task in experiment.tasks:
            search_space(experiment, index, task)


def run_config(config: Config, say: Callable[[str], None] = print, progress: bool = True) -> RunSummary:
    """Run a config end to end; returns what was built and reused, the searches and the report."""
    validate(config)
    summary = RunSummary()
    config.workspace.mkdir(parents=True, exist_ok=True)
    options = _data_options(config, summary, say)
    specs = _models(config, summary, say)
    depth = model_depths(config, specs)
    units = plan(config, depth)
    stores = {}
    for (label, task), needed in sorted(store_layouts(units, depth).items()):
        entry = config.models[label]
        layers, vision = covering_store(config, label, task, *needed, depth[label])
        folder = store_folder(config, label, task, layers, vision, depth[label])
        say(f"features {label} {task} layers {layers}{' + ViT outputs' if vision else ''} -> {folder}")
        for split in SPLITS:
            before = _stamp(folder / split)
            extract(ExtractionRequest(
                model=specs[label], data=options[task], split=split, out=folder / split, layers=layers,
                shard_size=config.extract.shard_size, batch_size=config.extract.batch_size, init=entry.init,
                store_vision=vision, dtype=config.extract.dtype, vision_dtype=config.extract.vision_dtype,
                qformer_dtype=config.extract.qformer_dtype, compile_vision=config.extract.compile_vision,
                revision=entry.revision, base=entry.base, workers=config.extract.workers, device=config.device,
                progress=progress))
            summary.count("features", folder / split / "manifest.json", before)
        stores[(label, task)] = folder
    for unit in units:
        entry = config.models[unit.model]
        out = (config.workspace / "runs" / unit.experiment.name / unit.model / unit.task / unit.mode
               / f"layer{unit.layer}-{unit.probe}")
        search = unit.experiment.search
        train = config.train
        settings = TrainSettings(task=unit.task, probe=unit.probe, hidden=train.hidden,
                                 batch_size=train.batch_size if unit.mode == "frozen" else train.unfrozen_batch_size,
                                 patience=train.patience.get(unit.task), order_seed=search.seed, device=config.device)
        say(f"search {unit.experiment.name}: {unit.model} {unit.task} {unit.mode} layer {unit.layer} {unit.probe}")
        before = _stamp(out)
        run_search(SearchRequest(
            task=unit.task, mode=unit.mode, layer=unit.layer, out=out, settings=settings,
            space=search_space(unit.experiment, config.experiments.index(unit.experiment), unit.task),
            trials=search.trials, batch=search.batch, seed=search.seed,
            storage=search.storage, study_name=f"{config.name}/{out.relative_to(config.workspace)}"
            if search.storage else None, features=stores[(unit.model, unit.task)], data=options[unit.task],
            model=specs[unit.model], init=entry.init, revision=entry.revision,
            workers=config.extract.workers or 0, final_seeds=tuple(search.final_seeds), label=unit.model))
        summary.count("searches", out / "manifest.json", before)
        summary.searches.append(out)
    say(f"report -> {config.report_dir}")
    write_report(summary.searches, config.report_dir, compare_paper=config.report.compare_paper,
                 only=config.report.tables)
    summary.report = config.report_dir
    return summary


def describe(summary: RunSummary) -> list[str]:
    stages = sorted(set(summary.built) | set(summary.reused))
    return [f"{stage}: {summary.built.get(stage, 0)} built, {summary.reused.get(stage, 0)} reused" for stage in stages]


def run_config_file(path: Path, say: Callable[[str], None] = print) -> tuple[Config, RunSummary]:
    from probing.config import load_config

    config = load_config(path)
    try:
        validate(config)
    except ProbingError as error:  # name the file, as load_config's own errors do
        raise ProbingError(f"{path}: {error}") from None
    return config, run_config(config, say)

