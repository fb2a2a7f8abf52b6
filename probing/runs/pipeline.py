"""`probing run CONFIG`: every stage of a config in order, each reused when its manifest matches.

    data (or the demo dataset) -> RCM (built when needed) -> models (tiny checkpoints written when asked) ->
    feature stores per model x task x split -> one search per experiment x task x model x mode x layer x probe
    (the mode "zeroshot": one zero-shot run per experiment x task x model, no store, no search) -> the report

Layout under the workspace:

    data/  rcm/  models/tiny-<family>/
    features/<model>/<task>/<layers>/<split>         (<layers>: e.g. layers-12-vision, layers-all)
    runs/<experiment>/<model>/<task>/<mode>/layer<L>-<probe>/     (a search folder; best/ inside)
    runs/<experiment>/<model>/<task>/zeroshot/                    (a zero-shot run folder)
        ...layer<L>-<probe>-floor/                      (`controls: true`, frozen: the best trial on shuffled
                                                          features, the floor)
        ...layer<L>-<probe>-control-seed<S>[-floor]/    (`controls: true`: the best trial on the control targets
                                                          of each control seed, and its floor; with
                                                          `control_search: true` a search of its own)
        ...layer<L>-<probe>[-control-seed<S>][-floor]-mdl/  (`mdl: true`: the online code of the best trial, of
                                                          the first control, and of their noise floors)
    report-<config name>/                            (README.md, tables/, figures/)

A second run with the same config recomputes nothing: every stage reports that it reused its output, and
the summary counts what was built and what was reused.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from probing.baselines.zeroshot import ZeroShotRequest, run_zeroshot
from probing.core.artifacts import read_manifest, removed_when_refused
from probing.core.errors import ProbingError
from probing.core.records import NO_PROBE, StageResult
from probing.core.settings import applies
from probing.data.rcm import build_rcm
from probing.data.synthetic import demo_data_options, make_demo_data
from probing.data.types import DataOptions
from probing.models import ModelSource, qformer_layers
from probing.models.tiny import ensure_checkpoint
from probing.probes.run import TrainRequest, run_training
from probing.probes.train import TrainSettings, Trial
from probing.report.tables import write_report
from probing.runs.config import ZERO_SHOT, Config, Experiment, search_space
from probing.store.extract import ExtractionRequest, extract
from probing.studies.mdl import MdlRequest, run_mdl
from probing.studies.search import SearchRequest, SearchSettings, run_search, trial_from
from probing.tasks import TaskSpec, get_task, load_split


@dataclass(frozen=True)
class PlannedStep:
    """One step of a dry run (`probing run --dry-run`): what it writes, whether a finished output is there to
    reuse (its folder holds a manifest; whether that manifest matches is checked when the step runs), and its
    size where known (on disk for a reused output; examples to read or trials to run otherwise)."""

    stage: str
    what: str
    out: Path
    reused: bool
    size: str = ""

    @classmethod
    def of(cls, stage: str, what: str, out: Path, size: str = "") -> PlannedStep:
        return cls.found(stage, what, out, read_manifest(out) is not None, size)

    @classmethod
    def found(cls, stage: str, what: str, out: Path, reused: bool, size: str = "") -> PlannedStep:
        """The step of an output whose manifest the caller has read already (`reused`: there is one)."""
        return cls(stage, what, out, reused, _disk_size(out) if reused else size)


def _stored_layers(manifest: dict) -> set[int]:
    """The layers a store holds, from its manifest (its list; before stores grew, its request's)."""
    return set(manifest.get("layers") or manifest.get("request", {}).get("layers") or [])


def _disk_size(folder: Path) -> str:
    total = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    return f"{total / 1e6:.1f} MB on disk"


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
    control: bool = False  # on the task's control targets (`controls: true` with `control_search: true`)
    control_seed: int = 0

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)

    @property
    def in_memory(self) -> bool:
        """A frozen search whose experiment asks for features in memory (`search.in_memory`): it needs no store."""
        return self.mode == "frozen" and self.experiment.search.in_memory


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


