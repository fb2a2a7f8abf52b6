"""From a model source (alias, Hub id, local folder or LAVIS `.pth`) to a ready `Resampler`.

- A registered alias (`blip2`, `blip2-coco`, `instructblip`) stands for its Hub id.
- A Hub id or a local folder in the Hugging Face format: config, tokenizer and image processor come from
  it; weights are read shard-selectively (never the language model). `HF_HUB_OFFLINE=1` is honoured by
  huggingface_hub: an offline run uses the local cache or fails with one line.
- A LAVIS `.pth` file: weights through its family's LAVIS key map; config, tokenizer and processor from
  `base` (a Hub id or folder, by default the family's checkpoint); keys the `.pth` lacks (a trimmed file
  without the ViT) are taken from `base`'s weights.
- `init="random"`: the same architecture with seeded random weights and no weight file read: the control
  baseline. What the config needs changed for it (the Q-Former families: the ViT's `initializer_range`) and
  what is drawn beyond the modules' own init are the family's (`Resampler.random_init_config`,
  `Resampler.init_random_weights`).

Which family reads a checkpoint is the registry's answer (`probing.models.registry`); everything family-shaped
(which keys to read, tokenizer checks, the default image processor, the layer count) is the family's
declaration (`probing.models.base`), so this module names no module of any family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from probing.core.errors import ProbingError
from probing.models.base import Resampler
from probing.models.checkpoint import CheckpointSource, tensors_sha256
from probing.models.lavis import lavis_to_hf, read_lavis_checkpoint, second_stage_problem
from probing.models.registry import BackendFamily, family_for_config, family_named, family_of_lavis, resolve_alias
from probing.models.source import ModelSource

log = logging.getLogger(__name__)


def load_config(source: CheckpointSource):
    from transformers import AutoConfig

    config_path = source.file("config.json")
    try:
        return AutoConfig.from_pretrained(config_path.parent)
    except (ValueError, OSError, KeyError) as error:
        raise ProbingError(f"{config_path}: not a transformers config ({error})") from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json", "added_tokens.json")
# A language model's tokenizer (Llama's SentencePiece model beside or instead of tokenizer.json)
LLM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(
    source: CheckpointSource, folder: str, files: tuple[str, ...] = TOKENIZER_FILES, what: str = "Q-Former tokenizer"
):
    """A tokenizer from a folder of a checkpoint ("": its root).

    Its files are fetched one by one through the checkpoint source and loaded from the resulting folder,
    so a Hub repo and a local folder take the same path (transformers' own Hub lookup with `subfolder`
    wants a config.json there when offline).
    """
    from transformers import AutoTokenizer

    prefix = f"{folder}/" if folder else ""
    config_file = source.file(f"{prefix}tokenizer_config.json")
    for name in files:
        source.file(prefix + name, required=False)
    try:
        return AutoTokenizer.from_pretrained(config_file.parent)
    except (OSError, ValueError) as error:
        raise ProbingError(f"{config_file.parent}: cannot load the {what} ({str(error).splitlines()[0]})") from None


def _load_tokenizer(source: CheckpointSource, family: BackendFamily):
    """The resampler's tokenizer from the family's tokenizer folder."""
    return load_tokenizer(source, family.tokenizer_folder or "")


def load_image_processor(source: CheckpointSource, config, resampler: type[Resampler]):
    """The checkpoint's own processor with the PIL backend (LAVIS-exact pixels), else the family's default
    (`resampler.default_image_processor`; BLIP's for the Q-Former families)."""
    from transformers import AutoImageProcessor

    processor_file = source.file("preprocessor_config.json", required=False)
    if processor_file is not None:
        try:
            return AutoImageProcessor.from_pretrained(processor_file.parent, backend="pil")
        except (OSError, ValueError) as error:
            raise ProbingError(f"{processor_file}: cannot load the image processor ({error})") from None
    processor = resampler.default_image_processor(config)
    log.info("%s: no preprocessor_config.json; using %r", source.name_or_path, processor)
    return processor


def _restore_buffers(module: torch.nn.Module) -> None:
    """Re-create non-persistent buffers left on the meta device (position ids are not in checkpoints)."""
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner_name, _, attribute = name.rpartition(".")
        if attribute != "position_ids":
            raise ProbingError(f"internal: buffer {name} is not in the checkpoint")  # pragma: no cover
        owner = module.get_submodule(owner_name)
        owner.register_buffer(attribute, torch.arange(buffer.shape[-1]).expand((1, -1)), persistent=False)


def _meta_resampler(cls: type[Resampler], config, tokenizer, processor, identity: dict[str, Any]) -> Resampler:
    """The architecture without storage (meta device): its keys tell what to read; `_fill` assigns them, so
    no time is spent on a random init that would be overwritten."""
    with torch.device("meta"):
        return cls(config, tokenizer, processor, identity)


def _fill(resampler: Resampler, expected: set[str], tensors: dict[str, torch.Tensor], where: str) -> Resampler:
    """Assign `tensors` to a meta resampler whose state-dict keys are `expected`; every key must be there."""
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        detail = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + (
            f"{', ' if missing else ''}{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""
        )
        raise ProbingError(f"{where}: weights do not fit the {resampler.family} architecture: {detail}")
    try:
        resampler.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ProbingError(f"{where}: weights do not fit the config ({str(error).splitlines()[-1].strip()})") from None
    _restore_buffers(resampler)
    return resampler


def _random_resampler(
    cls: type[Resampler], config, tokenizer, processor, identity: dict[str, Any], seed: int
) -> Resampler:
    """Seeded random weights, drawn on the CPU whatever the target device: CUDA's generator draws other
    numbers for the same seed, and the store identity (family, seed, config hash) names no device. The config
    was changed by `cls.random_init_config` before (it is part of the identity)."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        resampler = cls(config, tokenizer, processor, identity)
        resampler.init_random_weights()
    return resampler


def is_lavis_file(spec: str) -> bool:
    """A `.pth`/`.pt` spec is a LAVIS file unless it names a folder; a missing one must not become a Hub id."""
    return spec.endswith((".pth", ".pt")) and not Path(spec).is_dir()


def _lavis_family(state: dict[str, torch.Tensor], requested: str | None, spec: str) -> BackendFamily:
    problem = second_stage_problem(state, f"--model {spec}")
    if problem is not None:
        raise ProbingError(problem)
    if requested is not None:
        return family_named(requested)
    family = family_of_lavis(state)
    if family is None:
        raise ProbingError(f"--model {spec}: cannot tell the family from its keys; pass --family")
    return family


def load_resampler(
    source: ModelSource | str,
    *,
    device: str | torch.device = "cpu",
    vision_dtype: torch.dtype = torch.float32,
    latent_dtype: torch.dtype = torch.float32,
    qformer_dtype: torch.dtype | None = None,
    **fields: Any,
) -> Resampler:
    """Load a resampler (`source` may be a model string with `ModelSource` fields as keywords); its
    `.identity` holds what manifests record (source, revision, weights hash, init). `qformer_dtype` is an
    alias of `latent_dtype` (the resampler's dtype), kept for callers that use it."""
    if qformer_dtype is not None:
        latent_dtype = qformer_dtype
    if isinstance(source, str):
        source = ModelSource(model=source, **fields)
    source = source.required()
    device = torch.device(device)
    aliased, spec = resolve_alias(source.model)
    requested = source.family or (aliased.name if aliased is not None else None)
    if requested is not None:
        family_named(requested)  # an unknown --family is named before anything is read
    checkpoint, lavis_state, requested = _checkpoint_of(source, spec, requested)
    config = load_config(checkpoint)
    family = family_for_config(config, checkpoint.name_or_path, requested)
    cls = family.resampler
    tokenizer = None
    if family.reads_text:
        tokenizer = _load_tokenizer(checkpoint, family)
        cls.check_tokenizer(tokenizer, config, checkpoint.name_or_path)
    processor = load_image_processor(checkpoint, config, cls)
    identity: dict[str, Any] = {
        "family": family.name,
        "source": f"lavis:{Path(spec).resolve()}" if lavis_state is not None else checkpoint.name_or_path,
        "config_source": checkpoint.name_or_path,
        "revision": source.revision,
        "init": source.init,
    }
    if source.init == "random":
        identity |= {"init_seed": source.init_seed} | cls.random_init_config(config)
        resampler = _random_resampler(cls, config, tokenizer, processor, identity, source.init_seed)
    else:
        resampler = _meta_resampler(cls, config, tokenizer, processor, identity)
        expected = set(resampler.state_dict())
        if lavis_state is not None:
            tensors = _lavis_tensors(
                lavis_state, spec, family, config, checkpoint, source, expected, resampler.identity
            )
        else:
            tensors = checkpoint.read_tensors(cls.checkpoint_prefixes)
        resampler.identity["weights_sha256"] = tensors_sha256(tensors)
        resampler = _fill(resampler, expected, tensors, spec if lavis_state is not None else checkpoint.name_or_path)
    if checkpoint.commit is not None:
        resampler.identity["revision"] = checkpoint.commit  # the immutable commit the files came from
    resampler.set_dtypes(vision_dtype, latent_dtype)
    return resampler.to(device).eval()


def _checkpoint_of(
    source: ModelSource, spec: str, requested: str | None
) -> tuple[CheckpointSource, dict[str, torch.Tensor] | None, str | None]:
    """Where the config, tokenizer and weights come from: (checkpoint, the LAVIS `.pth` state when `spec` is one,
    the family asked for: a LAVIS file's own family)."""
    if is_lavis_file(spec):
        lavis_state = read_lavis_checkpoint(Path(spec))  # a missing file: "<spec>: file not found"
        lavis_family = _lavis_family(lavis_state, requested, spec)
        return (
            CheckpointSource(source.base or lavis_family.default_checkpoint, source.revision),
            lavis_state,
            lavis_family.name,
        )
    if source.base is not None:
        raise ProbingError("--base is only used with a LAVIS .pth checkpoint")
    if source.fill_from_base:
        raise ProbingError("--fill-from-base is only used with a LAVIS .pth checkpoint")
    return CheckpointSource(spec, source.revision), None, requested


def _lavis_tensors(
    lavis_state: dict[str, torch.Tensor],
    spec: str,
    family: BackendFamily,
    config: Any,
    checkpoint: CheckpointSource,
    source: ModelSource,
    expected: set[str],
    identity: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The resampler's tensors from a LAVIS `.pth` (renamed to the transformers keys), with what it lacks taken
    from the base checkpoint when `--fill-from-base` asks (recorded in `identity`)."""
    cls = family.resampler
    tensors, ignored = lavis_to_hf(lavis_state, family.lavis, config.vision_config.num_hidden_layers, where=spec)
    # Copied out of the memory-mapped file: the model must not depend on the file staying unchanged.
    tensors = {k: v.clone() for k, v in tensors.items() if k.startswith(cls.checkpoint_prefixes)}
    log.info(
        "%s: %d LAVIS keys not used by a resampler (e.g. %s)",
        spec,
        len(ignored),
        ", ".join(ignored[:3]) or "none",
    )
    # Only the keys the .pth lacks are read from the base (whole keys used as prefixes), and only when asked:
    # another checkpoint's tensors are never mixed in silently. Keys the base lacks too are reported as
    # missing by `_fill`.
    missing = sorted(expected - set(tensors))
    if missing and not source.fill_from_base:
        raise ProbingError(
            f"--model {spec}: {len(missing)} tensors the {family.title} resampler needs are missing from the "
            f"LAVIS checkpoint ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            f"--fill-from-base takes them from {checkpoint.name_or_path}"
        )
    wanted = set(missing) & set(checkpoint.weight_map()[0]) if missing else set()  # complete: no index read
    if wanted:
        tensors |= {k: v for k, v in checkpoint.read_tensors(sorted(wanted)).items() if k in wanted}
        filled = sorted(wanted)
        log.warning(
            "%s: %d tensors missing from the .pth taken from %s (--fill-from-base): %s",
            spec,
            len(filled),
            checkpoint.name_or_path,
            ", ".join(filled),
        )
        identity["filled_from_base"] = {"base": checkpoint.name_or_path, "tensors": len(filled)}
    return tensors


def resampler_layers(source: ModelSource | str, **fields: Any) -> int:
    """The number of probe-able layers of a model (`Resampler.layers_in`), from its config alone (no weights
    read)."""
    if isinstance(source, str):
        source = ModelSource(model=source, **fields)
    aliased, spec = resolve_alias(source.required().model)
    requested = source.family or (aliased.name if aliased is not None else None)
    if is_lavis_file(spec):
        family = _lavis_family(read_lavis_checkpoint(Path(spec)), requested, spec)  # keys only: memory-mapped
        spec, requested = source.base or family.default_checkpoint, family.name
    checkpoint = CheckpointSource(spec, source.revision)
    config = load_config(checkpoint)
    return family_for_config(config, checkpoint.name_or_path, requested).resampler.layers_in(config)


qformer_layers = resampler_layers  # the name callers used before the contract covered non-Q-Former families
