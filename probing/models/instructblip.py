"""InstructBLIP (e.g. Salesforce/instructblip-vicuna-7b): vision model + Q-Former + query tokens only.

The Q-Former owns its text embeddings and reads the instruction text beside the queries; it infers the
query length from `query_embeds`. The instruction is truncated on the left at 128 tokens (LAVIS's
max_txt_len, `truncation_side="left"`). The Vicuna language model is never built or read; InstructBLIP
repos keep the Q-Former's BERT tokenizer in `qformer_tokenizer/`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel, InstructBlipVisionModel

from probing.models.lavis import LavisKeyMap
from probing.models.qformer import QFormerResampler, randomise_query_tokens
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import (
    QFORMER_TOKENIZER_FOLDER,
    REAL_LLM,
    REAL_QFORMER,
    REAL_VISION,
    TINY_LLM,
    TINY_QFORMER,
    TINY_VISION,
    TinyCheckpoint,
)


class InstructBlipResampler(QFormerResampler):
    family = "instructblip"
    max_text_tokens = 128
    truncation_side = "left"
    reads_instruction = True  # LAVIS's InstructBLIP gives its Q-Former the prompt (instruction) text
    checkpoint_prefixes = ("vision_model.", "query_tokens", "qformer.")

    def build_modules(self, config) -> None:
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel(config.qformer_config)

    def qformer_hidden_states(self, image_embeds, input_ids, attention_mask):
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        output = self.qformer(
            input_ids=input_ids,
            attention_mask=self.query_mask(attention_mask),
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self.image_attention_mask(image_embeds),
            output_hidden_states=True,
        )
        return output.hidden_states


def tiny_config(size: str, vocab_size: int):
    """`InstructBlipForConditionalGeneration`'s config (with a small or Llama-7B-sized Llama) at tiny or real size
    (`probing.models.tiny`)."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    vision, qformer, llm = (
        (TINY_VISION, TINY_QFORMER, TINY_LLM) if size == "tiny" else (REAL_VISION, REAL_QFORMER, REAL_LLM)
    )
    return InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**vision).to_dict(),
        qformer_config=InstructBlipQFormerConfig(vocab_size=vocab_size, **qformer).to_dict(),
        text_config=LlamaConfig(**llm).to_dict(),
        num_query_tokens=4 if size == "tiny" else 32,
        image_token_index=llm["vocab_size"] - 1,
    )


def _whole_model_class():
    from transformers import InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration


INSTRUCTBLIP = register_family(
    BackendFamily(
        name="instructblip",
        title="InstructBLIP",
        resampler=InstructBlipResampler,
        model_types=("instructblip",),
        aliases={"instructblip": "Salesforce/instructblip-vicuna-7b"},
        default_checkpoint="Salesforce/instructblip-vicuna-7b",
        tokenizer_folder=QFORMER_TOKENIZER_FOLDER,
        # A LAVIS InstructBLIP checkpoint carries the LLM projection; its Q-Former owns its text embeddings.
        lavis=LavisKeyMap(
            marker_prefixes=("llm_proj.", "t5_proj."),
            text_embeddings="qformer.embeddings.",
            embedding_layernorm="qformer.embeddings.layernorm.",
        ),
        tiny=TinyCheckpoint(
            config=tiny_config, model_class=_whole_model_class, randomise=randomise_query_tokens, llm_tokenizer=True
        ),
    )
)
