"""Backends against transformers' own forward, on tiny random checkpoints of the real architectures."""

import re
import shutil

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

from probing.core.errors import ProbingError
from probing.data.images import load_rgb_image
from probing.models import load_resampler
from probing.models.checkpoint import CheckpointSource
from probing.store.extract import ExtractionRequest, extract
from probing.tasks import load_split


def first_examples(options, count):
    return load_split(options, "val").examples[:count]


def model_inputs(resampler, examples):
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    return pixels, resampler.tokenize([e.text for e in examples])


@pytest.fixture(scope="module")
def blip2_store(tiny_checkpoints, refcocog_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip2") / "features"
    return extract(
        ExtractionRequest(
            model=str(tiny_checkpoints["blip2"]),
            data=refcocog_val,
            split="val",
            out=out,
            layers="0,1,2,3,4",
            batch_size=16,
            shard_size=64,
            dtype="float32",
            workers=0,
            progress=False,
        )
    ).value


@pytest.fixture(scope="module")
def blip2_forward(blip2_store, tiny_checkpoints, refcocog_val):
    """transformers' own BLIP-2 ITM forward on the store's first 24 examples (hidden states captured too)."""
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints["blip2"]).eval()
    model.qformer.config.output_hidden_states = True  # read by transformers' output capturing
    resampler = load_resampler(str(tiny_checkpoints["blip2"]))
    examples = {e.example_id: e for e in load_split(refcocog_val, "val").examples}
    pixels, tokens = model_inputs(resampler, [examples[i] for i in blip2_store.ids[:24]])
    with torch.no_grad():
        output = model(
            pixel_values=pixels,
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            use_image_text_matching_head=True,
        )
    return resampler, output


def test_blip2_stored_last_layer_gives_the_models_itm_logits(blip2_store, blip2_forward):
    resampler, output = blip2_forward
    logits = output.logits_per_image
    with torch.no_grad():
        from_store = resampler.itm_logits(blip2_store.load(4)[:24])
    assert torch.allclose(from_store, logits, atol=1e-6, rtol=0)
    assert logits.std() > 0  # a non-degenerate check: logits differ across examples


def test_blip2_every_stored_layer_equals_the_qformer_hidden_states(blip2_store, blip2_forward):
    hidden = blip2_forward[1].text_model_output.hidden_states
    assert len(hidden) == 5 and blip2_store.layers == [0, 1, 2, 3, 4]
    for layer in blip2_store.layers:
        stored = blip2_store.load(layer)[:24]
        assert stored.shape == (24, 4, 24) and stored.dtype == torch.float32
        assert torch.allclose(stored, hidden[layer][:, :4], atol=1e-6, rtol=0), layer
    layer0 = blip2_store.load(0)
    assert torch.equal(layer0, layer0[:1].expand_as(layer0))  # the embedding output is input-independent
    assert blip2_store.load(4).std(dim=0).mean() > 1e-3  # later layers depend on the input


def test_instructblip_stored_states_equal_the_qformer_inside_the_full_model(tiny_checkpoints, refcocog_val, tmp_path):
    store = extract(
        ExtractionRequest(
            model=str(tiny_checkpoints["instructblip"]),
            data=refcocog_val,
            split="val",
            out=tmp_path / "f",
            batch_size=8,
            shard_size=32,
            dtype="float32",
            workers=0,
            progress=False,
        )
    ).value
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_checkpoints["instructblip"]).eval()
    resampler = load_resampler(str(tiny_checkpoints["instructblip"]))
    examples = {e.example_id: e for e in load_split(refcocog_val, "val").examples}
    ids = store.ids[:16]
    pixels, tokens = model_inputs(resampler, [examples[i] for i in ids])
    captured = {}
    model.qformer.config.output_hidden_states = True  # read by transformers' output capturing
    hook = model.qformer.register_forward_hook(lambda module, args, output: captured.setdefault("qformer", output))
    prompt = torch.cat([torch.full((16, 4), model.config.image_token_index), torch.randint(0, 90, (16, 6))], dim=1)
    with torch.no_grad():
        model(
            pixel_values=pixels,
            qformer_input_ids=tokens["input_ids"],
            qformer_attention_mask=tokens["attention_mask"],
            input_ids=prompt,
        )
    hook.remove()
    inside = captured["qformer"]
    assert len(inside.hidden_states) == 5
    assert torch.allclose(store.load(4)[:16], inside.last_hidden_state[:, :4], atol=1e-6, rtol=0)
    for layer in store.layers:
        assert torch.allclose(store.load(layer)[:16], inside.hidden_states[layer][:, :4], atol=1e-6, rtol=0)