def _data_options(
    config: Config, summary: RunSummary, say: Callable[[str], None], steps: list[PlannedStep] | None = None
) -> dict[str, DataOptions]:
    """Task reference -> the data options its reader needs (the demo dataset and RCM written when asked; with
    `steps`, a dry run, only planned there)."""
    data = config.data
    paths = {name: getattr(data, name) for name in ("images", "refs", "instances", "vsr", "rcm")}
    tasks = _tasks(config)
    if data.demo is not None:
        folder = config.workspace / "data"
        if steps is not None:
            steps.append(PlannedStep.of("data", "demo dataset", folder))
        else:
            say(f"demo dataset -> {folder}")
            demo = data.demo
            summary.count(
                "data",
                make_demo_data(
                    folder, seed=demo.seed, refcocog_images=demo.refcocog_images, vsr_images=demo.vsr_images
                ),
            )
        demo = demo_data_options(folder)
        paths = {**demo["refcocog"], "vsr": demo["vsr"]["vsr"], "rcm": None}
    if paths["rcm"] is None and any("rcm" in spec.reader.options for spec in tasks.values()):
        paths["rcm"] = config.workspace / "rcm"
        if steps is not None:
            steps.append(PlannedStep.of("rcm", "Region Cell Matching", paths["rcm"]))
        else:
            say(f"Region Cell Matching -> {paths['rcm']}")
            summary.count("rcm", build_rcm(paths["refs"], paths["instances"], paths["rcm"], seed=data.rcm_seed))
    return {
        task: DataOptions(task=task, limit=data.limit, **{name: paths[name] for name in spec.reader.options})
        for task, spec in tasks.items()
    }


def _models(
    config: Config, summary: RunSummary, say: Callable[[str], None], steps: list[PlannedStep] | None = None
) -> dict[str, ModelSource]:
    """Label -> the model source to load (tiny checkpoints written into the workspace; with `steps`, a dry run,
    only planned there)."""
    sources = {}
    used = {label for experiment in config.experiments for label in experiment.models}
    for label in sorted(used):
        entry = config.models[label]
        source = ModelSource(**{f.name: getattr(entry, f.name) for f in fields(ModelSource)})
        if entry.tiny is not None:
            folder = config.workspace / "models" / f"tiny-{entry.tiny}"
            if steps is None:
                if str(folder) not in {source.model for source in sources.values()}:  # one checkpoint, several labels
                    where = folder.relative_to(config.workspace)
                    say(f"tiny random {entry.tiny} checkpoint -> {where} (in the workspace)")
                    summary.count("models", ensure_checkpoint(folder, entry.tiny))
            elif not any(step.out == folder for step in steps):
                steps.append(PlannedStep.of("models", f"tiny random {entry.tiny} checkpoint", folder))
            source = replace(source, model=str(folder))
        sources[label] = source
    return sources


def _planned_depths(config: Config, sources: dict[str, ModelSource]) -> dict[str, int]:
    """`model_depths` for a dry run: a tiny checkpoint not written yet is counted from the config it will have."""
    from probing.models.registry import family_for_config
    from probing.models.tiny import build_config

    depths = {}
    for label, source in sources.items():
        tiny = config.models[label].tiny
        if tiny is not None and not (Path(source.model) / "config.json").is_file():
            planned = build_config(tiny, "tiny", vocab_size=1000)  # the vocabulary does not change the depth
            depths[label] = family_for_config(planned, source.model, tiny).resampler.layers_in(planned)
        else:
            depths[label] = qformer_layers(source)
    return depths


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
                            if experiment.controls and experiment.control_search:
                                units += [
                                    Unit(experiment, task, label, mode, layer, probe, control=True, control_seed=seed)
                                    for seed in experiment.control_seeds
                                ]
    return units


def store_layouts(units: list[Unit], depth: dict[str, int]) -> dict[tuple[str, str], tuple[str, list[int], bool]]:
    """(model, examples) -> (a task reference, layers to store, whether to store ViT outputs): what the searches
    need; tasks that share their examples (`TaskSpec.examples_from`) share their stores."""
    needs: dict[tuple[str, str], tuple[str, set[int], bool]] = {}
    for unit in units:
        if unit.mode == ZERO_SHOT or unit.in_memory:  # the model answers from the images; features in memory
            continue
        key = (unit.model, unit.spec.examples_name)
        task, layers, vision = needs.get(key, (unit.task, set(), False))
        if unit.mode == "frozen":
            layers = layers | {unit.layer}
        needs[key] = (task, layers, vision or unit.mode == "unfrozen")
    return {key: (task, sorted(layers) or [depth[key[0]]], vision) for key, (task, layers, vision) in needs.items()}


