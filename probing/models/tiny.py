"""Checkpoints of the real architectures written locally, in the Hugging Face format, with no download.

No machine here reaches a model hub, so the loading code is proven on checkpoints that this module writes
with `save_pretrained`: the same classes, keys, shard index and tokenizer files as the Hub repos, at a tiny
size and with random weights. Two uses:

- `size="tiny"` with weights: tests and `probing demo`. BLIP-2 is a `Blip2ForImageTextRetrieval`;
  InstructBLIP is a whole `InstructBlipForConditionalGeneration` with a small Llama, sharded so that some
  shards hold only LLM weights and one mixes Q-Former and LLM tensors, as on the Hub.
- `size="real"` without weights: the real configs (ViT-g, 39 layers at 224 px; a 12-layer Q-Former of width
  768 with cross-attention every other layer; 32 queries), a BERT-style tokenizer with
  the real vocabulary size and the real image processor; `--init random` builds the real-size model from it
  (benchmarks on a GPU, no download needed).

The tokenizer vocabulary is generated (we cannot ship bert-base-uncased's): special tokens at BERT's ids,
whole words used by the demo data and common English, then single characters and `##` pieces so that
any text tokenizes. `[DEC]` is added as the BOS token, as LAVIS and the HF conversion do.

InstructBLIP's language model gets a tokenizer of its own in the checkpoint's root, as on the Hub (the
Q-Former's stays in `qformer_tokenizer/`): a word-level tokenizer (the `tokenizers` library) over exactly the
LLM's vocabulary, with Llama's special tokens at Llama's ids (`<unk>` 0, `<s>` 1, `</s>` 2), a BOS token
before every text, left padding, and `<image>` at the config's `image_token_index`. It is enough for the
zero-shot prompt (`probing zeroshot`) to run the real classes end to end; words outside it read as `<unk>`.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probing.core.artifacts import match_umask
from probing.core.errors import ProbingError
from probing.core.records import StageResult

QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"  # where InstructBLIP repos keep the Q-Former's BERT tokenizer
LLM_TOKENIZER_FILE = "tokenizer_config.json"  # in an InstructBLIP checkpoint's root: its LLM's tokenizer
REAL_VOCAB_SIZE = 30522  # bert-base-uncased, before [DEC]

_WORDS = """
a an the of in on at to is are was be by with and or that this it its which who what where there here
photo image picture part phrase refers cell region top bottom left right middle center centre side corner
edge small big large tiny huge little red green blue yellow purple orange black white gray grey brown pink
circle ring square triangle diamond cross star shape object thing one two three first second third last
above below under beneath behind front near far from next beside between inside outside touching
contains consists part has as adjacent alongside attached back ahead against off past toward down up away
along around into across through facing parallel perpendicular over close within surrounding out beyond
opposite enclosed among connected detached man woman person people dog cat horse car bus table chair
couch bed cup bowl plate pizza cake tv laptop phone book clock vase standing sitting holding wearing
""".split()


def _vocabulary(size: int | None) -> list[str]:
    """A WordPiece vocabulary: BERT's special-token ids, words, characters, `##` pieces, then fillers."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if size is None:  # tiny: no unused block, the special tokens first (ids 0..4), [PAD] at 0 as the Q-Former's pad id
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    for token in characters + [f"##{c}" for c in string.ascii_lowercase + string.digits] + sorted(set(_WORDS)):
        if token not in tokens:
            tokens.append(token)
    if size is not None:
        tokens += [f"[unused{i}]" for i in range(99, 99 + size - len(tokens))]
        assert len(tokens) == size
    return tokens


def write_tokenizer(out: Path, real_size: bool):
    """A BERT WordPiece tokenizer with `[DEC]` added (len = Q-Former vocab_size), saved to `out`."""
    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(_vocabulary(REAL_VOCAB_SIZE if real_size else None)) + "\n")
    # `vocab=` and not `vocab_file=`: transformers 5 silently ignores the latter (a 5-token vocabulary results).
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    assert tokenizer.pad_token_id == 0
    tokenizer.save_pretrained(out)
    return tokenizer


# The LLM tokenizer's words: the zero-shot prompt's and answers' first, then the demo data's.
_PROMPT_WORDS = """
. , ' " : ? ! ( ) - question short answer based on image is this statement true false yes no
""".split()


