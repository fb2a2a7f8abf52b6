"""Settings declared once: a request dataclass says, per field, its help, its command-line option, whether a
config may set it, whether it belongs to an output's identity, and its valid range. Command-line options,
config sections, identities and range checks are all derived from that one declaration (the habit of
scikit-learn's declared parameters), so a setting cannot exist in one place and be missing in another.

    @dataclass(frozen=True)
    class ExtractionSettings:
        batch_size: int = setting(64, help="Images and texts per forward pass.", identity=True, low=1)

- `cli_parameters(cls)` gives the typer parameters of a command (`--batch-size`), `from_cli(cls, values)`
  builds and checks the object from them;
- configs build the same class with `probing.runs.config.from_dict`, which checks with the config field's name;
- `identity(obj)` is the part of an output's manifest the object decides (`omit_default` fields are left out
  while at their default, so outputs written before such a field existed keep their identity).

One message template for every range check: `<where>: must be >= <low>, got <value>`, where `<where>` is the
option (`--batch-size`) or the config field (`config field 'extract.batch_size'`).

A setting that means something only for some probes, task heads or modes declares where (`applies=Scope(...)`:
`--hidden` for probes with hidden layers, `--giou-scale` for box tasks, `--shuffled-features` for frozen
probes ...); `check_scope` refuses a value given where it would be silently ignored, with one template:
`<where>: applies to <scope> only, not <context>` (e.g. `--hidden: applies to probes with hidden layers
(swiglu2, swiglu4 ...) only, not --probe linear`). `SCOPED` lists every (class, field) so declared: the
table-driven test walks each of them through every command that takes it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from probing.core.errors import ProbingError, shown

_KEY = "probing.setting"


@dataclass(frozen=True)
class Scope:
    """Where a setting applies: the probes (a test of the probe's name), task heads and modes it means something
    for (None: any); `what` names them in the refusal."""

    what: str
    probe: Callable[[str], bool] | None = None
    head: tuple[str, ...] | None = None
    mode: tuple[str, ...] | None = None

    def refusal(self, probe: str | None = None, head: str | None = None, mode: str | None = None) -> str | None:
        """What in the context the setting does not apply to (e.g. "--probe linear"), or None where it applies."""
        if self.probe is not None and probe is not None and not self.probe(probe):
            return f"--probe {probe}"
        if self.head is not None and head is not None and head not in self.head:
            return f"a {head} task"
        if self.mode is not None and mode is not None and mode not in self.mode:
            return f"--mode {mode}"
        return None


@dataclass(frozen=True)
class SettingInfo:
    help: str
    identity: bool | str  # part of the identity of the outputs the request makes (a str: under that name)
    omit_default: bool  # identity: left out while equal to the default (added after outputs existed)
    cli: str | None  # the option, e.g. "--batch-size"; None: not on the command line
    config: bool  # may a config set it
    low: float | None  # value >= low
    above: float | None  # value > above
    finite: bool  # floats must be finite
    parse: Callable[[str], Any] | None  # command-line text -> value (lists given as "1,2,3")
    show_default: bool
    valid: Callable[[Any, str], None] | None = None  # refuses a value (a ProbingError naming `where`)
    high: float | None = None  # value <= high
    applies: Scope | None = None  # where the setting means something (`check_scope`)


def _probe_is(test: Callable[[Any], bool]) -> Callable[[str], bool]:
    """A test of a registered probe's kind (imported when asked: the probe registry imports nothing of this)."""

    def probe_test(probe: str) -> bool:
        from probing.probes.modules import probe_kind

        return test(probe_kind(probe))

    return probe_test


# The scopes settings declare (one place: a new probe kind or head is placed by its own declaration).
SGD_PROBES = Scope("SGD probes (linear, swiglu2, swiglu4 ...)", probe=_probe_is(lambda kind: kind.fit == "sgd"))
LOGREG_PROBE = Scope("the logreg probe", probe=_probe_is(lambda kind: kind.fit == "lbfgs"))
HIDDEN_PROBES = Scope(  # SwiGLU MLPs (more than one layer) and probes built by their own code take a width
    "probes with hidden layers (swiglu2, swiglu4 ...)",
    probe=_probe_is(lambda kind: kind.fit == "sgd" and (kind.build is not None or (kind.layers or 0) > 1)),
)
BOX_TASKS = Scope("box tasks", head=("box",))
FROZEN_MODE = Scope("frozen probes (--mode frozen)", mode=("frozen",))

SCOPED: list[tuple[type, str]] = []  # every (class, field) declared with `applies` (filled by `scoped`)


def scoped(cls: type) -> type:
    """Class decorator: registers the class's fields declared with `applies` in `SCOPED`."""
    SCOPED.extend((cls, f.name) for f, info in declared(cls) if info.applies is not None)
    return cls


def setting(
    default: Any = MISSING,
    *,
    help: str,
    identity: bool | str = False,
    omit_default: bool = False,
    cli: str | bool = True,
    config: bool = True,
    low: float | None = None,
    above: float | None = None,
    finite: bool = True,
    parse: Callable[[str], Any] | None = None,
    default_factory: Any = MISSING,
    show_default: bool = True,
    valid: Callable[[Any, str], None] | None = None,
    high: float | None = None,
    applies: Scope | None = None,
) -> Any:
    """A dataclass field with its declaration (see the module docstring)."""
    info = SettingInfo(
        help=help,
        identity=identity,
        omit_default=omit_default,
        cli=cli if isinstance(cli, str) else ("" if cli else None),
        config=config,
        low=low,
        above=above,
        finite=finite,
        parse=parse,
        show_default=show_default,
        valid=valid,
        high=high,
        applies=applies,
    )
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: info})


