"""The resampler families beyond BLIP-2 and InstructBLIP: each family's per-layer latents, read with forward hooks
on its own modules, equal what transformers' own forward of the whole model (language model included, read from
the same tiny checkpoint) computes at those points."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_rows_hold_their_numbers, extract_splits, report_tables, run_cli

from probing.core.errors import ProbingError
from probing.data.images import load_rgb_image
from probing.models import load_resampler
from probing.models.tiny import write_checkpoint
from probing.store.extract import ExtractionRequest, extract
from probing.tasks import load_split


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return lambda family: write_checkpoint(root / family, family, seed=5)


def extracted(checkpoint: Path, data, out: Path, layers="all"):
    return extract(
        ExtractionRequest(
            model=str(checkpoint),
            data=data,
            split="val",
            out=out,
            layers=layers,
            batch_size=8,
            dtype="float32",
            workers=0,
            progress=False,
        )
    ).value


def first_examples(data, store, count: int):
    examples = {e.example_id: e for e in load_split(data, "val").examples}
    return [examples[i] for i in store.ids[:count]]


def test_instructblip_video_reads_an_image_as_one_frame_of_its_qformer(family_checkpoints, refcocog_val, tmp_path):
    from transformers import InstructBlipVideoForConditionalGeneration

    checkpoint = family_checkpoints("instructblip-video")
    store = extracted(checkpoint, refcocog_val, tmp_path / "store")
    assert store.layers == [1, 2, 3, 4] and store.manifest["request"]["model"]["family"] == "instructblip-video"
    model = InstructBlipVideoForConditionalGeneration.from_pretrained(checkpoint).eval()
    resampler = load_resampler(str(checkpoint))
    examples = first_examples(refcocog_val, store, 8)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    tokens = resampler.tokenize([e.text for e in examples])
    captured = {}
    model.qformer.config.output_hidden_states = True  # read by transformers' output capturing
    hook = model.qformer.register_forward_hook(lambda module, args, output: captured.setdefault("qformer", output))
    prompt = torch.cat([torch.full((8, 4), model.config.video_token_index), torch.randint(0, 90, (8, 6))], dim=1)
    with torch.no_grad():
        model(
            pixel_values=pixels[:, None],  # [B, frames=1, C, H, W]
            qformer_input_ids=tokens["input_ids"],
            qformer_attention_mask=tokens["attention_mask"],
            input_ids=prompt,
        )
    hook.remove()
    inside = captured["qformer"]
    for layer in store.layers:
        assert torch.allclose(store.load(layer)[:8], inside.hidden_states[layer][:, :4], atol=1e-6, rtol=0)


def test_llava_projector_latents_are_the_models_image_features(family_checkpoints, refcocog_val, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaModel

    checkpoint = family_checkpoints("llava")
    store = extracted(checkpoint, refcocog_val, tmp_path / "store")
    assert store.layers == [1] and store.per_image
    resampler = load_resampler(str(checkpoint))
    assert (resampler.num_latents, resampler.hidden_size) == (16, 48)
    assert sorted({name.split(".")[0] for name, _ in resampler.trainable_parameters()}) == ["multi_modal_projector"]
    model = LlavaModel.from_pretrained(checkpoint).eval()
    examples = first_examples(refcocog_val, store, 6)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    with torch.no_grad():
        expected = torch.stack(model.get_image_features(pixel_values=pixels).pooler_output)
    assert expected.shape == (6, 16, 48)
    assert torch.allclose(store.load(1)[:6], expected, atol=1e-6, rtol=0)
    # the checkpoint's keys are those a whole LlavaForConditionalGeneration reads (the Hub's layout)
    whole = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        inside = torch.stack(whole.model.get_image_features(pixel_values=pixels).pooler_output)
    assert torch.equal(inside, expected)


def test_kosmos2_latents_are_the_models_image_embeddings(family_checkpoints, refcocog_val, tmp_path):
    from transformers import Kosmos2Model

    checkpoint = family_checkpoints("kosmos2")
    store = extracted(checkpoint, refcocog_val, tmp_path / "store")
    assert store.layers == [1] and store.per_image
    resampler = load_resampler(str(checkpoint))
    assert (resampler.num_latents, resampler.hidden_size) == (6, 16)
    assert "image_to_text_projection.latent_query" in dict(resampler.trainable_parameters())
    model = Kosmos2Model.from_pretrained(checkpoint).eval()
    examples = first_examples(refcocog_val, store, 6)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    assert expected.shape == (6, 6, 16)
    assert torch.allclose(store.load(1)[:6], expected, atol=1e-6, rtol=0)
    with pytest.raises(ProbingError, match=r"^--layers: layer 0 does not exist \(the image-to-text projection has"):
        resampler.query_states(resampler.encode_images(pixels), None, [0])


def test_idefics2_every_perceiver_layer_is_the_one_inside_the_whole_model(family_checkpoints, refcocog_val, tmp_path):
    from transformers import Idefics2ForConditionalGeneration

    checkpoint = family_checkpoints("idefics2")
    store = extracted(checkpoint, refcocog_val, tmp_path / "store")
    assert store.layers == [1, 2, 3] and store.per_image
    resampler = load_resampler(str(checkpoint))
    assert (resampler.num_latents, resampler.hidden_size) == (5, 16)
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    perceiver = model.model.connector.perceiver_resampler
    captured = {}
    for layer, module in enumerate(perceiver.layers, start=1):
        module.register_forward_hook(lambda m, args, output, layer=layer: captured.__setitem__(layer, output))
    examples = first_examples(refcocog_val, store, 6)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    with torch.no_grad():
        final = model.model.get_image_features(pixel_values=pixels[:, None]).pooler_output
    for layer in store.layers:
        assert torch.allclose(store.load(layer)[:6], captured[layer], atol=1e-5, rtol=0)
    # the model's own output is the last layer through the Perceiver's final norm
    assert torch.allclose(perceiver.norm(store.load(3)[:6]).reshape(-1, 16), torch.cat(final), atol=1e-5)
    zero = resampler.query_states(resampler.encode_images(pixels), None, [0])[:, 0]
    assert torch.equal(zero, perceiver.latents.expand(6, -1, -1))
    assert all(key.startswith(("model.vision_model.", "model.connector.")) for key in resampler.state_dict())


def test_idefics_every_perceiver_block_is_the_one_inside_the_whole_model(family_checkpoints, refcocog_val, tmp_path):
    from transformers import IdeficsForVisionText2Text

    checkpoint = family_checkpoints("idefics")
    store = extracted(checkpoint, refcocog_val, tmp_path / "store")
    assert store.layers == [1, 2] and store.per_image
    resampler = load_resampler(str(checkpoint))
    assert (resampler.num_latents, resampler.hidden_size) == (5, 24)
    model = IdeficsForVisionText2Text.from_pretrained(checkpoint).eval()
    perceiver = model.model.perceiver_resampler
    # the reference: the latents entering block 2's attention and the final LayerNorm, inside the model's forward
    captured = {}
    perceiver.blocks[1][0].register_forward_pre_hook(lambda m, args: captured.__setitem__(1, args[1]))
    perceiver.layer_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__(2, args[0]))
    perceiver.register_forward_hook(lambda m, args, output: captured.__setitem__("final", output))
    examples = first_examples(refcocog_val, store, 6)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in examples])
    prompt = torch.randint(0, 60, (6, 5))
    with torch.no_grad():
        model(
            input_ids=prompt, pixel_values=pixels[:, None], image_attention_mask=torch.ones(6, 5, 1, dtype=torch.long)
        )
    for layer in store.layers:
        assert torch.allclose(store.load(layer)[:6], captured[layer], atol=1e-5, rtol=0)
    # what the language model reads: the last block through the final LayerNorm
    assert torch.allclose(perceiver.layer_norm(store.load(2)[:6]), captured["final"], atol=1e-5)
    zero = resampler.query_states(resampler.encode_images(pixels), None, [0, 2])
    assert torch.equal(zero[:, 0], perceiver.latents.expand(6, -1, -1))
    assert torch.allclose(zero[:, 1], store.load(2)[:6], atol=1e-6)


def test_models_lists_every_family_with_its_latent_shape_at_full_size(capsys):
    code, out, err = run_cli(capsys, "models", "--json")
    assert code == 0 and err == ""
    described = {item["name"]: item for item in json.loads(out)["families"]}
    assert list(described)[:2] == ["blip2", "instructblip"]
    shapes = {name: (item["layers"], item["latents"], item["width"]) for name, item in described.items()}
    assert shapes == {
        "blip2": (12, 32, 768),
        "instructblip": (12, 32, 768),
        "instructblip-video": (12, 32, 768),
        "idefics2": (3, 64, 4096),
        "idefics": (6, 64, 1280),
        "kosmos2": (1, 64, 2048),
        "llava": (1, 576, 4096),  # a 336 px image in 14 px patches, nothing resampled
    }
    assert described["llava"]["vision_parameters"] == 303_507_456  # CLIP ViT-L/14-336, as published
    assert not described["kosmos2"]["reads_text"] and described["instructblip-video"]["reads_text"]
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert out.splitlines()[-1].split()[:6] == ["llava", "1", "layers", "576", "x", "4096"]


def test_mean_over_latents_gives_every_family_a_probe_of_its_width(family_checkpoints, refcocog_val, capsys, tmp_path):
    from safetensors.torch import load_file

    from probing.probes.train import probe_inputs
    from probing.store.features import FeatureStore

    features = extract_splits(family_checkpoints("kosmos2"), refcocog_val, tmp_path / "features", layers="1")
    common = ("train", "--task", "refcocog", "--features", features, "--layer", 1, "--lr", "0.01", "--epochs", 2)
    code, _, err = run_cli(capsys, *common, "--latents", "mean", "--out", tmp_path / "mean")
    assert code == 0, err
    manifest = json.loads((tmp_path / "mean" / "manifest.json").read_text())
    assert manifest["settings"]["latents"] == "mean"
    weights = load_file(tmp_path / "mean" / "probes" / "seed-0.safetensors")
    assert {tuple(t.shape) for t in weights.values() if t.dim() == 2} == {(4, 16)}  # 16 = width, not 6 x 16
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "flat")
    assert code == 0, err
    assert "latents" not in json.loads((tmp_path / "flat" / "manifest.json").read_text())["settings"]
    weights = load_file(tmp_path / "flat" / "probes" / "seed-0.safetensors")
    assert {tuple(t.shape) for t in weights.values() if t.dim() == 2} == {(4, 96)}
    code, out, err = run_cli(capsys, *common, "--latents", "max", "--out", tmp_path / "max")
    assert (code, out) == (
        2,
        "",
    ) and err.strip() == "error: --latents: unknown latent reading 'max' (choose flatten | mean)"
    assert not (tmp_path / "max").exists()
    states = FeatureStore(features / "val").load(1)
    assert torch.equal(probe_inputs(states, "mean"), states.float().mean(dim=1).to(states.dtype))


def test_the_families_config_probes_every_family_beside_its_random_weights_control():
    from probing.models import families
    from probing.runs.config import load_config

    config = load_config(Path(__file__).parents[1] / "experiments" / "families.yaml", check_paths=False)
    entries = [config.models[label] for label in config.experiments[0].models]
    pretrained = {entry.tiny for entry in entries if entry.init == "pretrained"}
    random = {entry.tiny for entry in entries if entry.init == "random"}
    assert pretrained == random == {family.name for family in families() if family.tiny is not None}
    assert config.experiments[0].layers == "last" and config.experiments[0].modes == ["frozen"]


@pytest.mark.slow
def test_the_families_config_runs_and_its_report_sets_every_family_beside_its_random_weights(capsys, tmp_path):
    """`probing run experiments/families.yaml` on tiny models (a smoke size: 60 examples per split, one trial):
    the families table holds every family, by latent count, beside its random-weights model; its latent shapes
    are the stores' tensors' and its accuracies are the report's own (results.csv)."""
    import pandas as pd

    from probing.models import families
    from probing.report.tables import RESULT_DTYPES
    from probing.store.features import FeatureStore

    config = Path(__file__).parents[1] / "experiments" / "families.yaml"
    overrides = [
        "experiments.0.search.trials=1",
        "experiments.0.search.batch=1",
        "experiments.0.search.final_seeds=[0]",
    ]
    code, out, err = run_cli(
        capsys, "run", config, "--limit", 60, *[f"--set={o}" for o in overrides], f"--set=workspace={tmp_path}"
    )
    assert code == 0, err
    report = tmp_path / "limit-60" / "report-families"
    assert {p.suffix for p in (report / "figures").glob("families.*")} == {".pdf", ".png", ".svg"}
    table = (report / "tables" / "families.md").read_text().splitlines()
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table
        if line.startswith("| ") and "---" not in line
    ]
    header, rows = rows[0], rows[1:]
    assert [row[0] for row in rows if "(tiny random)" in row[0]] == [row[0] for row in rows]
    assert len(rows) == len([f for f in families() if f.tiny is not None])  # every family, once
    counts = [int(row[header.index("latents")].split(" × ")[0]) for row in rows]
    assert counts == sorted(counts)  # by the number of latents
    for row in rows:  # each family's random-weights model beside it, on every task
        assert all(row[i] != "–" for i, name in enumerate(header) if name.endswith("random weights")), row[0]
    results = pd.read_csv(report / "results.csv", dtype=RESULT_DTYPES)
    shapes = results[results["metric"].isin(["latents", "latent_width"])]
    for run, numbers in shapes.groupby("run"):
        manifest = json.loads((report / run / "manifest.json").read_text())
        store = FeatureStore(next(iter(manifest["feature_paths"].values())))
        stored = tuple(store.load(manifest["layer"]).shape[1:])
        assert stored == (
            int(numbers[numbers["metric"] == "latents"]["value"].iloc[0]),
            int(numbers[numbers["metric"] == "latent_width"]["value"].iloc[0]),
        )
    written = json.loads((report / "report.json").read_text())  # the runs shown (a search's `best/`), the tables
    runs = [Path(run).parent if Path(run).name == "best" else Path(run) for run in written["runs"]]
    tables = report_tables(runs, only={Path(name).stem for name in written["tables"]})
    assert assert_rows_hold_their_numbers(tables, report) > 100  # each number in its row and in results.csv
    records = pd.read_csv(report / "tables" / "families.csv")
    accuracy = results[results["metric"].isin(["accuracy", "acc@0.5"]) & results["category"].isna()]
    accuracy = accuracy[(accuracy["split"] == "test") & (accuracy["mode"] == "frozen") & ~accuracy["control"]]
    assert set(records["init"]) == {"pretrained", "random"} and len(records) == 2 * 3 * len(rows)
    for record in records.itertuples():
        same = accuracy[(accuracy["model"] == record.model) & (accuracy["task"] == record.task)]
        assert len(same) == 1 and same["value"].iloc[0] == pytest.approx(record.mean), (record.model, record.task)
