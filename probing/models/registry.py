"""Backend families, each registered once: its `Resampler` class, the Hugging Face model types it reads, its
hub aliases, where its tokenizer lives and its LAVIS key map. Loading (`probing.models.loading`) and every
stage find a family here; a family defined outside the package (a test file, a user's plug-in) registers
itself the same way and needs no edit to the package (docs/extending.md).

The built-in families (`BUILTIN_FAMILY_MODULES`) are imported the first time the registry is read, so that
the registry and `ModelSource` need neither torch nor transformers. One model type may serve several families:
each family says which configs it can run (`Resampler.config_problem`), and the one that can is chosen
(`--family` picks among several).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from probing.core.errors import ProbingError
from probing.core.registry import Registry


@dataclass(frozen=True)
class BackendFamily:
    name: str  # recorded in manifests ("family")
    title: str  # how reports name its models
    resampler: type  # a `Resampler` subclass: built as resampler(config, tokenizer, image_processor, identity)
    model_types: tuple[str, ...] = ()  # transformers `config.model_type` values it reads
    aliases: Mapping[str, str] = field(default_factory=dict)  # short names -> Hub ids
    default_checkpoint: str | None = None  # where a LAVIS .pth's config and tokenizer come from by default
    tokenizer_folder: str | None = ""  # the tokenizer's folder in a checkpoint ("": its root); None: reads no text
    lavis: Any = None  # a `LavisKeyMap`, for LAVIS .pth checkpoints of this family
    tiny: Any = None  # a `probing.models.tiny.TinyCheckpoint`: how tests and the demo write a local checkpoint

    @property
    def reads_text(self) -> bool:
        return self.tokenizer_folder is not None


def _check_family(name: str, family: BackendFamily, others: dict[str, BackendFamily]) -> None:
    if name != family.name:
        raise ProbingError(f"backend family '{family.name}' registered under another name ('{name}')")
    clash = next(
        (alias for other in others.values() for alias in family.aliases if alias in other.aliases),
        None,
    )
    if clash is not None:
        raise ProbingError(f"backend family '{family.name}': alias '{clash}' is already taken")
    if family.resampler.reads_text != family.reads_text:
        raise ProbingError(
            f"backend family '{family.name}': tokenizer_folder and {family.resampler.__name__}.reads_text disagree"
        )


# The built-in families, one module each, in the order listings and reports show them (the paper's two first).
# Each module registers its family when imported; the registry imports them the first time it is read, so that
# importing `probing.models` (or this registry) needs neither torch nor transformers.
BUILTIN_FAMILY_MODULES = (
    "probing.models.blip2",
    "probing.models.instructblip",
    "probing.models.idefics",
    "probing.models.idefics2",
    "probing.models.instructblip_video",
    "probing.models.kosmos2",
    "probing.models.llava",
)


def _import_builtin_families() -> None:
    from importlib import import_module

    for module in BUILTIN_FAMILY_MODULES:
        import_module(module)


# Installed packages may add families through the entry-point group `probing.backends` (a `BackendFamily`).
_FAMILIES: Registry[BackendFamily] = Registry(
    "family", "probing.backends", check=_check_family, builtins=_import_builtin_families
)


def register_family(family: BackendFamily, *, replace: bool = False) -> BackendFamily:
    """Add a family (once: registering the same family again is a no-op; another under its name is refused
    unless `replace`)."""
    return _FAMILIES.register(family.name, family, replace=replace)


def unregister_family(name: str) -> BackendFamily:
    """Take a family out again (a test that registered one for itself)."""
    return _FAMILIES.unregister(name)


def families() -> list[BackendFamily]:
    """Every registered family (the built-in ones register the first time the registry is read)."""
    return _FAMILIES.values()


def family_named(name: str, option: str = "--family") -> BackendFamily:
    return _FAMILIES.get(name, option)


def resolve_alias(model: str) -> tuple[BackendFamily | None, str]:
    """(family, Hub id) for a registered alias such as `blip2`; (None, model) for anything else."""
    for family in families():
        if model in family.aliases:
            return family, family.aliases[model]
    return None, model


def family_for_config(config: Any, where: str, requested: str | None = None) -> BackendFamily:
    """The family that runs a checkpoint's config: by model type, then by what each family accepts."""
    model_type = getattr(config, "model_type", None)
    candidates = [family for family in families() if model_type in family.model_types]
    if not candidates:
        known = sorted({t for family in families() for t in family.model_types})
        raise ProbingError(
            f"{where}: model_type '{model_type}' is not a registered backend (known: {', '.join(known)})"
        )
    if requested is not None:
        chosen = [family for family in candidates if family.name == requested]
        if not chosen:
            kinds = ", ".join(family.name for family in candidates)
            raise ProbingError(f"--family {requested}: {where} is a {kinds} checkpoint")
        candidates = chosen
    problems = {family.name: family.resampler.config_problem(config) for family in candidates}
    able = [family for family in candidates if problems[family.name] is None]
    if not able:
        raise ProbingError(f"{where}: {problems[candidates[0].name]}")
    if len(able) > 1:
        raise ProbingError(
            f"{where}: several families read model_type '{model_type}' "
            f"({', '.join(f.name for f in able)}); choose one with --family"
        )
    return able[0]


def family_of_lavis(state: Mapping[str, Any]) -> BackendFamily | None:
    """The family whose LAVIS key map recognises a `.pth` state dict, or None."""
    for family in families():
        if family.lavis is not None and family.lavis.recognises(state):
            return family
    return None
