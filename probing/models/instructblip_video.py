"""InstructBLIP-Video (`InstructBlipVideoForConditionalGeneration`, model type `instructblipvideo`): the
InstructBLIP Q-Former of transformers' video model, an image read as a video of one frame. There is no separate
Hub repo of it; checkpoints converted to this class are read here, Salesforce's InstructBLIP repos (model type
`instructblip`) by the `instructblip` family, with the same latents for one frame.

transformers' video model folds the frames into the batch before the vision model and the Q-Former
(`[B, T, C, H, W] -> [B*T, C, H, W]`) and concatenates each frame's `num_query_tokens` latents only before the
language model; with T = 1 a frame is the image, so the per-layer latents are exactly the Q-Former's on that
image. The instruction is truncated on the left at 128 tokens, as InstructBLIP's; the Vicuna language model is
never built or read, the Q-Former's BERT tokenizer sits in `qformer_tokenizer/`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.instructblipvideo.modeling_instructblipvideo import (
    InstructBlipVideoQFormerModel,
    InstructBlipVideoVisionModel,
)

from probing.models.instructblip import InstructBlipResampler
from probing.models.qformer import randomise_query_tokens
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


class InstructBlipVideoResampler(InstructBlipResampler):
    family = "instructblip-video"

    def build_modules(self, config) -> None:
        self.vision_model = InstructBlipVideoVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipVideoQFormerModel(config.qformer_config)


def tiny_config(size: str, vocab_size: int):
    """`InstructBlipVideoForConditionalGeneration`'s config at tiny or real size (`probing.models.tiny`)."""
    from transformers import (
        InstructBlipVideoConfig,
        InstructBlipVideoQFormerConfig,
        InstructBlipVideoVisionConfig,
        LlamaConfig,
    )

    vision, qformer, llm = (
        (TINY_VISION, TINY_QFORMER, TINY_LLM) if size == "tiny" else (REAL_VISION, REAL_QFORMER, REAL_LLM)
    )
    return InstructBlipVideoConfig(
        vision_config=InstructBlipVideoVisionConfig(**vision).to_dict(),
        qformer_config=InstructBlipVideoQFormerConfig(vocab_size=vocab_size, **qformer).to_dict(),
        text_config=LlamaConfig(**llm).to_dict(),
        num_query_tokens=4 if size == "tiny" else 32,
        video_token_index=llm["vocab_size"] - 1,
    )


def _whole_model_class():
    from transformers import InstructBlipVideoForConditionalGeneration

    return InstructBlipVideoForConditionalGeneration


INSTRUCTBLIP_VIDEO = register_family(
    BackendFamily(
        name="instructblip-video",
        title="InstructBLIP-Video",
        resampler=InstructBlipVideoResampler,
        model_types=("instructblipvideo",),
        tokenizer_folder=QFORMER_TOKENIZER_FOLDER,
        tiny=TinyCheckpoint(config=tiny_config, model_class=_whole_model_class, randomise=randomise_query_tokens),
    )
)