def info_of(field: dataclasses.Field) -> SettingInfo | None:
    return field.metadata.get(_KEY)


def declared(cls: type) -> list[tuple[dataclasses.Field, SettingInfo]]:
    """The declared fields of a settings dataclass, in declaration order."""
    return [(f, info_of(f)) for f in dataclasses.fields(cls) if info_of(f) is not None]


def option_name(field: dataclasses.Field) -> str | None:
    info = info_of(field)
    if info is None or info.cli is None:
        return None
    return info.cli or "--" + field.name.replace("_", "-")


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


def identity(obj: Any, only: Sequence[str] | None = None) -> dict[str, Any]:
    """{field: value} of the identity fields of `obj` (lists for tuples, paths as strings), in declaration order."""
    result = {}
    for field, info in declared(type(obj)):
        if not info.identity or (only is not None and field.name not in only):
            continue
        value = getattr(obj, field.name)
        if info.omit_default and value == default_of(field):
            continue
        result[info.identity if isinstance(info.identity, str) else field.name] = _plain(value)
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


# ------------------------------------------------------------------------------------------- checking


def literal_choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) annotation, else None."""
    origin = get_origin(kind)
    if origin is Literal:
        return get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(kind):
            if get_origin(option) is Literal:
                return get_args(option)
    return None


def check_value(value: Any, info: SettingInfo, kind: Any, where: str) -> None:
    """One field's declared constraints, with the one message template."""
    if value is None:
        return
    if info.valid is not None:
        info.valid(value, where)
    choices = literal_choices(kind)
    if choices is not None and value not in choices:
        raise ProbingError(f"{where}: unknown value {shown(value)} (choose {', '.join(map(str, choices))})")
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and info.finite and not math.isfinite(item):
            raise ProbingError(f"{where}: must be a finite number, got {item}")
        if info.low is not None and item < info.low:
            raise ProbingError(f"{where}: must be >= {_number(info.low)}, got {_number(item)}")
        if info.above is not None and not item > info.above:
            raise ProbingError(f"{where}: must be > {_number(info.above)}, got {_number(item)}")
        if info.high is not None and item > info.high:
            raise ProbingError(f"{where}: must be <= {_number(info.high)}, got {_number(item)}")


def applies(cls: type, name: str, **context: str | None) -> bool:
    """Whether `cls`'s field `name` means something in `context` (probe, head, mode): no `Scope` refuses it."""
    info = info_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    return info.applies is None or info.applies.refusal(**context) is None


def check_scope(
    obj: Any,
    *,
    probe: str | None = None,
    head: str | None = None,
    mode: str | None = None,
    where: Callable[[dataclasses.Field], str] | None = None,
) -> Any:
    """Refuse every field of `obj` given (not at its default) where its declared `Scope` says it means nothing:
    for this probe, task head or mode. `where(field)` names it (default: its option)."""
    for field, info in declared(type(obj)):
        if info.applies is None or getattr(obj, field.name) == default_of(field):
            continue
        context = info.applies.refusal(probe, head, mode)
        if context is not None:
            name = where(field) if where is not None else (option_name(field) or field.name)
            raise ProbingError(f"{name}: applies to {info.applies.what} only, not {context}")
    return obj


