"""Experiment configs: YAML <-> dataclasses, validated with messages that name the field.

A config says where the data and models are, which experiments to run (task x model x mode x layer x
probe, each a search), and which tables the report shows. Relative paths are taken from the directory
`probing run` is started in. Every stage writes under `workspace` and is reused when its manifest matches,
so configs that share a workspace share their artifacts (table2.yaml reuses table1.yaml's runs).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from probing.baselines.zeroshot import ZeroShotSettings
from probing.core.artifacts import check_folder_name
from probing.core.devices import check_device
from probing.core.errors import ProbingError, shown
from probing.core.registry import unknown_name
from probing.core.settings import check as check_settings
from probing.core.settings import config_fields, config_section, setting
from probing.data.types import DataOptions
from probing.models import ModelSource
from probing.probes.modules import probe_kind
from probing.probes.run import Mode
from probing.probes.train import TrainSettings
from probing.store.extract import ExtractionSettings
from probing.studies.search import SearchSettings

if TYPE_CHECKING:
    from probing.tasks.spec import TaskSpec

ZERO_SHOT = "zeroshot"  # an experiment mode: the model's own answer (`probing zeroshot`), not a search


@dataclass(frozen=True, kw_only=True)
class ModelEntry(ModelSource):
    """A model under a report label: a `ModelSource` (alias, Hub id, local folder or LAVIS .pth in `model`), or
    a tiny random checkpoint of a family written into the workspace (`tiny`)."""

    tiny: str | None = None  # a registered family that declares how its tiny checkpoint is written


@dataclass(frozen=True)
class DemoData:
    refcocog_images: int = 300
    vsr_images: int = 240
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class DataConfig(DataOptions):
    """The data options of every task (each reader takes the ones it needs); RCM is built into the workspace
    from `refs` and `instances` when `rcm` is not given; `demo` generates the demo dataset instead."""

    rcm_seed: int = 0
    demo: DemoData | None = None


# The `train` section: TrainSettings' config fields, and what a config decides per mode or per task.
TrainConfig = config_section(
    "TrainConfig",
    TrainSettings,
    extra=[
        ("unfrozen_batch_size", int, setting(128, low=1, help="Training batch size of unfrozen searches.")),
        (
            "patience",
            dict[str, int],
            setting(default_factory=dict, help="Early-stopping patience per task (default: the task's)."),
        ),
    ],
)


@dataclass(frozen=True, kw_only=True)
class SearchConfig(SearchSettings):
    """An experiment's `search` section; `space` overrides dimensions of a task's default space
    (`{task: {lr: [low, high], epochs: [...], giou_scale: [...], l1_scale: [...], logreg_c: [low, high]}}`)."""

    space: dict[str, dict[str, list[float]]] = field(default_factory=dict)


# An experiment's `zeroshot` section: ZeroShotSettings' config fields (prompt, answers, llm_dtype ...).
ZeroShotConfig = config_section("ZeroShotConfig", ZeroShotSettings)


@dataclass(frozen=True)
class Experiment:
    name: str
    tasks: list[str]  # registered task names or task YAML files
    models: list[str]
    modes: list[Mode | Literal["zeroshot"]] = field(default_factory=lambda: ["frozen"])
    layers: list[int] | Literal["last", "all"] = "last"
    probes: list[str] = field(default_factory=lambda: ["linear"])  # registered probes
    search: SearchConfig = field(default_factory=SearchConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)  # read by the mode "zeroshot"
    # each frozen or unfrozen search's best trial also trained on the task's control targets (`probing.tasks.controls`),
    # once per control seed, and (frozen) on shuffled features: the floors
    controls: bool = False
    control_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # >= 5 by default: the spread shows
    control_search: bool = False  # each control gets a search of its own instead of the task's hyper-parameters
    mdl: bool = (
        False  # the online code (`probing.studies.mdl`) of each frozen search's best trial, and of its control's
    )


@dataclass(frozen=True)
class ReportConfig:
    tables: list[str] | None = None  # None: every table the runs allow; names from the table registry
    compare_paper: bool = False
    out: Path | None = None  # default: <workspace>/report-<name>


@dataclass(frozen=True)
class Config:
    name: str
    workspace: Path
    models: dict[str, ModelEntry]
    experiments: list[Experiment]
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractionSettings = field(default_factory=ExtractionSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    device: str | None = None

    @property
    def report_dir(self) -> Path:
        return self.report.out or self.workspace / f"report-{self.name}"


# ---------------------------------------------------------------------------------------------- parsing


def _type_name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin is Literal:
        return " | ".join(repr(v) for v in get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in get_args(kind) if k is not type(None))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(kind)[0])}"
    if origin is dict:
        return f"a mapping to {_type_name(get_args(kind)[1])}"
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}.get(
        kind, str(kind)
    )


def _convert(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind`, or a ProbingError naming `where`."""
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except ProbingError:
                continue
        raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {shown(value)}")
    if origin is Literal:
        if value not in get_args(kind):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {shown(value)}")
        items = [_convert(item, get_args(kind)[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {shown(value)}")
        key_kind, value_kind = get_args(kind)
        return {
            _convert(k, key_kind, f"{where}.{k}"): _convert(v, value_kind, f"{where}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProbingError(f"config field '{where}': expected true or false, got {shown(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProbingError(f"config field '{where}': expected an integer, got {shown(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProbingError(f"config field '{where}': expected a number, got {shown(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ProbingError(f"config field '{where}': expected a string, got {shown(value)}")
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise ProbingError(f"config field '{where}': expected a path, got {shown(value)}")
        return Path(value)
    raise ProbingError(f"config field '{where}': unsupported type {kind}")  # pragma: no cover


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown, missing, mistyped and out-of-range fields are named.
    Settings a config may not set (declared `config=False`) are unknown here."""
    if not isinstance(data, dict):
        raise ProbingError(f"config field '{where or 'top level'}': expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in config_fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProbingError(f"config field '{prefix}{unknown[0]}': unknown field (allowed: {', '.join(fields)})")
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ProbingError(f"config field '{prefix}{name}': missing")
    built = cls(**values)
    return check_settings(built, where=lambda f: f"config field '{prefix}{f.name}'")


def to_dict(value: Any) -> Any:
    """The YAML-ready form of a config (paths as strings, tuples as lists; settings a config may not set
    left out)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in config_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def check(config: Config, paths: bool = True) -> Config:
    """Cross-field checks: models named by experiments exist, each model has one source, tasks are known, search
    spaces are valid, report tables exist, and (with `paths`) the data the experiments need is given and exists."""
    from probing.report.tables import table_names

    check_device(config.device, "config field 'device'", present=paths)
    check_folder_name(config.name, "config field 'name'")  # names that become folders of the workspace
    _check_models(config)
    names = set()
    specs: dict[str, TaskSpec] = {}
    for index, experiment in enumerate(config.experiments):
        where = f"experiments[{index}]"
        check_folder_name(experiment.name, f"config field '{where}.name'")
        if experiment.name in names:
            raise ProbingError(f"config field '{where}.name': '{experiment.name}' is used twice")
        names.add(experiment.name)
        _check_experiment(config, index, experiment, specs)
    probes = {
        probe for experiment in config.experiments if experiment.modes != [ZERO_SHOT] for probe in experiment.probes
    }
    _check_train_scope(config.train, probes)
    for task, patience in config.train.patience.items():
        if patience < 1:
            raise ProbingError(f"config field 'train.patience.{task}': must be >= 1, got {patience}")
    if config.report.tables is not None:
        known = table_names(specs.values())
        for position, table in enumerate(config.report.tables):
            if table not in known:
                raise unknown_name("table", table, known, f"config field 'report.tables[{position}]'")
    if paths and config.workspace.exists() and not config.workspace.is_dir():
        raise ProbingError(f"config field 'workspace': {config.workspace} is a file, not a folder")
    if paths and config.data.demo is None:
        _check_data_paths(config.data, specs)
    return config


def _check_models(config: Config) -> None:
    """Each model's label is a folder name and it has exactly one source (a checkpoint or a tiny family)."""
    for label, entry in config.models.items():
        check_folder_name(label, "config field 'models'", kind="label")
        if (entry.model is None) == (entry.tiny is None):
            raise ProbingError(f"config field 'models.{label}': give exactly one of 'model' and 'tiny'")
        if entry.tiny is not None:
            from probing.models.tiny import tiny_family

            tiny_family(entry.tiny, f"config field 'models.{label}.tiny'")


def _check_experiment(config: Config, index: int, experiment: Experiment, specs: dict[str, TaskSpec]) -> None:
    """One experiment's fields, and their agreement with the config's models and extraction; its tasks' specs
    are added to `specs`."""
    where = f"experiments[{index}]"
    _resolve_tasks(experiment, where, specs)
    for position, probe in enumerate(experiment.probes):
        probe_kind(probe, f"config field '{where}.probes[{position}]'")
    for position, label in enumerate(experiment.models):
        if label not in config.models:
            raise ProbingError(f"config field '{where}.models[{position}]': no model '{label}' in 'models'")
        if ZERO_SHOT in experiment.modes and config.models[label].init != "pretrained":
            raise ProbingError(
                f"config field 'models.{label}.init': the mode {ZERO_SHOT} ({where}) needs the pretrained weights"
            )
    if isinstance(experiment.layers, list) and any(layer < 1 for layer in experiment.layers):
        raise ProbingError(f"config field '{where}.layers': layers start at 1")
    for name in ("tasks", "models", "modes", "probes", "layers"):  # a repeat would run the same search twice
        values = getattr(experiment, name)
        if isinstance(values, list) and len(set(values)) != len(values):
            raise ProbingError(f"config field '{where}.{name}': an entry is repeated")
        if isinstance(values, list) and not values:
            raise ProbingError(f"config field '{where}.{name}': empty")
    prepared = (experiment.zeroshot.text_preprocessing, config.extract.text_preprocessing)
    if ZERO_SHOT in experiment.modes and prepared[0] != prepared[1]:
        raise ProbingError(
            f"config field '{where}.zeroshot.text_preprocessing': '{prepared[0]}', while the probes' texts "
            f"('extract.text_preprocessing') are prepared '{prepared[1]}': answers compared with the probes "
            "must read the same texts (set both)"
        )
    search = experiment.search
    if search.final_seeds is not None and (
        not search.final_seeds or len(set(search.final_seeds)) != len(search.final_seeds)
    ):
        raise ProbingError(f"config field '{where}.search.final_seeds': at least one seed, each once")
    for task in experiment.tasks:
        search_space(experiment, index, task)
    _check_rigour(experiment, index, [specs[task] for task in experiment.tasks])
    _check_in_memory(experiment, index)
    for key in search.space:
        if key not in experiment.tasks and key not in {specs[t].name for t in experiment.tasks}:
            raise ProbingError(f"config field '{where}.search.space.{key}': not one of the experiment's tasks")


def _resolve_tasks(experiment: Experiment, where: str, specs: dict[str, TaskSpec]) -> None:
    """Each task the experiment names is known (its spec added to `specs`) and, for zero-shot, binary."""
    from probing.tasks import get_task

    for position, task in enumerate(experiment.tasks):
        try:
            specs[task] = get_task(task)
        except ProbingError as error:
            raise ProbingError(
                f"config field '{where}.tasks[{position}]': {str(error).removeprefix('--task: ')}"
            ) from None
        if ZERO_SHOT in experiment.modes and specs[task].head.kind != "binary":
            raise ProbingError(
                f"config field '{where}.tasks[{position}]': the mode {ZERO_SHOT} answers binary tasks; "
                f"{specs[task].name} is a {specs[task].head.kind} task"
            )


def _check_data_paths(data: DataConfig, specs: dict[str, TaskSpec]) -> None:
    """The data options the experiments' tasks read are given, and every one given exists."""
    needed: set[str] = set()
    for spec in specs.values():
        options = set(spec.reader.options)
        if "rcm" in options and data.rcm is None:  # RCM is built from RefCOCOg's files
            options = (options - {"rcm"}) | {"refs", "instances"}
        needed |= options
    for name in ("images", "refs", "instances", "vsr", "rcm"):
        value = getattr(data, name)
        if name in needed and value is None:
            raise ProbingError(f"config field 'data.{name}': missing (needed by the experiments' tasks)")
        if value is not None and not value.exists():
            raise ProbingError(f"config field 'data.{name}': {value}: not found")


def _check_train_scope(train: Any, probes: set[str]) -> None:
    """A `train` setting given (not at its default) that no experiment's probe reads is refused (`--hidden`
    with linear probes only ...); the pipeline passes it only to the probes it applies to."""
    from probing.core.settings import applies, default_of, info_of

    for settings_field in dataclasses.fields(train):
        info = info_of(settings_field)
        if info is None or info.applies is None or getattr(train, settings_field.name) == default_of(settings_field):
            continue
        if not any(applies(type(train), settings_field.name, probe=probe) for probe in sorted(probes)):
            raise ProbingError(
                f"config field 'train.{settings_field.name}': applies to {info.applies.what} only, not probes "
                f"{', '.join(sorted(probes))}"
            )


def _check_in_memory(experiment: Experiment, index: int) -> None:
    """`search.in_memory` feeds frozen searches (and their floors and controls) from the model; the online code
    reads stores."""
    if not experiment.search.in_memory:
        return
    where = f"config field 'experiments[{index}].search.in_memory'"
    if "frozen" not in experiment.modes:
        modes = ", ".join(experiment.modes)
        raise ProbingError(f"{where}: applies to frozen probes (--mode frozen) only, not modes {modes}")
    if experiment.mdl:
        raise ProbingError(f"{where}: the online code ('mdl: true') reads feature stores; leave one of them out")


def _check_rigour(experiment: Experiment, index: int, specs: list) -> None:
    """`controls` needs tasks with a control type; `mdl` a frozen mode, batched probes and heads with a code."""
    where = f"config field 'experiments[{index}]"
    bad = next((seed for seed in experiment.control_seeds if seed < 0), None)
    if bad is not None:
        raise ProbingError(f"{where}.control_seeds': must be >= 0, got {bad}")
    if not experiment.control_seeds or len(set(experiment.control_seeds)) != len(experiment.control_seeds):
        raise ProbingError(f"{where}.control_seeds': expected distinct seeds, got {experiment.control_seeds}")
    if experiment.control_search and not experiment.controls:
        raise ProbingError(f"{where}.control_search': needs 'controls: true'")
    if experiment.controls:
        for spec in specs:
            if spec.control_type is None:
                raise ProbingError(f"{where}.controls': task '{spec.name}' has no control type")
    if experiment.mdl:
        if "frozen" not in experiment.modes:
            raise ProbingError(f"{where}.mdl': the online code trains probes on stored features: needs mode 'frozen'")
        for probe in experiment.probes:
            if not probe_kind(probe).batched:
                raise ProbingError(
                    f"{where}.mdl': probe '{probe}' is not a batched probe (linear, swiglu2, swiglu4 ...)"
                )
        for spec in specs:
            if spec.head.uniform_bits is None:
                raise ProbingError(f"{where}.mdl': task '{spec.name}' has a {spec.head.kind} head, which has no code")


def search_space(experiment: Experiment, index: int, task: str):
    """A task's default space with the experiment's overrides (by task name or reference), checked; errors
    name the config field."""
    from probing.tasks import get_task

    spec = get_task(task)
    override = experiment.search.space.get(task, experiment.search.space.get(spec.name))
    if override is None:
        return spec.search_space
    key = task if task in experiment.search.space else spec.name
    where = f"config field 'experiments[{index}].search.space.{key}'"
    from probing.core.settings import applies
    from probing.tasks.search_space import SearchSpace

    for name in override:  # a dimension the task's head, or every probe of the experiment, would ignore
        if name not in {f.name for f in dataclasses.fields(SearchSpace)}:
            continue  # refused by `overridden`, naming the dimensions allowed
        if not applies(SearchSpace, name, head=spec.head.kind):
            context = f"a {spec.head.kind} task ('{spec.name}')"
        elif not any(applies(SearchSpace, name, probe=probe) for probe in experiment.probes):
            context = f"probes {', '.join(experiment.probes)}"
        else:
            continue
        field_name = f"config field 'experiments[{index}].search.space.{key}.{name}'"
        raise ProbingError(f"{field_name}: applies to {_scope_of(SearchSpace, name).what} only, not {context}")
    return spec.search_space.overridden(override, where)


def _scope_of(cls: type, name: str):
    from probing.core.settings import info_of

    return info_of(next(f for f in dataclasses.fields(cls) if f.name == name)).applies


def config_from_dict(data: Any, check_paths: bool = True) -> Config:
    """A config from what a YAML config file holds, as a dict (a Python caller's), validated as `load_config`
    validates a file (`check_paths=False`: structure only)."""
    return check(from_dict(Config, data), paths=check_paths)


INCLUDE = "include"  # a config's top-level key naming files whose sections it shares (`read_config_data`)


def read_config_data(path: Path | str, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its `include:` files merged in: each included file (a path, or a list of them,
    relative to the including file) gives the sections the file does not; a section both give is merged key by
    key, the including file winning. A missing file and an include cycle are one line naming the files."""
    from probing.core.yaml_files import read_yaml

    path = Path(path)
    prefix = f"{_including[-1]}: include: " if _including else ""
    data, _ = read_yaml(path, prefix)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProbingError(f"{path}: config field 'top level': expected a mapping, got {shown(data)}")
    includes = data.pop(INCLUDE, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ProbingError(
            f"{path}: config field '{INCLUDE}': expected a path or a list of paths, got {shown(includes)}"
        )
    chain = (*_including, path.resolve())
    merged: dict[str, Any] = {}
    for item in includes:
        included = path.parent / item
        if included.resolve() in chain:
            cycle = " -> ".join(str(step) for step in (*chain, included.resolve()))
            raise ProbingError(f"{path}: include: {item}: an include cycle ({cycle})")
        merged = _merged(merged, read_config_data(included, chain))
    return _merged(merged, data)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s keys: mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each `KEY=VALUE` of `overrides` set (`probing run --set`): KEY a dotted path of config fields (a
    number picks an entry of a list: `experiments.0.search.trials=3`), VALUE read as YAML (`[1, 2]`, `true`, a
    path). The result is validated as the file is, so an unknown field is named there."""
    from probing.core.yaml_files import parse_yaml

    data = copy.deepcopy(data)
    for override in overrides:
        key, equals, text = override.partition("=")
        where = f"--set {override}"
        if not equals or not key.strip():
            raise ProbingError(f"{where}: expected KEY=VALUE (e.g. search.trials=3)")
        value, _ = parse_yaml(text, where)
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            field_path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ProbingError(
                        f"{where}: config field '{field_path}': no entry {part} (the list has {len(node)})"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise ProbingError(f"{where}: config field '{'.'.join(parts[:depth])}' is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def limited(config: Config) -> Config:
    """A config with `data.limit` runs in `<workspace>/limit-<N>` (its report in `<report.out>-limit-<N>` when
    one is given): a smoke run's stores, searches and report never stand in a full run's folders."""
    limit = config.data.limit
    if limit is None:
        return config
    report = config.report
    if report.out is not None:
        report = dataclasses.replace(report, out=report.out.with_name(f"{report.out.name}-limit-{limit}"))
    return dataclasses.replace(config, workspace=config.workspace / f"limit-{limit}", report=report)


def load_config(
    path: Path | str, check_paths: bool = True, overrides: Sequence[str] = (), limit: int | None = None
) -> Config:
    """Read and validate a YAML experiment config (`check_paths=False`: structure only), its `include:` files
    merged in, `overrides` (`KEY=VALUE`, `probing run --set`) applied and `limit` (`probing run --limit`) set as
    `data.limit`; a limited config runs in its own folders (`limited`)."""
    path = Path(path)
    data = read_config_data(path)
    if limit is not None:
        overrides = [*overrides, f"data.limit={limit}"]
    data = apply_overrides(data, overrides)
    try:
        return limited(config_from_dict(data, check_paths))
    except ProbingError as error:
        raise ProbingError(f"{path}: {error}") from None