def write_llm_tokenizer(out: Path, vocab_size: int, image_token_index: int):
    """A word-level tokenizer over exactly `vocab_size` ids for a Llama language model, saved to `out` (see
    the module docstring); returns it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama's ids for the first three (LlamaConfig's bos 1, eos 2)
    words = list(dict.fromkeys(_PROMPT_WORDS + _WORDS))
    ordinary = vocab_size - len(specials) - 1  # one id left for <image>
    words = (words + [f"[unused{i}]" for i in range(max(0, ordinary - len(words)))])[:ordinary]
    tokens = specials + words
    tokens.insert(image_token_index, "<image>")
    assert len(tokens) == vocab_size and tokens[image_token_index] == "<image>"
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    # BERT's normaliser: lower case, control characters dropped (so a text of them tokenizes to nothing)
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(["<s>", "</s>", "<unk>", "<pad>", "<image>"])  # matched whole, at their ids
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.save_pretrained(out)
    return tokenizer


# The tiny and real sizes every Q-Former family shares (the real ones: the published checkpoints').
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    initializer_range=0.02,
)
TINY_QFORMER = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    cross_attention_frequency=2,
    max_position_embeddings=160,
)
TINY_LLM = dict(
    vocab_size=100,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
REAL_VISION = dict(image_size=224)  # the rest are the configs' defaults: ViT-g, 39 layers, 1408 wide
REAL_QFORMER: dict = {}  # 12 layers, 768 wide, cross-attention every 2nd layer
REAL_LLM = dict(vocab_size=32001)  # Llama-7B defaults; never instantiated by probing
SIZES = ("tiny", "real")


@dataclass(frozen=True)
class TinyCheckpoint:
    """How a family's local checkpoints are written (a family declares one in its file, `BackendFamily.tiny`).

    - `config(size, vocab_size)`: the transformers config at `size` ("tiny" or "real"), its text vocabulary
      `vocab_size` (that of the tokenizer written for it);
    - `model_class()`: the transformers class whose `save_pretrained` writes the checkpoint (the whole model,
      language model included, as on the Hub);
    - `randomise(model)`: what to draw after transformers' init (e.g. query tokens, zeros by default);
    - `llm_tokenizer`: whether the checkpoint's root also gets a language-model tokenizer (InstructBLIP's).
    """

    config: Callable[[str, int], Any]
    model_class: Callable[[], type]
    randomise: Callable[[Any], None] | None = None
    llm_tokenizer: bool = False


def tiny_family(name: str, option: str | None = None):
    """The registered family `name` and its `TinyCheckpoint`; a family without one is refused like an unknown
    name, listing those that have one."""
    from probing.core.registry import unknown_name
    from probing.models.registry import families

    able = {family.name: family for family in families() if family.tiny is not None}
    if name not in able:
        raise unknown_name("model family with a tiny checkpoint", name, able, option)
    return able[name], able[name].tiny


def build_config(family: str, size: str, vocab_size: int):
    """The family's config at tiny or real size (the real size: the published checkpoints')."""
    _, tiny = tiny_family(family)
    if size not in SIZES:
        raise ProbingError(f"unknown checkpoint size '{size}' (choose tiny or real)")
    return tiny.config(size, vocab_size)


def write_checkpoint(
    out: Path, family: str, size: str = "tiny", weights: bool = True, seed: int = 0, max_shard_size: str = "40KB"
) -> Path:
    """Write a Hugging Face checkpoint folder for `family`; see the module docstring. Returns `out`."""
    from transformers.utils import logging as hf_logging

    backend, tiny = tiny_family(family)
    if size == "real" and weights:
        raise ProbingError("real-size checkpoints are written without weights (use --init random with them)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / backend.tokenizer_folder if backend.tokenizer_folder else out
    tokenizer = write_tokenizer(tokenizer_dir, real_size=size == "real")
    config = build_config(family, size, vocab_size=len(tokenizer))
    backend.resampler.default_image_processor(config).save_pretrained(out)
    if tiny.llm_tokenizer:
        write_llm_tokenizer(out, config.text_config.vocab_size, config.image_token_index)
    if not weights:
        config.save_pretrained(out)
        return out
    torch.manual_seed(seed)
    model = tiny.model_class()(config).eval()
    if tiny.randomise is not None:
        with torch.no_grad():
            tiny.randomise(model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    match_umask(out)  # save_pretrained writes its shards through safetensors, 0600 whatever the umask
    return out


def ensure_checkpoint(out: Path, family: str, seed: int = 0) -> StageResult[Path]:
    """A tiny checkpoint at `out`, written once (atomically) and reused while its manifest matches."""
    from probing.core.artifacts import existing_output_matches, staged_directory, write_json
    from probing.core.locks import one_writer

    out = Path(out)
    identity = {"kind": "tiny-checkpoint", "family": family, "seed": seed, "size": "tiny"}
    with one_writer(out):  # one writer: another worker writing it is waited for, then reused
        if existing_output_matches(out, identity, "checkpoint"):
            if tiny_family(family)[1].llm_tokenizer and not (out / LLM_TOKENIZER_FILE).is_file():
                _add_llm_tokenizer(out)
            return StageResult(out, out, "reused")
        with staged_directory(out) as staging:
            write_checkpoint(staging, family, seed=seed)
            write_json(staging / "manifest.json", identity)
        return StageResult(out, out, "built")


def _add_llm_tokenizer(out: Path) -> None:
    """Give a tiny InstructBLIP checkpoint written before its LLM tokenizer existed that tokenizer, leaving every
    other file as it is (its weights, hence every store and run made from it, stay valid). Written aside and
    moved in with `tokenizer_config.json` last, the file whose presence says the tokenizer is there."""
    import json
    import os
    import shutil

    config = json.loads((out / "config.json").read_text())
    staging = out / f".llm-tokenizer.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_llm_tokenizer(staging, config["text_config"]["vocab_size"], config["image_token_index"])
        names = sorted(p.name for p in staging.iterdir() if p.name != LLM_TOKENIZER_FILE) + [LLM_TOKENIZER_FILE]
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