def memory_layouts(units: list[Unit]) -> dict[tuple[str, str], tuple[str, list[int]]]:
    """(model, examples) -> (a task reference, layers): what the searches with features in memory need, extracted
    once for all of them."""
    needs: dict[tuple[str, str], tuple[str, set[int]]] = {}
    for unit in units:
        if unit.in_memory:
            key = (unit.model, unit.spec.examples_name)
            task, layers = needs.get(key, (unit.task, set()))
            needs[key] = (task, layers | {unit.layer})
    return {key: (task, sorted(layers)) for key, (task, layers) in needs.items()}


class MemoryFeatures:
    """The in-memory stores of the (model, examples) the current searches read (`probing.store.memory`), one
    model and task at a time: a config's units run model by model and task by task, so each is extracted once
    and let go when the next is needed (device memory holds one task's features)."""

    def __init__(self, config: Config, units: list[Unit], sources: dict[str, ModelSource], options):
        self.config, self.sources, self.options = config, sources, options
        self.layouts = memory_layouts(units)
        self.key: tuple[str, str] | None = None
        self.stores: dict | None = None

    def of(self, unit: Unit) -> dict | None:
        if not unit.in_memory:
            return None
        key = (unit.model, unit.spec.examples_name)
        if key != self.key:
            from probing.store.memory import memory_stores

            task, layers = self.layouts[key]
            self.key, self.stores = None, None  # the previous task's features are let go before the next's
            settings = replace(self.config.extract, device=self.config.device, progress=False)
            self.stores = memory_stores(self.sources[unit.model], self.options[task], layers, settings)
            self.key = key
        return self.stores


# A store folder of a workspace: one per model, examples and whether it keeps ViT outputs; it grows by the layers
# later experiments ask for (`probing.store.features`: a request for more layers adds only those).
GROWING_STORE = "store"


def store_folder(config: Config, model: str, task: str, vision: bool) -> Path:
    folder = GROWING_STORE + ("-vision" if vision else "")
    return config.workspace / "features" / model / get_task(task).examples_name / folder


def parse_store_name(name: str, depth: int) -> tuple[list[int], bool] | None:
    """(layers, has ViT outputs) from the name of a store folder that earlier versions wrote, one per layer set
    (`layers-4`, `layers-all-vision`), or None."""
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
) -> tuple[Path, list[int]]:
    """The folder of the store that serves these layers, and the layers to ask it for: a store of an earlier
    version's layout (a folder per layer set) that already holds them, asked for what it holds (so that it is
    reused as it is), else the workspace's growing store (the one with ViT outputs when it is there or they are
    needed), asked for these layers: the extraction grows it by those it lacks."""
    spec = get_task(task)
    root = config.workspace / "features" / model / spec.examples_name
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        parsed = parse_store_name(folder.name, depth)
        if parsed is None or not all((folder / split / "manifest.json").is_file() for split in spec.splits):
            continue
        stored_layers, stored_vision = parsed
        if set(layers) <= set(stored_layers) and (stored_vision or not vision):
            return folder, stored_layers
    with_vision = store_folder(config, model, task, vision=True)
    return (with_vision if vision or with_vision.is_dir() else store_folder(config, model, task, vision=False)), layers


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
        folder, layers = covering_store(config, label, task, *needed, depth[label])
        settings = replace(
            config.extract,
            layers=tuple(layers),
            store_vision=folder.name.endswith("-vision"),
            device=config.device,
            progress=progress,
        )
        requests[(label, examples)] = [
            ExtractionRequest(
                **vars(sources[label]), **vars(settings), data=options[task], split=split, out=folder / split
            )
            for split in get_task(task).splits
        ]
    return requests


