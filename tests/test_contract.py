"""The resampler contract (`probing.models.base`): a third family defined in the tests folder
(`tests/families/minimal_family.py`, a Perceiver) extracts and trains through the normal paths with no edit to
the package, its per-layer latents matching the module's own forward; and the Q-Former families, moved onto the
contract, still derive the store identities that stores written before it carry (so those stores are reused)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from families.minimal_family import FAMILY_NAME, MINIMAL_FAMILY, MinimalPerceiverResampler, write_checkpoint

from probing.core.artifacts import MANIFEST_NAME
from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.data.images import load_rgb_image
from probing.models import load_resampler, register_family
from probing.models.base import Resampler
from probing.models.registry import families, unregister_family
from probing.store.extract import ExtractionRequest, extract
from probing.tasks import load_split

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def minimal_family():
    """The family registered for one test (and taken out again, so that other tests see the package alone)."""
    register_family(MINIMAL_FAMILY)
    yield MINIMAL_FAMILY
    unregister_family(FAMILY_NAME)


@pytest.fixture(scope="module")
def perceiver_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("perceiver") / "model", seed=3)


def test_the_family_file_touches_nothing_of_the_package():
    """One file plus a registration: the family subclasses the contract and names only transformers' modules."""
    source = (Path(__file__).parent / "families" / "minimal_family.py").read_text()
    imported = {line.split()[1] for line in source.splitlines() if line.startswith(("from probing", "import probing"))}
    assert imported == {"probing.models.base", "probing.models.registry"}
    assert issubclass(MinimalPerceiverResampler, Resampler)
    assert FAMILY_NAME not in [family.name for family in families()]


def test_a_perceiver_family_extracts_every_layer_as_its_own_forward_computes_it(
    minimal_family, perceiver_checkpoint, refcocog_val, tmp_path
):
    from transformers import Idefics2Model

    store = extract(
        ExtractionRequest(
            model=str(perceiver_checkpoint),
            family=FAMILY_NAME,
            data=refcocog_val,
            split="val",
            out=tmp_path / "store",
            layers="all",
            dtype="float32",
            workers=0,
            progress=False,
        )
    ).value
    assert store.layers == [1, 2, 3] and store.manifest["request"]["model"]["family"] == FAMILY_NAME
    assert store.per_image and store.manifest["request"]["rows"] == "per image"
    examples = {e.example_id: e for e in load_split(refcocog_val, "val").examples}
    first = [examples[i] for i in store.ids[:6]]
    # The reference: transformers' own model, read from the same checkpoint (language model included). The
    # Perceiver's forward returns only its last layer, normed: layer L is checked as the forward of a copy
    # cut after L, against the store's layer L passed through the same final norm.
    model = Idefics2Model.from_pretrained(perceiver_checkpoint).eval()
    resampler = load_resampler(str(perceiver_checkpoint), family=FAMILY_NAME)
    pixels = resampler.preprocess([load_rgb_image(e.image_path) for e in first])
    with torch.no_grad():
        context = model.vision_model(pixel_values=pixels).last_hidden_state
        mask = torch.ones(context.shape[:2], dtype=torch.long)
        for layer in store.layers:
            connector = copy.deepcopy(model.connector)
            connector.perceiver_resampler.layers = connector.perceiver_resampler.layers[:layer]
            expected = connector(context, attention_mask=mask)
            stored = store.load(layer)[:6]
            assert stored.shape == (6, 5, 16)
            assert torch.allclose(model.connector.perceiver_resampler.norm(stored), expected, atol=1e-5)
        # layer 0 is the Perceiver's learned latents, the same for every image
        zero = resampler.query_states(resampler.encode_images(pixels), None, [0])[:, 0]
        assert torch.equal(zero, model.connector.perceiver_resampler.latents.expand(6, -1, -1))


def test_a_perceiver_family_trains_its_connector_and_keeps_its_vision_model(minimal_family, perceiver_checkpoint):
    resampler = load_resampler(str(perceiver_checkpoint), family=FAMILY_NAME)
    trained = dict(resampler.trainable_parameters())
    assert trained and all(name.startswith("connector.") for name in trained)
    assert "connector.perceiver_resampler.latents" in trained
    copy_ = resampler.truncated(2)
    assert len(copy_.connector.perceiver_resampler.layers) == 2 and len(resampler.layer_modules()) == 3
    assert copy_.vision_model is resampler.vision_model and copy_.connector is not resampler.connector
    copy_.train()
    assert not copy_.vision_model.training and copy_.connector.training
    with pytest.raises(ProbingError, match=r"^--layer: layer 4 does not exist \(the Perceiver has 1..3\)$"):
        resampler.truncated(4)
    resampler.set_dtypes(torch.float32, torch.bfloat16)
    assert (
        resampler.vision_dtype == torch.float32 and resampler.latent_dtype == resampler.qformer_dtype == torch.bfloat16
    )


def test_a_perceiver_family_trains_unfrozen_through_the_command_line(
    capsys, minimal_family, perceiver_checkpoint, demo_options, tmp_path
):
    vsr = demo_options["vsr"]
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        perceiver_checkpoint,
        "--family",
        FAMILY_NAME,
        "--vsr",
        vsr["vsr"],
        "--images",
        vsr["images"],
        "--layer",
        2,
        "--lr",
        3e-3,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["family"] == FAMILY_NAME and manifest["mode"] == "unfrozen"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["runs"][0]["history"]] == [1, 2]
    assert 0 <= metrics["runs"][0]["test"]["accuracy"] <= 1


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
@pytest.mark.parametrize("task", ["refcocog", "vsr"])
def test_stores_written_before_the_contract_are_reused(family, task, tiny_checkpoints, demo_options, tmp_path):
    """The requests in the fixture were written by the code before the contract; the current code extracts the
    same request, and a store whose manifest holds the old request is reused, not recomputed."""
    before = json.loads((FIXTURES / "store_requests_before_contract.json").read_text())[f"{family}/{task}/pretrained"]
    request = ExtractionRequest(
        model=str(tiny_checkpoints[family]),
        data=DataOptions(task=task, **demo_options[task]),
        split="val",
        out=tmp_path / "store",
        layers="all",
        workers=0,
        progress=False,
        store_vision=task == "vsr",
    )
    now = extract(request).value.manifest["request"]
    # The dataset fingerprint is the data's (the conftest demo data), not the model's: it is carried over. The
    # layers were part of a store's identity then; now the manifest lists them beside it (stores grow by layers).
    assert now | {"layers": before["layers"]} == before | {"dataset_fingerprint": now["dataset_fingerprint"]}
    assert "layers" not in now
    manifest_path = tmp_path / "store" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["request"] = before | {"dataset_fingerprint": now["dataset_fingerprint"]}
    manifest_path.write_text(json.dumps(manifest))
    assert extract(request).reused