def check_as(cls: type, name: str, value: Any, where: str) -> None:
    """Check `value` against the declaration of `cls`'s field `name`, naming `where` (a value given under
    another option, e.g. each of `--seeds` against `Trial.seed`)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    check_value(value, info_of(field), typing.get_type_hints(cls)[name], where)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else str(value)


def check(obj: Any, where: Callable[[dataclasses.Field], str] | None = None) -> Any:
    """Check every declared field of `obj`; `where(field)` names it in messages (default: its option)."""
    hints = typing.get_type_hints(type(obj))
    for field, info in declared(type(obj)):
        name = where(field) if where is not None else (option_name(field) or field.name)
        check_value(getattr(obj, field.name), info, hints[field.name], name)
    return obj


# ------------------------------------------------------------------------------------------- command line


def _cli_type(kind: Any) -> Any:
    """The type typer parses: Literals as str (checked afterwards with the template), lists as text."""
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in get_args(kind) if k is not type(None)]
        inner = _cli_type(options[0]) if len(options) == 1 else str
        return inner | None
    if origin is Literal:
        return str
    if origin in (tuple, list):
        return str
    return kind


def cli_parameters(
    cls: type, *, exclude: Sequence[str] = (), optional: Sequence[str] = (), defaults: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """The typer parameters of `cls`'s command-line fields (`optional`: required fields given a None default)."""
    import typer

    hints = typing.get_type_hints(cls)
    parameters = []
    for field, info in declared(cls):
        flag = option_name(field)
        if flag is None or field.name in exclude:
            continue
        kind = _cli_type(hints[field.name])
        default = (defaults or {}).get(field.name, default_of(field))
        if field.name in optional:
            default = None
            if get_origin(kind) not in (typing.Union, types.UnionType):
                kind = kind | None
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        help_text = info.help
        choices = literal_choices(hints[field.name])
        if choices and "|" not in help_text:
            help_text = f"{' | '.join(map(str, choices))}. {help_text}"
        option = typer.Option(flag, help=help_text, show_default=info.show_default)
        parameters.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if default is MISSING else default,
                annotation=typing.Annotated[kind, option],
            )
        )
    return parameters


def from_cli(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """Build `cls` from a command's values, then check it: each field from `fixed`, else from the value of its
    name (option text such as "1,2,3" parsed), else, for a field that is itself a dataclass, built from the same
    values (None for an optional one whose options were all left out)."""
    return _checked_outside_in(_from_cli(cls, values, fixed))


def _from_cli(cls: type, values: dict[str, Any], fixed: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    arguments = {}
    for field in dataclasses.fields(cls):
        kind = _strip_none(hints[field.name])
        if field.name in fixed:
            arguments[field.name] = fixed[field.name]
        elif field.name in values:
            arguments[field.name] = _parsed(values[field.name], field, hints[field.name])
        elif dataclasses.is_dataclass(kind):
            given = any(values.get(f.name) is not None for f, _ in declared(kind) if option_name(f) is not None)
            arguments[field.name] = _from_cli(kind, values, {}) if given or kind is hints[field.name] else None
    return cls(**arguments)


def _checked_outside_in(obj: Any) -> Any:
    """Check `obj`'s own fields, then those of the dataclasses built from the same options: an option shared
    by both (a search's --seed is also its batch order's) is named as the command declares it."""
    check(obj)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _checked_outside_in(value)
    return obj


def _parsed(value: Any, field: dataclasses.Field, kind: Any) -> Any:
    info = info_of(field)
    if (
        info is not None
        and isinstance(value, str)
        and _cli_type(kind) in (str, str | None)
        and (info.parse is not None or get_origin(_strip_none(kind)) in (tuple, list))
    ):
        return (info.parse or _integers)(value, option_name(field))
    return value


def _strip_none(kind: Any) -> Any:
    if get_origin(kind) in (typing.Union, types.UnionType):
        options = [k for k in get_args(kind) if k is not type(None)]
        return options[0] if len(options) == 1 else kind
    return kind


def comma_separated(kind: type, count: int | None = None, what: str = "numbers") -> Callable[[str, str], tuple]:
    """A parser of "a,b,c" into a tuple of `kind` (`count`: exactly that many)."""

    def parse(text: str, option: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ProbingError(f"{option}: '{text}' is not a comma-separated list of {what}") from None
        if not values or (count is not None and len(values) != count):
            raise ProbingError(f"{option}: expected {count or 'some'} comma-separated {what}, got '{text}'")
        return values

    return parse


_integers = comma_separated(int, what="integers")


def command(
    app: Any, name: str, parameters: Sequence[inspect.Parameter], body: Callable[..., Any], help_text: str
) -> None:
    """Register `body(**values)` as command `name` with the given (derived) parameters."""

    def handler(**values: Any) -> Any:
        return body(**values)

    ordered = sorted(parameters, key=lambda p: p.default is not inspect.Parameter.empty)  # required first
    seen: set[str] = set()
    for parameter in ordered:
        if parameter.name in seen:
            raise ValueError(f"command {name}: parameter {parameter.name} declared twice")  # pragma: no cover
        seen.add(parameter.name)
    handler.__signature__ = inspect.Signature(ordered)
    handler.__annotations__ = {p.name: p.annotation for p in ordered}
    handler.__doc__ = help_text
    handler.__name__ = f"{name.replace('-', '_')}_command"
    app.command(name)(handler)


def config_section(name: str, cls: type, extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A frozen dataclass holding the config-settable fields of `cls` (same declarations) plus `extra`
    (name, type, field): a config section derived from a request's settings, never written twice."""
    hints = typing.get_type_hints(cls)
    copied = [
        (
            f.name,
            hints[f.name],
            dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
        )
        for f, info in declared(cls)
        if info.config
    ]
    return dataclasses.make_dataclass(name, [*copied, *extra], frozen=True, kw_only=True)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a dataclass a config may set (declared fields with config=False are left out)."""
    return [f for f in dataclasses.fields(cls) if info_of(f) is None or info_of(f).config]