def search_request(
    config: Config,
    unit: Unit,
    sources: dict[str, ModelSource],
    options: dict[str, DataOptions],
    features: Path | None,
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
        / f"layer{unit.layer}-{unit.probe}{f'-control-seed{unit.control_seed}' if unit.control else ''}"
    )
    search, train = unit.experiment.search, config.train
    settings = TrainSettings(
        task=unit.task,
        probe=unit.probe,
        # a width given for the SwiGLU probes is no linear probe's (its identity keeps the default)
        hidden=train.hidden if applies(TrainSettings, "hidden", probe=unit.probe) else TrainSettings.hidden,
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
    search_settings["in_memory"] = unit.in_memory  # the experiment's unfrozen searches read the model themselves
    return SearchRequest(
        **search_settings,
        **vars(sources[unit.model]),
        task=unit.task,
        mode=unit.mode,
        layer=unit.layer,
        out=out,
        settings=settings,
        space=search_space(unit.experiment, index, unit.task).for_probe(unit.probe),
        features=None if unit.in_memory else features,
        data=options[unit.task],
        workers=config.extract.workers or 0,
        label=unit.model,
        control=unit.control,
        control_seed=unit.control_seed,
        # unfrozen probes read the texts themselves, as the config's stores were extracted
        **(vars(config.extract.text_settings) if unit.mode == "unfrozen" else {}),
    )


def mdl_request(request: SearchRequest | TrainRequest, trial: Trial) -> MdlRequest:
    """The online code of a frozen run's trial on the run's own targets (and features: shuffled for a floor)."""
    return MdlRequest(
        task=request.task,
        layer=request.layer,
        out=request.out.with_name(request.out.name + "-mdl"),
        settings=request.settings,
        trial=trial,
        features=request.features,
        shuffle_seed=request.settings.order_seed,
        label=request.label,
        data=request.data,
        control=request.control,
        control_seed=request.control_seed,
        shuffled_features=request.shuffled_features,
    )


def rigour_requests(request: SearchRequest, best_params: dict, experiment: Experiment) -> list[TrainRequest]:
    """The runs that make a search's numbers readable (`controls: true`), all with the search's best
    hyper-parameters and final seeds: its floor (frozen: shuffled features) and, for a task search without
    `control_search`, a run on the control targets of each control seed, each with its floor."""
    trials = tuple(trial_from(best_params, seed) for seed in request.seeds_of_best)
    base = request.train_request(trials, request.out)
    wanted = []
    if not request.control and not experiment.control_search:
        for seed in experiment.control_seeds:
            out = request.out.with_name(f"{request.out.name}-control-seed{seed}")
            wanted.append(replace(base, control=True, control_seed=seed, out=out))
    if request.mode == "frozen":
        floors = [
            replace(run, shuffled_features=True, out=run.out.with_name(run.out.name + "-floor")) for run in wanted
        ]
        wanted = [replace(base, shuffled_features=True, out=request.out.with_name(request.out.name + "-floor"))] + [
            run for pair in zip(wanted, floors, strict=True) for run in pair
        ]
    return wanted


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
    # Everything the stages will read is checked before the first of them runs (every split of every task, the
    # models and their depths, the plan): a refusal here removes the workspace when this run created it.
    with removed_when_refused(config.workspace):
        config.workspace.mkdir(parents=True, exist_ok=True)
        options = _data_options(config, summary, say)
        for task, data in options.items():
            for split in get_task(task).splits:
                load_split(data, split)
        sources = _models(config, summary, say)
        depth = model_depths(sources)
        units = plan(config, depth)
        planned = list(store_requests(config, units, options, sources, depth, progress).items())
    stores = {}
    # Workers started on one config (other GPUs, machines sharing the workspace) begin at different stores, so
    # that each extracts its own; a store another worker holds is waited for, then reused.
    start = os.getpid() % len(planned) if planned else 0
    for (label, examples), requests in planned[start:] + planned[:start]:
        folder = requests[0].out.parent
        # one short line per step: the store's folder under <workspace>/features names model, task and layers
        stores_root = config.workspace / "features"
        shown = folder.relative_to(stores_root) if folder.is_relative_to(stores_root) else folder
        say(f"features {shown}")
        for request in requests:
            summary.count("features", extract(request))
        stores[(label, examples)] = folder
    memory = MemoryFeatures(config, units, sources, options)
    for unit in units:
        if unit.mode == ZERO_SHOT:
            request = zeroshot_request(config, unit, sources, options, progress)
            say(f"zero-shot {unit.experiment.name}: {unit.model} {unit.spec.name}")
            summary.count("zero-shot runs", run_zeroshot(request))
            summary.zeroshot.append(request.out)
            continue
        request = search_request(config, unit, sources, options, stores.get((unit.model, unit.spec.examples_name)))
        control = " (control task)" if unit.control else ""
        in_memory = memory.of(unit)
        say(
            f"search {unit.experiment.name}: {unit.model} {unit.spec.name} {unit.mode} layer {unit.layer} "
            f"{unit.probe}{control}"
        )
        searched = summary.count("searches", run_search(request, in_memory))
        summary.searches.append(request.out)
        best = searched.value.best["params"]
        coded: list[SearchRequest | TrainRequest] = [request]
        if unit.experiment.controls:
            for run in rigour_requests(request, best, unit.experiment):
                what = f"control seed {run.control_seed}" if run.control else "task"
                say(
                    f"{'floor' if run.shuffled_features else 'control'} {unit.experiment.name}: {unit.model} "
                    f"{unit.spec.name} {unit.mode} layer {unit.layer} {unit.probe} ({what})"
                )
                summary.count("rigour runs", run_training(replace(run, stores=in_memory) if in_memory else run))
                summary.searches.append(run.out)
                if not run.control or run.control_seed == unit.experiment.control_seeds[0]:  # task, first control
                    coded.append(run)
        if unit.experiment.mdl and unit.mode == "frozen":
            for run in coded:
                code = mdl_request(run, trial_from(best, request.seeds_of_best[0]))
                what = "floor of the " if run.shuffled_features else ""
                what += f"control (seed {run.control_seed})" if run.control else "task"
                say(f"mdl {unit.experiment.name}: {unit.model} {unit.spec.name} layer {unit.layer} ({what})")
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


def planned_steps(config: Config) -> list[PlannedStep]:
    """Every step `run_config` would take, in order, each reused or to run; nothing is written (the data of a
    store to extract is read, to count its examples, where it is already there)."""
    from probing.tasks import load_split

    steps: list[PlannedStep] = []
    summary = RunSummary()
    options = _data_options(config, summary, print, steps)
    sources = _models(config, summary, print, steps)
    depth = _planned_depths(config, sources)
    units = plan(config, depth)
    stores = {}
    for (label, examples), requests in store_requests(config, units, options, sources, depth).items():
        for request in requests:
            size = ""
            if all(path.exists() for path in request.data.given().values()):
                size = f"{len(load_split(request.data, request.split).examples)} examples"
            vision = " + ViT outputs" if request.store_vision else ""
            what = f"features {label} {examples} {request.split} layers {list(request.layers)}{vision}"
            manifest = read_manifest(request.out)  # once: whether the store is there, and which layers it holds
            step = PlannedStep.found("features", what, request.out, manifest is not None, size)
            present = _stored_layers(manifest or {})
            if step.reused and not set(request.layers) <= present:  # a store there, but it grows by these layers
                missing = sorted(set(request.layers) - present)
                step = replace(step, reused=False, what=f"{what} (grows by layers {missing})")
            steps.append(step)
        stores[(label, examples)] = requests[0].out.parent
    for unit in units:
        if unit.mode == ZERO_SHOT:
            request = zeroshot_request(config, unit, sources, options, progress=False)
            what = f"zero-shot {unit.experiment.name}: {unit.model} {unit.spec.name}"
            steps.append(PlannedStep.of("zero-shot runs", what, request.out))
            continue
        request = search_request(config, unit, sources, options, stores.get((unit.model, unit.spec.examples_name)))
        control = " (control task)" if unit.control else ""
        control += " (features in memory)" if unit.in_memory else ""
        what = f"search {unit.experiment.name}: {unit.model} {unit.spec.name} {unit.mode} layer {unit.layer} "
        steps.append(PlannedStep.of("searches", what + unit.probe + control, request.out, f"{request.trials} trials"))
        if unit.experiment.mdl and unit.mode == "frozen":
            out = request.out.with_name(request.out.name + "-mdl")
            steps.append(PlannedStep.of("mdl", f"mdl {unit.experiment.name}: {unit.model} {unit.spec.name}", out))
    steps.append(PlannedStep(RESULTS_STAGE, "report", config.report_dir, reused=False))
    return steps


RESULTS_STAGE = "report"  # written again by every run, from the searches' outputs


def describe_plan(steps: list[PlannedStep]) -> list[str]:
    """The dry run as a table: status, stage, what, size, folder; then the count to run and reused."""
    rows = [("status", "stage", "what", "size", "folder")]
    rows += [("reused" if s.reused else "to run", s.stage, s.what, s.size, str(s.out)) for s in steps]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    reused = sum(step.reused for step in steps)
    lines.append(f"{len(steps) - reused} step(s) to run, {reused} reused; nothing was written (--dry-run)")
    return lines


def describe(summary: RunSummary) -> list[str]:
    stages = sorted(set(summary.built) | set(summary.reused))
    return [f"{stage}: {summary.built.get(stage, 0)} built, {summary.reused.get(stage, 0)} reused" for stage in stages]


def run_config_file(
    path: Path, say: Callable[[str], None] = print, overrides: Sequence[str] = (), limit: int | None = None
) -> tuple[Config, RunSummary]:
    from probing.runs.config import load_config

    config = load_config(path, overrides=overrides, limit=limit)
    return config, run_config(config, say)
