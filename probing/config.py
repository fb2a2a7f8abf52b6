"""Experiment configs: YAML <-> dataclasses, validated with messages that name the field.

A config says where the data and models are, which experiments to run (task x model x mode x layer x
probe, each a search), and which tables the report shows. Relative paths are taken from the directory
`probing run` is started in. Every stage writes under `workspace` and is reused when its manifest matches,
so configs that share a workspace share their artifacts (table2.yaml reuses table1.yaml's runs).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from probing.errors import ProbingError

Task = Literal["refcocog", "vsr", "rcm"]
Mode = Literal["frozen", "unfrozen"]
ProbeName = Literal["linear", "swiglu2", "swiglu4"]
TableName = Literal["table1", "table2", "table3", "table4", "table5", "per_layer", "categories_refcocog",
                    "categories_rcm"]


@dataclass(frozen=True)
class ModelEntry:
    """A model under a report label: a registry name, Hub id, local folder or LAVIS .pth (`model`), or a tiny
    random checkpoint of a family written into the workspace (`tiny`)."""

    model: str | None = None
    tiny: Literal["blip2", "instructblip"] | None = None
    revision: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    base: str | None = None  # LAVIS .pth only: where config and tokenizer come from


@dataclass(frozen=True)
class DemoData:
    refcocog_images: int = 300
    vsr_images: int = 240
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    images: Path | None = None  # COCO root: train2014/ (RefCOCOg, RCM); trainval2017/ or train2017/ + val2017/
    refs: Path | None = None  # RefCOCOg refs(umd).p
    instances: Path | None = None  # RefCOCOg instances.json
    vsr: Path | None = None  # folder with train/dev/test.jsonl
    rcm: Path | None = None  # a build-rcm output; built into the workspace when absent
    rcm_seed: int = 0
    demo: DemoData | None = None  # generate the demo dataset into the workspace instead


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = 64
    shard_size: int = 1024
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    vision_dtype: Literal["float16", "bfloat16", "float32"] | None = None
    qformer_dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    compile_vision: bool = False
    workers: int | None = None


@dataclass(frozen=True)
class SpaceConfig:
    """Overrides of the paper's search space for one task (absent fields keep the paper's values)."""

    lr: list[float] | None = None  # [low, high], log-uniform
    epochs: list[int] | None = None
    giou_scale: list[float] | None = None
    l1_scale: list[float] | None = None


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 10
    batch: int = 8
    seed: int = 0
    final_seeds: list[int] = field(default_factory=lambda: [0])  # the best trial is evaluated with these
    storage: str | None = None
    space: dict[Task, SpaceConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    unfrozen_batch_size: int = 128
    hidden: int = 768
    patience: dict[Task, int] = field(default_factory=lambda: {"rcm": 10})


@dataclass(frozen=True)
class Experiment:
    name: str
    tasks: list[Task]
    models: list[str]
    modes: list[Mode] = field(default_factory=lambda: ["frozen"])
    layers: list[int] | Literal["last", "all"] = "last"
    probes: list[ProbeName] = field(default_factory=lambda: ["linear"])
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass(frozen=True)
class ReportConfig:
    tables: list[TableName] | None = None  # None: every table the runs allow
    compare_paper: bool = False
    out: Path | None = None  # default: <workspace>/report-<name>


@dataclass(frozen=True)
class Config:
    name: str
    workspace: Path
    models: dict[str, ModelEntry]
    experiments: list[Experiment]
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
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
    if origin is list:
        return f"a list of {_type_name(get_args(kind)[0])}"
    if origin is dict:
        return f"a mapping to {_type_name(get_args(kind)[1])}"
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}.get(
        kind, str(kind))


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
        raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(kind):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {value!r}")
        return [_convert(item, get_args(kind)[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProbingError(f"config field '{where}': expected {_type_name(kind)}, got {value!r}")
        key_kind, value_kind = get_args(kind)
        return {_convert(k, key_kind, f"{where}.{k}"): _convert(v, value_kind, f"{where}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProbingError(f"config field '{where}': expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProbingError(f"config field '{where}': expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProbingError(f"config field '{where}': expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ProbingError(f"config field '{where}': expected a string, got {value!r}")
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise ProbingError(f"config field '{where}': expected a path, got {value!r}")
        return Path(value)
    raise ProbingError(f"config field '{where}': unsupported type {kind}")  # pragma: no cover


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown, missing and mistyped fields are named."""
    if not isinstance(data, dict):
        raise ProbingError(f"config field '{where or 'top level'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
    return cls(**values)


def to_dict(value: Any) -> Any:
    """The YAML-ready form of a config (paths as strings)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def check(config: Config, paths: bool = True) -> Config:
    """Cross-field checks: models named by experiments exist, each model has one source, and (with `paths`)
    the data the experiments need is given and exists."""
    for label, entry in config.models.items():
        if (entry.model is None) == (entry.tiny is None):
            raise ProbingError(f"config field 'models.{label}': give exactly one of 'model' and 'tiny'")
    names = set()
    for index, experiment in enumerate(config.experiments):
        where = f"experiments[{index}]"
        if experiment.name in names:
            raise ProbingError(f"config field '{where}.name': '{experiment.name}' is used twice")
        names.add(experiment.name)
        for position, label in enumerate(experiment.models):
            if label not in config.models:
                raise ProbingError(f"config field '{where}.models[{position}]': no model '{label}' in 'models'")
        if isinstance(experiment.layers, list) and any(layer < 1 for layer in experiment.layers):
            raise ProbingError(f"config field '{where}.layers': layers start at 1")
        for name in ("tasks", "models", "modes", "probes", "layers"):  # a repeat would run the same search twice
            values = getattr(experiment, name)
            if isinstance(values, list) and len(set(values)) != len(values):
                raise ProbingError(f"config field '{where}.{name}': an entry is repeated")
            if isinstance(values, list) and not values:
                raise ProbingError(f"config field '{where}.{name}': empty")
        search = experiment.search
        _at_least(search.trials, 1, f"{where}.search.trials")
        _at_least(search.batch, 1, f"{where}.search.batch")
        _at_least(search.seed, 0, f"{where}.search.seed")
        if not search.final_seeds or len(set(search.final_seeds)) != len(search.final_seeds):
            raise ProbingError(f"config field '{where}.search.final_seeds': at least one seed, each once")
        for seed in search.final_seeds:
            _at_least(seed, 0, f"{where}.search.final_seeds")
    for name in ("batch_size", "shard_size"):
        _at_least(getattr(config.extract, name), 1, f"extract.{name}")
    if config.extract.workers is not None:
        _at_least(config.extract.workers, 0, "extract.workers")
    for name in ("batch_size", "unfrozen_batch_size", "hidden"):
        _at_least(getattr(config.train, name), 1, f"train.{name}")
    for task, patience in config.train.patience.items():
        _at_least(patience, 1, f"train.patience.{task}")
    tasks = {task for experiment in config.experiments for task in experiment.tasks}
    data = config.data
    if paths and data.demo is None:
        needed = {"images": bool(tasks)}
        if tasks & {"refcocog"} or ("rcm" in tasks and data.rcm is None):
            needed |= {"refs": True, "instances": True}
        if "vsr" in tasks:
            needed["vsr"] = True
        for name, required in needed.items():
            value = getattr(data, name)
            if required and value is None:
                raise ProbingError(f"config field 'data.{name}': missing (needed by the experiments' tasks)")
            if value is not None and not value.exists():
                raise ProbingError(f"config field 'data.{name}': {value}: not found")
        if data.rcm is not None and not data.rcm.exists():
            raise ProbingError(f"config field 'data.rcm': {data.rcm}: not found")
    return config


def _at_least(value: int, low: int, where: str) -> None:
    if value < low:
        raise ProbingError(f"config field '{where}': must be >= {low}, got {value}")


def load_config(path: Path | str, check_paths: bool = True) -> Config:
    """Read and validate a YAML experiment config (`check_paths=False`: structure only)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ProbingError(f"{path}: {line}not valid YAML ({getattr(error, 'problem', error)})") from None
    try:
        return check(from_dict(Config, data), paths=check_paths)
    except ProbingError as error:
        raise ProbingError(f"{path}: {error}") from None