def test_instructblip_never_reads_the_language_model(tiny_checkpoints, tmp_path, monkeypatch, refcocog_val):
    import json

    folder = tmp_path / "instructblip"
    shutil.copytree(tiny_checkpoints["instructblip"], folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files_needed = {f for k, f in weight_map.items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
    llm_only = set(weight_map.values()) - files_needed
    assert llm_only and any(  # the fixture really has LLM-only shards and a shard that mixes Q-Former and LLM
        any(weight_map[k] == f and k.startswith("language_model.") for k in weight_map) for f in files_needed
    )
    for name in llm_only:
        (folder / name).unlink()
    read_keys = []
    original_read = CheckpointSource.read_tensors

    def spying_read(self, prefixes):
        tensors = original_read(self, prefixes)
        read_keys.extend(tensors)
        return tensors

    monkeypatch.setattr(CheckpointSource, "read_tensors", spying_read)
    resampler = load_resampler(str(folder))
    full = load_resampler(str(tiny_checkpoints["instructblip"]))
    assert read_keys and not any(k.startswith(("language_model.", "language_projection.")) for k in read_keys)
    assert not any(name.startswith("language") for name, _ in resampler.named_parameters())
    for (name, mine), (_, theirs) in zip(resampler.state_dict().items(), full.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name


def test_truncation_sides_and_lengths(tiny_checkpoints):
    blip2 = load_resampler(str(tiny_checkpoints["blip2"]))
    instruct = load_resampler(str(tiny_checkpoints["instructblip"]))
    words = ["red", "green", "blue"] * 60  # 180 words, one token each
    text = " ".join(words)
    blip2_ids = blip2.tokenize([text])["input_ids"][0]
    instruct_ids = instruct.tokenize([text])["input_ids"][0]
    assert len(blip2_ids) == 32 and len(instruct_ids) == 128
    vocab = blip2.tokenizer.convert_ids_to_tokens
    assert vocab(blip2_ids[:3].tolist()) == ["[CLS]", "red", "green"]  # right truncation keeps the start
    assert instruct.tokenizer.convert_ids_to_tokens(instruct_ids[-3:].tolist()) == ["green", "blue", "[SEP]"]
    # left truncation keeps the end: the last 126 words, so the first kept word is words[-126]
    assert instruct.tokenizer.convert_ids_to_tokens(instruct_ids[1:2].tolist()) == [words[-126]]


def test_padded_batch_equals_trimmed(tiny_checkpoints, refcocog_val):
    resampler = load_resampler(str(tiny_checkpoints["blip2"]))
    example = first_examples(refcocog_val, 1)[0]
    pixels = resampler.preprocess([load_rgb_image(example.image_path)] * 2)
    with torch.no_grad():
        embeds = resampler.encode_images(pixels)
        both = resampler.query_states(embeds, [example.text, example.text + " on the far left of the image"], [4])
        alone = resampler.query_states(embeds[:1], [example.text], [4])
    assert torch.allclose(both[0], alone[0], atol=1e-6)
    assert not torch.allclose(both[0], both[1], atol=1e-3)  # the text changes the queries


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_keys_and_values_once_per_image_equal_once_per_text(tiny_checkpoints, refcocog_val, family):
    """With `image_slots` each cross-attention key/value projection reads every distinct image once, and the
    query states equal those of one image row per text; the hooks are gone afterwards."""
    resampler = load_resampler(str(tiny_checkpoints[family]))
    examples = first_examples(refcocog_val, 12)[::2]
    images = sorted({e.image_path for e in examples})
    assert 1 < len(images) < len(examples)  # some images read by several texts
    pixels = resampler.preprocess([load_rgb_image(path) for path in images])
    slots = [images.index(e.image_path) for e in examples][::-1]  # not in table order
    texts = [e.text for e in examples][::-1]
    projections = resampler.cross_attention_projections()
    assert len(projections) == 2 * (resampler.num_layers // 2)  # key and value, every other layer
    rows_seen = []
    handle = projections[0].register_forward_hook(lambda module, args, output: rows_seen.append(len(args[0])))
    with torch.no_grad():
        table = resampler.encode_images(pixels)
        once = resampler.query_states(table, texts, [1, 2, 3, 4], image_slots=slots)
        per_text = resampler.query_states(table[torch.tensor(slots)], texts, [1, 2, 3, 4])
        distinct = sorted(set(slots))  # no image read twice: the projections see every row, as without slots
        alone = resampler.query_states(table, texts[: len(distinct)], [4], image_slots=distinct)
        assert torch.equal(alone, resampler.query_states(table[distinct], texts[: len(distinct)], [4]))
    handle.remove()
    assert rows_seen == [len(set(slots)), len(texts), len(distinct), len(distinct)]
    assert once.shape == per_text.shape == (len(texts), 4, resampler.num_query_tokens, resampler.hidden_size)
    assert torch.allclose(once, per_text, atol=1e-6, rtol=0)
    assert all(not p._forward_hooks and not p._forward_pre_hooks for p in projections)
    with pytest.raises(ValueError, match="image_slots"):
        resampler.query_states(table, texts, [4], image_slots=slots[:-1])


def test_trainable_parameters_exclude_the_vit(tiny_checkpoints):
    for family, extra in (("blip2", {"embeddings.word_embeddings.weight"}), ("instructblip", set())):
        resampler = load_resampler(str(tiny_checkpoints[family]))
        names = {name for name, _ in resampler.trainable_parameters()}
        assert not any(name.startswith(("vision_model.", "itm_head.")) for name in names)
        assert {"query_tokens"} | extra <= names
        assert any(name.startswith("qformer.encoder.layer.3.") for name in names)
        assert len(names) == 113  # everything but the ViT (and BLIP-2's ITM head), the same count in both families


def test_random_init_is_seeded_and_reads_no_weights(tiny_checkpoints, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("random init must not read weights")

    pretrained = load_resampler(str(tiny_checkpoints["blip2"]))
    monkeypatch.setattr(CheckpointSource, "read_tensors", forbidden)
    first = load_resampler(str(tiny_checkpoints["blip2"]), init="random", init_seed=1)
    again = load_resampler(str(tiny_checkpoints["blip2"]), init="random", init_seed=1)
    other = load_resampler(str(tiny_checkpoints["blip2"]), init="random", init_seed=2)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.query_tokens, other.query_tokens)
    assert not torch.equal(
        first.qformer.encoder.layer[0].attention.attention.query.weight,
        pretrained.qformer.encoder.layer[0].attention.attention.query.weight,
    )
    fc1 = first.vision_model.encoder.layers[0].mlp.fc1.weight
    assert 0.015 < fc1.std().item() < 0.025  # initializer_range 0.02, not the configs' 1e-10
    assert first.identity["init"] == "random" and first.identity["init_seed"] == 1


def test_meta_device_load_fills_every_buffer(tiny_checkpoints):
    for family in ("blip2", "instructblip"):
        resampler = load_resampler(str(tiny_checkpoints[family]))
        for name, tensor in list(resampler.named_parameters()) + list(resampler.named_buffers()):
            assert tensor.device.type == "cpu", name
        position_ids = dict(resampler.named_buffers())[
            "embeddings.position_ids" if family == "blip2" else "qformer.embeddings.position_ids"
        ]
        assert position_ids[0].tolist() == list(range(position_ids.shape[-1]))


def test_random_init_does_not_depend_on_the_device(tiny_checkpoints):
    """Weights are drawn on the CPU, then moved: the same seed gives the same weights on every device (the
    store identity names the seed, not the device)."""
    import probing.models.loading as loading

    on_cpu = load_resampler(str(tiny_checkpoints["blip2"]), init="random", init_seed=3)
    devices = []
    original = loading._random_resampler

    def recording(*args, **kwargs):
        resampler = original(*args, **kwargs)
        devices.extend({tensor.device.type for tensor in resampler.state_dict().values()})
        return resampler

    target = "cuda" if torch.cuda.is_available() else "meta"  # meta: a device whose init would lose the values
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "_random_resampler", recording)
        elsewhere = load_resampler(str(tiny_checkpoints["blip2"]), init="random", init_seed=3, device=target)
    assert devices == ["cpu"] and elsewhere.device.type == target
    if target == "cuda":
        for name, tensor in on_cpu.state_dict().items():
            assert torch.equal(tensor, elsewhere.state_dict()[name].cpu()), name


def test_tokenizer_ids_outside_the_qformer_vocabulary(tiny_checkpoints, tmp_path):
    """A tokenizer with an added token (the Hub's `<image>`) loads; only a text that produces it is refused."""
    from transformers import AutoTokenizer

    folder = tmp_path / "blip2"
    shutil.copytree(tiny_checkpoints["blip2"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = len(tokenizer)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.save_pretrained(folder)
    resampler = load_resampler(str(folder))
    assert len(resampler.tokenizer) == vocab_size + 1 == resampler.config.qformer_config.vocab_size + 1
    assert resampler.tokenize(["the red circle"])["input_ids"].max() < vocab_size
    text = "<image> the red circle on the left of the picture, next to the blue one"
    with pytest.raises(ProbingError) as raised:
        resampler.tokenize(["the red circle", text])
    assert str(raised.value) == (
        f"text {text[:40]!r}: token id {vocab_size} is outside the Q-Former vocabulary "
        f"({vocab_size} ids); the tokenizer does not fit the model"
    )


def test_model_errors_are_one_line(tmp_path, tiny_checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = tmp_path / "no-such-org" / "no-such-model-xyz"  # a relative path is also named as resolved
    with pytest.raises(ProbingError, match="neither a local folder .* nor a Hub repository|not in the Hugging Face"):
        load_resampler("no-such-org/no-such-model-xyz")
    with pytest.raises(ProbingError, match=re.escape(f"({resolved} does not exist)")):
        load_resampler("no-such-org/no-such-model-xyz")
    for spec in ("sub/dir/ckpt", "my model"):  # a mistyped path, a name with spaces: no Hub id either
        with pytest.raises(ProbingError) as raised:
            load_resampler(spec)
        assert str(raised.value) == (
            f"--model: '{spec}' is neither a local folder ({tmp_path / spec} does not exist) nor a valid Hub id"
        )
    monkeypatch.chdir(tmp_path)
    for spec in ("foo.pth", str(tmp_path / "sub" / "foo.pt")):  # a missing LAVIS file is not a Hub id
        with pytest.raises(ProbingError) as raised:
            load_resampler(spec)
        assert str(raised.value) == f"{spec}: file not found"
    with pytest.raises(ProbingError, match="not a checkpoint folder"):
        load_resampler(str(tmp_path / "missing"))
    folder = tmp_path / "opt"
    folder.mkdir()
    shutil.copy(tiny_checkpoints["blip2"] / "config.json", folder / "config.json")
    text = (
        (folder / "config.json")
        .read_text()
        .replace('"use_qformer_text_input": true', '"use_qformer_text_input": false')
    )
    (folder / "config.json").write_text(text)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_checkpoints["blip2"] / name, folder / name)
    with pytest.raises(ProbingError, match="no Q-Former text path"):
        load_resampler(str(folder))
    with pytest.raises(ProbingError, match="--family instructblip: .* is a blip2 checkpoint"):
        load_resampler(str(tiny_checkpoints["blip2"]), family="instructblip")
    with pytest.raises(ProbingError, match="--init: unknown value 'zeros'"):
        load_resampler(str(tiny_checkpoints["blip2"]), init="zeros")
