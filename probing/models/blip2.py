"""BLIP-2 first stage (`Blip2ForImageTextRetrieval`, e.g. Salesforce/blip2-itm-vit-g).

Queries and text attend jointly, as in its image-text-matching path: `[queries ; text]` through one
self-attention per layer, with `query_length` set so that only the query slice goes through cross-attention
and the query FFN (without it the text tokens would be treated as queries). Text is truncated on the right
at 32 tokens (LAVIS's max_txt_len for this model).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings, Blip2VisionModel

from probing.models.lavis import LavisKeyMap
from probing.models.qformer import QFormerResampler, randomise_query_tokens
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import REAL_QFORMER, REAL_VISION, TINY_QFORMER, TINY_VISION, TinyCheckpoint


class Blip2Resampler(QFormerResampler):
    family = "blip2"
    max_text_tokens = 32
    truncation_side = "right"
    checkpoint_prefixes = ("vision_model.", "query_tokens", "qformer.", "embeddings.", "itm_head.")
    frozen_modules = ("vision_model", "itm_head")  # the ITM head is kept for checks, never trained

    @classmethod
    def config_problem(cls, config) -> str | None:
        if not getattr(config.qformer_config, "use_qformer_text_input", False):
            # Stage-2 checkpoints (OPT, FlanT5) have no text FFN in the Q-Former: the ITM path cannot run.
            return (
                "the BLIP-2 checkpoint has no Q-Former text path (use_qformer_text_input is false): use a "
                "first-stage image-text-matching checkpoint such as Salesforce/blip2-itm-vit-g"
            )
        return None

    def build_modules(self, config) -> None:
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.itm_head = nn.Linear(config.qformer_config.hidden_size, 2)

    def qformer_hidden_states(self, image_embeds, input_ids, attention_mask):
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        output = self.qformer(
            query_embeds=embeds,
            query_length=self.num_query_tokens,
            attention_mask=self.query_mask(attention_mask),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self.image_attention_mask(image_embeds),
            output_hidden_states=True,
        )
        return output.hidden_states

    def itm_logits(self, last_query_states: torch.Tensor) -> torch.Tensor:
        """The model's ITM logits from last-layer query states: `itm_head(...)` averaged over queries."""
        return self.itm_head(last_query_states.to(self.itm_head.weight.dtype)).mean(dim=1)


def tiny_config(size: str, vocab_size: int):
    """`Blip2ForImageTextRetrieval`'s config at tiny or real size (`probing.models.tiny`)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vision, qformer = (TINY_VISION, TINY_QFORMER) if size == "tiny" else (REAL_VISION, REAL_QFORMER)
    return Blip2Config(
        vision_config=Blip2VisionConfig(**vision).to_dict(),
        qformer_config=Blip2QFormerConfig(use_qformer_text_input=True, vocab_size=vocab_size, **qformer).to_dict(),
        num_query_tokens=4 if size == "tiny" else 32,
        image_text_hidden_size=16 if size == "tiny" else 256,
    )


def _itm_model_class():
    from transformers import Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval


BLIP2 = register_family(
    BackendFamily(
        name="blip2",
        title="BLIP-2",
        resampler=Blip2Resampler,
        model_types=("blip-2",),
        aliases={"blip2": "Salesforce/blip2-itm-vit-g", "blip2-coco": "Salesforce/blip2-itm-vit-g-coco"},
        default_checkpoint="Salesforce/blip2-itm-vit-g",
        tokenizer_folder="",
        # A stage-1 LAVIS checkpoint carries the ITM head; its text embeddings sit beside the Q-Former, and the
        # BERT embedding LayerNorm becomes the Q-Former's top-level `layernorm`.
        lavis=LavisKeyMap(
            marker_prefixes=("itm_head.",), text_embeddings="embeddings.", embedding_layernorm="qformer.layernorm."
        ),
        tiny=TinyCheckpoint(config=tiny_config, model_class=_itm_model_class, randomise=randomise_query_tokens),
    )
)
