"""A backend defined here, outside the package: registered in this file, it extracts and trains unfrozen with
no edit to the package. It is BLIP-2's second stage (`Blip2ForConditionalGeneration`, an OPT language model):
its Q-Former reads no text, so the same model type ("blip-2") now serves two families, and its store keeps one
row per image."""

import json

import pytest
import torch
from conftest import run_cli
from torch import nn
from transformers import Blip2ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

from probing.core.errors import ProbingError
from probing.models import BackendFamily, load_resampler, register_family
from probing.models.qformer import QFormerResampler
from probing.models.registry import families
from probing.probes.train import ProbeData, TrainSettings, Trial, train_frozen
from probing.store.extract import ExtractionRequest, extract
from probing.tasks import load_split


class Blip2QueriesResampler(QFormerResampler):
    """The queries of a BLIP-2 stage-2 Q-Former: image only, as the language model receives them."""

    family = "blip2-queries"
    reads_text = False
    checkpoint_prefixes = ("vision_model.", "query_tokens", "qformer.")

    @classmethod
    def config_problem(cls, config):
        if getattr(config.qformer_config, "use_qformer_text_input", False):
            return "this Q-Former reads text: use the blip2 family"
        return None

    def build_modules(self, config):
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def qformer_hidden_states(self, image_embeds, input_ids, attention_mask):
        output = self.qformer(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self.image_attention_mask(image_embeds),
            output_hidden_states=True,
        )
        return output.hidden_states


QUERIES_FAMILY = BackendFamily(
    name="blip2-queries",
    title="BLIP-2 queries",
    resampler=Blip2QueriesResampler,
    model_types=("blip-2",),
    tokenizer_folder=None,
)


@pytest.fixture
def queries_family():
    """The family registered for one test (and taken out again, so that other tests see the package alone)."""
    from probing.models.registry import unregister_family

    register_family(QUERIES_FAMILY)
    yield QUERIES_FAMILY
    unregister_family(QUERIES_FAMILY.name)


def test_without_the_family_the_checkpoint_is_refused(stage2_checkpoint):
    assert "blip2-queries" not in [family.name for family in families()]
    with pytest.raises(ProbingError, match="has no Q-Former text path"):
        load_resampler(str(stage2_checkpoint))


def test_a_registered_family_extracts_one_row_per_image(queries_family, stage2_checkpoint, refcocog_val, tmp_path):
    resampler = load_resampler(str(stage2_checkpoint))
    assert resampler.family == "blip2-queries" and not resampler.reads_text
    store = extract(
        ExtractionRequest(
            model=str(stage2_checkpoint),
            data=refcocog_val,
            split="val",
            out=tmp_path / "s",
            layers="all",
            workers=0,
            progress=False,
            dtype="float32",
            store_vision=True,
        )
    ).value
    examples = {e.example_id: e for e in load_split(refcocog_val, "val").examples}
    states, rows = store.load_rows(4)
    assert store.per_image and len(states) == len({e.image_id for e in examples.values()}) < len(store.ids)
    assert store.manifest["request"]["rows"] == "per image" and store.manifest["request"]["text"] is None
    per_example = store.load(4)
    assert per_example.shape == (len(store.ids), 4, 24) and torch.equal(per_example, states[rows])
    # the stored rows are the Q-Former states of transformers' own forward of the whole model
    model = Blip2ForConditionalGeneration.from_pretrained(stage2_checkpoint).eval()
    model.qformer.config.output_hidden_states = True
    first = [examples[i] for i in store.ids[:6]]
    from probing.data.images import load_rgb_image

    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in first])
    with torch.no_grad():
        hidden = model.get_image_features(pixel_values=pixels).qformer_outputs.hidden_states
    for layer in (1, 4):
        assert torch.allclose(store.load(layer)[:6], hidden[layer][:, :4], atol=1e-5)
    # frozen training reads per-image rows as the per-example features would be read
    split = {"task": "refcocog", "split": "val", "ids": store.ids, "examples": [examples[i] for i in store.ids]}
    targets = torch.tensor([examples[i].box for i in store.ids])
    by_image = ProbeData(features=states.flatten(1), targets=targets, rows=rows, **split)
    by_example = ProbeData(features=per_example.flatten(1), targets=targets, **split)
    settings = TrainSettings(task="refcocog", batch_size=8, device="cpu")
    trials = [Trial(lr=1e-2, epochs=3, seed=0)]
    rows_result, examples_result = (
        train_frozen(by_image, by_image, trials, settings)[0],
        train_frozen(by_example, by_example, trials, settings)[0],
    )
    for mine, theirs in zip(rows_result.history, examples_result.history, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-6)
    assert torch.allclose(rows_result.probe.layers[0].weight, examples_result.probe.layers[0].weight, atol=1e-6)


def test_a_registered_family_trains_unfrozen(capsys, queries_family, stage2_checkpoint, demo_options, tmp_path):
    vsr = demo_options["vsr"]
    code, out, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        stage2_checkpoint,
        "--vsr",
        vsr["vsr"],
        "--images",
        vsr["images"],
        "--layer",
        3,
        "--lr",
        3e-3,
        "--epochs",
        3,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["family"] == "blip2-queries" and manifest["mode"] == "unfrozen"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["runs"][0]["history"]] == [1, 2, 3]
    assert 0 <= metrics["runs"][0]["test"]["accuracy"] <= 1
    # the truncated copy trained; the loaded model is left as it was (every trial starts from the checkpoint)
    resampler = load_resampler(str(stage2_checkpoint))
    copy = resampler.truncated(2)
    assert len(copy.qformer.encoder.layer) == 2 and len(resampler.qformer.encoder.layer) == 4
    assert copy.vision_model is resampler.vision_model and copy.qformer is not resampler.qformer
    with torch.no_grad():
        copy.query_tokens.add_(1.0)
    assert not torch.equal(copy.query_tokens, resampler.query_tokens)
