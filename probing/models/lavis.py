"""LAVIS `.pth` checkpoints (e.g. blip2_pretrained.pth) mapped onto the transformers key names.

`salesforce-lavis` cannot be installed beside transformers 5 (its pins), so its checkpoints are read with
`torch.load(weights_only=True)` and renamed by rules that follow transformers' two conversion scripts
(`convert_blip_2_original_to_pytorch.py`, `convert_instructblip_original_to_pytorch.py`) and LAVIS's module
definitions (`blip2_qformer.py`, `Qformer.py`, `eva_vit.py`). The rules shared by every Q-Former family live
here; what differs between families (where the Q-Former's text embeddings go, which keys mark a family's
checkpoint) is each family's `LavisKeyMap`, registered with it. Nothing of LAVIS is imported.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probing.core.errors import ProbingError

# Keys that carry nothing a resampler needs: the Q-Former's MLM head, the ITC temperature, position-id
# buffers, EVA's relative-position buffers and the language models.
_DROPPED = re.compile(
    r"^(Qformer\.cls\.|temp$|llm_model\.|t5_model\.|opt_model\.)|position_ids$|relative_position_index$"
)
_HEADS = {
    "itm_head.": "itm_head.",
    "vision_proj.": "vision_projection.",
    "text_proj.": "text_projection.",
    "llm_proj.": "language_projection.",
    "t5_proj.": "language_projection.",
    "opt_proj.": "language_projection.",
}
# A second-stage BLIP-2 checkpoint (blip2_opt, blip2_t5) trains a language-model head and deletes the Q-Former's
# text embeddings and text FFNs: it has no image-text path to probe. InstructBLIP's keep their text embeddings.
_LANGUAGE_HEADS = {"opt_proj.": "OPT", "opt_model.": "OPT", "t5_proj.": "FlanT5", "t5_model.": "FlanT5"}
_TEXT_EMBEDDINGS = "Qformer.bert.embeddings.word_embeddings.weight"
_VISION_BLOCK = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.": "self_attn.projection.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}


def read_lavis_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS `.pth` (LAVIS wraps it as {'model': ...}).

    Memory-mapped: tensors are read from disk when used, so listing keys (to guess the family) costs little.
    Files in the pre-1.6 (non-zip) format cannot be mapped and are read whole.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    except Exception as error:  # weights_only refuses code; a corrupt zip raises RuntimeError
        raise ProbingError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProbingError(f"{path}: expected a state dict (optionally under 'model')")
    return state


def second_stage_problem(state: Mapping[str, Any], where: str) -> str | None:
    """Why `state` is not a checkpoint a resampler can read: a BLIP-2 second-stage one (None: it may be)."""
    heads = sorted({name for key in state for prefix, name in _LANGUAGE_HEADS.items() if key.startswith(prefix)})
    if not heads or _TEXT_EMBEDDINGS in state:
        return None
    return (
        f"{where}: a LAVIS BLIP-2 second-stage checkpoint ({' and '.join(heads)} language-model head, a Q-Former "
        "without text embeddings): use a first-stage one (blip2_pretrained.pth) or an InstructBLIP one"
    )


@dataclass(frozen=True)
class LavisKeyMap:
    """What one family's LAVIS checkpoints look like beside the shared rules."""

    marker_prefixes: tuple[str, ...]  # keys only this family's checkpoints carry
    text_embeddings: str  # transformers prefix of `Qformer.bert.embeddings.{word,position}_embeddings.`
    embedding_layernorm: str  # transformers prefix of `Qformer.bert.embeddings.LayerNorm.`

    def recognises(self, state: Mapping[str, Any]) -> bool:
        return any(key.startswith(self.marker_prefixes) for key in state)


def _qformer_key(rest: str, key_map: LavisKeyMap) -> str | None:
    """`Qformer.bert.<rest>` -> transformers name."""
    if rest.startswith("embeddings.LayerNorm."):
        return key_map.embedding_layernorm + rest[len("embeddings.LayerNorm.") :]
    for name in ("word_embeddings.", "position_embeddings."):
        if rest.startswith(f"embeddings.{name}"):
            return key_map.text_embeddings + rest[len("embeddings.") :]
    if rest.startswith("encoder.layer."):
        # attention.self.* and crossattention.self.* are *.attention.*; everything else keeps its name
        return "qformer." + re.sub(r"(attention|crossattention)\.self\.", r"\1.attention.", rest)
    return None


def _vision_key(rest: str, vision_layers: int) -> str | None:
    """`visual_encoder.<rest>` -> transformers name (None for EVA parts the HF model does not have)."""
    simple = {
        "cls_token": "vision_model.embeddings.class_embedding",
        "pos_embed": "vision_model.embeddings.position_embedding",
        "patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    }
    if rest in simple:
        return simple[rest]
    match = re.match(r"blocks\.(\d+)\.(.+)$", rest)
    if match is None or int(match[1]) >= vision_layers:  # LAVIS builds 39 of EVA's 40 blocks; extra are unused
        return None
    for lavis, hf in _VISION_BLOCK.items():
        if match[2].startswith(lavis):
            return f"vision_model.encoder.layers.{match[1]}.{hf}{match[2][len(lavis) :]}"
    return None


def lavis_to_hf(
    state: dict[str, torch.Tensor], family: LavisKeyMap, vision_layers: int, where: str = "LAVIS checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a LAVIS state dict to transformers keys with a family's key map; returns (mapped tensors, ignored
    LAVIS keys).

    EVA's separate q/v biases become one qkv bias with a zero key bias (EVA has none):
    `qkv.bias = cat(q_bias, zeros_like(v_bias), v_bias)`. A q bias without its v bias cannot be converted
    (ProbingError naming `where` and the missing key); a v bias without its q bias is ignored, as are the
    biases of blocks the model does not have.
    """
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        target: str | None = None
        if _DROPPED.search(key):
            ignored.append(key)
            continue
        if key == "query_tokens":
            target = "query_tokens"
        elif key.startswith("ln_vision."):
            target = "vision_model.post_layernorm." + key[len("ln_vision.") :]
        elif key.startswith("visual_encoder."):
            rest = key[len("visual_encoder.") :]
            bias = re.match(r"blocks\.(\d+)\.attn\.(q|v)_bias$", rest)
            if bias is not None:
                q_key, v_key = (f"visual_encoder.blocks.{bias[1]}.attn.{name}_bias" for name in ("q", "v"))
                if int(bias[1]) >= vision_layers or (bias[2] == "v" and q_key not in state):
                    ignored.append(key)
                elif bias[2] == "q":
                    if v_key not in state:
                        raise ProbingError(f"{where}: missing key '{v_key}' (needed with '{key}')")
                    v_bias = state[v_key]
                    mapped[f"vision_model.encoder.layers.{bias[1]}.self_attn.qkv.bias"] = torch.cat(
                        [tensor, torch.zeros_like(v_bias), v_bias]
                    )
                continue  # a v bias with its q bias was converted with it
            target = _vision_key(rest, vision_layers)
        elif key.startswith("Qformer.bert."):
            target = _qformer_key(key[len("Qformer.bert.") :], family)
        else:
            target = next((hf + key[len(lavis) :] for lavis, hf in _HEADS.items() if key.startswith(lavis)), None)
        if target is None:
            ignored.append(key)
        else:
            mapped[target] = tensor
    return mapped, ignored
