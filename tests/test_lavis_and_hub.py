"""LAVIS .pth checkpoints through the key map, and Hub ids resolved from a Hugging Face cache offline."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

from probing.core.errors import ProbingError
from probing.models import load_resampler, qformer_layers
from probing.models.lavis import lavis_to_hf, read_lavis_checkpoint
from probing.models.registry import family_named, family_of_lavis
from probing.models.tiny import write_checkpoint

MODEL_CLASSES = {"blip2": Blip2ForImageTextRetrieval, "instructblip": InstructBlipForConditionalGeneration}


def to_lavis_name(key: str, family: str) -> str:
    """transformers key -> LAVIS key, written out rule by rule from transformers' BLIP-2 and InstructBLIP conversion
    scripts."""
    rules = [
        (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
        (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
        (r"^vision_model\.post_layernorm\.", "ln_vision."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
        (
            r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$",
            r"visual_encoder.blocks.\1.attn.qkv.weight",
        ),
        (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
        (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
        (r"^qformer\.embeddings\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
        (r"^(qformer\.)?embeddings\.(word|position)_embeddings\.", r"Qformer.bert.embeddings.\2_embeddings."),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
            r"Qformer.bert.encoder.layer.\1.\2.self.",
        ),
        (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
        (r"^vision_projection\.", "vision_proj."),
        (r"^text_projection\.", "text_proj."),
        (r"^language_projection\.", "llm_proj."),
        (r"^language_model\.", "llm_model."),
    ]
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return key  # query_tokens, itm_head.*


def write_lavis(model, family: str, path, drop_vision: bool = False) -> None:
    state = {}
    for key, tensor in model.state_dict().items():
        bias = re.match(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if bias:
            q, k, v = tensor.chunk(3)
            assert torch.count_nonzero(k) == 0
            state[f"visual_encoder.blocks.{bias[1]}.attn.q_bias"] = q.clone()
            state[f"visual_encoder.blocks.{bias[1]}.attn.v_bias"] = v.clone()
        else:
            state[to_lavis_name(key, family)] = tensor.clone()
    # What real LAVIS files carry besides: MLM head, ITC temperature, buffers, an unused 40th EVA block.
    layers = model.config.vision_config.num_hidden_layers
    state |= {
        "Qformer.cls.predictions.bias": torch.zeros(3),
        "temp": torch.tensor(0.07),
        "Qformer.bert.embeddings.position_ids": torch.arange(8)[None],
        "visual_encoder.blocks.0.attn.relative_position_index": torch.zeros(2, 2, dtype=torch.long),
        f"visual_encoder.blocks.{layers}.norm1.weight": torch.ones(4),
    }
    if drop_vision:  # like a trimmed checkpoint that keeps only what was trained
        state = {k: v for k, v in state.items() if not k.startswith(("visual_encoder.", "ln_vision."))}
    torch.save({"model": state}, path)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_lavis_round_trip(family, tiny_checkpoints, tmp_path):
    model = MODEL_CLASSES[family].from_pretrained(tiny_checkpoints[family]).eval()
    with torch.no_grad():  # EVA has no key bias: a real conversion fills zeros there
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[
                model.config.vision_config.hidden_size : 2 * model.config.vision_config.hidden_size
            ] = 0
    write_lavis(model, family, tmp_path / "lavis.pth")
    assert family_of_lavis(torch.load(tmp_path / "lavis.pth", weights_only=True)["model"]).name == family
    other_seed = write_checkpoint(tmp_path / "base", family, seed=99)  # config and tokenizer only matter
    resampler = load_resampler(str(tmp_path / "lavis.pth"), base=str(other_seed))
    reference = model.state_dict()
    for key, tensor in resampler.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert resampler.identity["source"].startswith("lavis:")


def test_trimmed_lavis_checkpoint_takes_the_vit_from_the_base(tiny_checkpoints, tmp_path):
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints["blip2"]).eval()
    trained = write_checkpoint(tmp_path / "trained", "blip2", seed=5)
    trained_model = Blip2ForImageTextRetrieval.from_pretrained(trained).eval()
    with torch.no_grad():
        for layer in trained_model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias.zero_()
    write_lavis(trained_model, "blip2", tmp_path / "trimmed.pth", drop_vision=True)
    with pytest.raises(ProbingError, match=r"trimmed.pth: \d+ tensors the BLIP-2 resampler needs are missing from the"):
        load_resampler(str(tmp_path / "trimmed.pth"), base=str(tiny_checkpoints["blip2"]))  # never silently
    resampler = load_resampler(str(tmp_path / "trimmed.pth"), base=str(tiny_checkpoints["blip2"]), fill_from_base=True)
    assert resampler.identity["filled_from_base"]["tensors"] > 0
    assert torch.equal(
        resampler.vision_model.encoder.layers[0].mlp.fc1.weight, model.vision_model.encoder.layers[0].mlp.fc1.weight
    )  # from the base
    assert torch.equal(
        resampler.qformer.encoder.layer[0].attention.attention.query.weight,
        trained_model.qformer.encoder.layer[0].attention.attention.query.weight,
    )  # from the .pth


def test_unpaired_and_surplus_eva_biases(tiny_checkpoints, tmp_path):
    from probing.core.errors import ProbingError

    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints["blip2"]).eval()
    write_lavis(model, "blip2", tmp_path / "lavis.pth")
    state = read_lavis_checkpoint(tmp_path / "lavis.pth")
    layers = model.config.vision_config.num_hidden_layers  # 2
    surplus = {
        f"visual_encoder.blocks.{layers}.attn.q_bias": torch.zeros(32),
        f"visual_encoder.blocks.{layers}.attn.v_bias": torch.zeros(32),
    }  # a block the model does not have
    lone_v = dict(state) | surplus
    lone_v.pop("visual_encoder.blocks.1.attn.q_bias")
    mapped, ignored = lavis_to_hf(lone_v, family_named("blip2").lavis, layers)
    assert {"visual_encoder.blocks.1.attn.v_bias", *surplus} <= set(ignored)  # reported, not silently dropped
    assert "vision_model.encoder.layers.0.self_attn.qkv.bias" in mapped
    assert "vision_model.encoder.layers.1.self_attn.qkv.bias" not in mapped
    lone_q = dict(state)
    lone_q.pop("visual_encoder.blocks.1.attn.v_bias")
    with pytest.raises(ProbingError) as raised:
        lavis_to_hf(lone_q, family_named("blip2").lavis, layers, where="x.pth")
    assert str(raised.value) == (
        "x.pth: missing key 'visual_encoder.blocks.1.attn.v_bias' (needed with 'visual_encoder.blocks.1.attn.q_bias')"
    )
    torch.save({"model": lone_q}, tmp_path / "lone_q.pth")
    with pytest.raises(ProbingError, match=r"lone_q.pth: missing key 'visual_encoder.blocks.1.attn.v_bias'"):
        load_resampler(str(tmp_path / "lone_q.pth"), base=str(tiny_checkpoints["blip2"]))


def test_layers_of_a_pth_read_only_its_keys(tiny_checkpoints, tmp_path, monkeypatch):
    """`qformer_layers` guesses the family from a memory-mapped .pth: no tensor is read into memory."""
    import probing.models.lavis as lavis

    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints["blip2"]).eval()
    write_lavis(model, "blip2", tmp_path / "lavis.pth")
    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(lavis.torch, "load", recording)
    assert qformer_layers(str(tmp_path / "lavis.pth"), base=str(tiny_checkpoints["blip2"])) == 4
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_bad_pth_is_one_line(tmp_path):
    from probing.core.errors import ProbingError

    (tmp_path / "broken.pth").write_bytes(b"not a zip")
    with pytest.raises(ProbingError, match=r"broken.pth: not a readable PyTorch checkpoint"):
        load_resampler(str(tmp_path / "broken.pth"), family="blip2")


def fake_hub_cache(cache, repo_id, folder, commit, skip=()):
    """Lay out `folder` as huggingface_hub's cache holds a downloaded repo at `commit`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=lambda directory, names: [n for n in names if n in skip])
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_offline_from_the_cache(tiny_checkpoints, demo_options, tmp_path):
    cache = tmp_path / "hub"
    blip2_commit, instruct_commit = "a" * 40, "b" * 40
    fake_hub_cache(cache, "Salesforce/blip2-itm-vit-g", tiny_checkpoints["blip2"], blip2_commit)
    index = tiny_checkpoints["instructblip"] / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
    llm_only = set(weight_map.values()) - needed
    fake_hub_cache(
        cache, "Salesforce/instructblip-vicuna-7b", tiny_checkpoints["instructblip"], instruct_commit, skip=llm_only
    )  # never downloaded: the loader must not ask for them
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    refcocog = demo_options["refcocog"]
    for alias, commit in (("blip2", blip2_commit), ("instructblip", instruct_commit)):
        out = tmp_path / alias
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "probing",
                "extract",
                "--model",
                alias,
                "--task",
                "refcocog",
                "--refs",
                str(refcocog["refs"]),
                "--instances",
                str(refcocog["instances"]),
                "--images",
                str(refcocog["images"]),
                "--split",
                "test",
                "--out",
                str(out),
                "--layers",
                "4",
                "--workers",
                "0",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model_source"]["revision"] == commit
        assert manifest["model_source"]["source"] in ("Salesforce/blip2-itm-vit-g", "Salesforce/instructblip-vicuna-7b")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "probing",
            "extract",
            "--model",
            "blip2-coco",
            "--task",
            "refcocog",
            "--refs",
            str(refcocog["refs"]),
            "--instances",
            str(refcocog["instances"]),
            "--images",
            str(refcocog["images"]),
            "--split",
            "test",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    # the id is also a relative path: the message says which folder it would have been, resolved
    assert result.stderr.strip() == (
        "error: Salesforce/blip2-itm-vit-g-coco: no local folder "
        f"({Path.cwd() / 'Salesforce' / 'blip2-itm-vit-g-coco'} does not exist), and 'config.json' is not in the "
        "Hugging Face cache and cannot be downloaded (offline or no network); download it first or pass a local folder"
    )
