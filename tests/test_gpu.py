"""The GPU paths, checked on a CUDA device: the same exactness and equivalence claims as on the CPU.

Skipped where there is no GPU (CI has none); run them on a GPU machine with `python -m pytest tests/test_gpu.py`.
TF32 is switched off in these tests so that fp32 on the GPU means fp32: equality with transformers' own forward
is then a matter of summation order only.
"""

import json

import pytest
import torch
from conftest import run_cli
from test_models import model_inputs
from transformers import Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

from probing.data import DataOptions
from probing.models import load_resampler
from probing.probes.train import TrainSettings, Trial, train_frozen, train_single
from probing.store.extract import ExtractionRequest, extract
from probing.tasks import load_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
FP32_ON_GPU = 2e-5  # fp32 against fp32 on the GPU, different batch shapes: summation order only


@pytest.fixture(autouse=True)
def strict_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def store_on(device, checkpoint, options, out, **overrides):
    settings = dict(
        model=str(checkpoint),
        data=options,
        split="val",
        out=out,
        batch_size=16,
        shard_size=64,
        dtype="float32",
        workers=2,
        progress=False,
        device=device,
    )
    return extract(ExtractionRequest(**(settings | overrides))).value


def inputs_for(resampler, options, ids):
    examples = {e.example_id: e for e in load_split(options, "val").examples}
    pixels, tokens = model_inputs(resampler, [examples[i] for i in ids])
    return pixels.to(CUDA), {k: v.to(CUDA) for k, v in tokens.items()}


@pytest.fixture(scope="module")
def blip2_gpu_store(tiny_checkpoints, refcocog_val, tmp_path_factory):
    return store_on(
        CUDA,
        tiny_checkpoints["blip2"],
        refcocog_val,
        tmp_path_factory.mktemp("gpu") / "blip2",
        vision_dtype="float32",
        layers="all",
    )


def test_blip2_gpu_store_equals_transformers_forward_on_the_gpu(blip2_gpu_store, tiny_checkpoints, refcocog_val):
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints["blip2"]).to(CUDA).eval()
    model.qformer.config.output_hidden_states = True  # read by transformers' output capturing
    resampler = load_resampler(str(tiny_checkpoints["blip2"]), device=CUDA)
    ids = blip2_gpu_store.ids[:24]
    pixels, tokens = inputs_for(resampler, refcocog_val, ids)
    with torch.no_grad():
        output = model(
            pixel_values=pixels,
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            use_image_text_matching_head=True,
        )
        hidden = output.text_model_output.hidden_states
        for layer in blip2_gpu_store.layers:
            stored = blip2_gpu_store.load(layer)[:24]
            assert torch.allclose(stored, hidden[layer][:, :4].cpu(), atol=FP32_ON_GPU, rtol=0), layer
        from_store = resampler.itm_logits(blip2_gpu_store.load(blip2_gpu_store.layers[-1])[:24].to(CUDA))
    assert torch.allclose(from_store, output.logits_per_image, atol=FP32_ON_GPU, rtol=0)


def test_gpu_and_cpu_stores_agree(blip2_gpu_store, tiny_checkpoints, refcocog_val, tmp_path):
    on_cpu = store_on("cpu", tiny_checkpoints["blip2"], refcocog_val, tmp_path / "cpu", layers="all", workers=0)
    assert on_cpu.ids == blip2_gpu_store.ids  # the same order, whichever device computed it
    for layer in on_cpu.layers:
        cpu, gpu = on_cpu.load(layer), blip2_gpu_store.load(layer)
        # other kernels (GELU, softmax, summation order): fp32 rounding, growing slowly with depth
        relative = float((cpu - gpu).norm() / cpu.norm())
        assert relative < 1e-5 and (cpu - gpu).abs().max() < 1e-3, (layer, relative)


def test_instructblip_gpu_store_equals_the_qformer_inside_the_full_model(tiny_checkpoints, refcocog_val, tmp_path):
    store = store_on(CUDA, tiny_checkpoints["instructblip"], refcocog_val, tmp_path / "f", vision_dtype="float32")
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_checkpoints["instructblip"]).to(CUDA).eval()
    resampler = load_resampler(str(tiny_checkpoints["instructblip"]), device=CUDA)
    pixels, tokens = inputs_for(resampler, refcocog_val, store.ids[:16])
    captured = {}
    model.qformer.config.output_hidden_states = True
    hook = model.qformer.register_forward_hook(lambda module, args, output: captured.setdefault("qformer", output))
    prompt = torch.cat([torch.full((16, 4), model.config.image_token_index), torch.randint(0, 90, (16, 6))], dim=1)
    with torch.no_grad():
        model(
            pixel_values=pixels,
            qformer_input_ids=tokens["input_ids"],
            qformer_attention_mask=tokens["attention_mask"],
            input_ids=prompt.to(CUDA),
        )
    hook.remove()
    for layer in store.layers:
        inside = captured["qformer"].hidden_states[layer][:, :4].cpu()
        assert torch.allclose(store.load(layer)[:16], inside, atol=FP32_ON_GPU, rtol=0), layer


def test_bf16_vit_stays_close_to_fp32(blip2_gpu_store, tiny_checkpoints, refcocog_val, tmp_path):
    """The default GPU path (ViT in bf16, Q-Former fp32) against the all-fp32 store: bf16 rounding, no more."""
    fast = store_on(CUDA, tiny_checkpoints["blip2"], refcocog_val, tmp_path / "bf16", layers="all")
    assert fast.manifest["request"]["vision_dtype"] == "bfloat16"
    for layer in fast.layers[1:]:
        exact, rounded = blip2_gpu_store.load(layer), fast.load(layer)
        relative = (rounded - exact).norm() / exact.norm()
        assert 0 < relative < 0.02, (layer, float(relative))  # bf16 keeps 8 bits: ~0.4 % per rounding


def test_the_fast_options_stay_close_to_the_default(tiny_checkpoints, refcocog_val, tmp_path):
    """The options that trade the last bits for speed: a compiled ViT (fused kernels) and a bf16 Q-Former."""
    default = store_on(CUDA, tiny_checkpoints["blip2"], refcocog_val, tmp_path / "default", layers="all")
    compiled = store_on(
        CUDA, tiny_checkpoints["blip2"], refcocog_val, tmp_path / "compiled", layers="all", compile_vision=True
    )
    bf16 = store_on(
        CUDA,
        tiny_checkpoints["blip2"],
        refcocog_val,
        tmp_path / "bf16",
        layers="all",
        compile_vision=True,
        qformer_dtype="bfloat16",
    )
    for layer in default.layers:
        reference = default.load(layer)
        for store, bound in ((compiled, 0.02), (bf16, 0.05)):
            relative = float((store.load(layer) - reference).norm() / reference.norm())
            assert relative < bound, (store.path.name, layer, relative)


def test_uint8_pixels_normalised_on_the_gpu_equal_the_processors(tiny_checkpoints, refcocog_val):
    from probing.data.images import load_rgb_image

    resampler = load_resampler(str(tiny_checkpoints["blip2"]), device=CUDA)
    images = [load_rgb_image(e.image_path) for e in load_split(refcocog_val, "val").examples[:8]]
    host = torch.stack([resampler.pixels.host_pixels(image) for image in images])
    assert host.dtype == torch.uint8
    on_gpu = resampler.pixels.device_pixels(host, torch.device(CUDA))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), resampler.preprocess(images))


@pytest.mark.parametrize(
    "task,probe", [("vsr", "linear"), ("refcocog", "linear"), ("refcocog", "swiglu2"), ("rcm", "swiglu4")]
)
def test_batched_trials_equal_separate_runs_in_fp32_on_the_gpu(task, probe, monkeypatch):
    """With both trainers held to fp32 (the one precision switch, `compute_dtype`), batching on the GPU gives the
    separate runs' weights and metrics, as on the CPU."""
    from test_train import synthetic

    import probing.probes.train

    monkeypatch.setattr(probing.probes.train, "compute_dtype", lambda device: torch.float32)
    train, val = synthetic(task, 300), synthetic(task, 100, seed=1)
    settings = TrainSettings(task=task, probe=probe, hidden=8, batch_size=32, patience=2, device=CUDA)
    trials = [Trial(lr=3e-3, epochs=4, seed=1, giou_scale=2.0, l1_scale=5.0), Trial(lr=1e-3, epochs=7, seed=2)]
    for trial, together in zip(trials, train_frozen(train, val, trials, settings), strict=True):
        alone = train_single(train, val, trial, settings)
        assert together.best_epoch == alone.best_epoch and together.epochs_run == alone.epochs_run
        for name in together.val_metrics:
            assert together.val_metrics[name] == pytest.approx(alone.val_metrics[name], abs=1e-5), name
        for (name, mine), (_, theirs) in zip(
            together.probe.state_dict().items(), alone.probe.state_dict().items(), strict=True
        ):
            assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("task,probe", [("vsr", "linear"), ("refcocog", "swiglu2")])
def test_batched_trials_follow_separate_runs_in_bf16_on_the_gpu(task, probe):
    """The default GPU precision: both trainers compute in bf16 (resident bf16 features / autocast). Rounding
    then differs between a batched and a plain matmul and Adam amplifies it in the weights, so the claim is
    about the training: the same losses and metrics, up to bf16 noise."""
    from test_train import synthetic

    train, val = synthetic(task, 600), synthetic(task, 200, seed=1)
    settings = TrainSettings(task=task, probe=probe, hidden=8, batch_size=32, patience=None, device=CUDA)
    trials = [Trial(lr=3e-3, epochs=4, seed=1), Trial(lr=1e-3, epochs=6, seed=2)]
    for trial, together in zip(trials, train_frozen(train, val, trials, settings), strict=True):
        alone = train_single(train, val, trial, settings)
        assert together.epochs_run == alone.epochs_run == trial.epochs
        assert [h["train_loss"] for h in together.history] == pytest.approx(
            [h["train_loss"] for h in alone.history], rel=2e-2
        )
        assert [h["val_loss"] for h in together.history] == pytest.approx(
            [h["val_loss"] for h in alone.history], rel=2e-2
        )


def test_unfrozen_training_on_the_gpu_runs_and_its_loss_falls(capsys, tiny_checkpoints, demo_options, tmp_path):
    vsr = DataOptions(task="vsr", **demo_options["vsr"])
    for split in ("train", "val", "test"):
        store_on(
            CUDA,
            tiny_checkpoints["blip2"],
            vsr,
            tmp_path / "vsr" / split,
            split=split,
            layers="3",
            store_vision=True,
            dtype="float16",
        )
    common = [
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        tiny_checkpoints["blip2"],
        "--vsr",
        vsr.vsr,
        "--images",
        vsr.images,
        "--layer",
        3,
        "--lr",
        3e-3,
        "--epochs",
        8,
        "--batch-size",
        32,
        "--device",
        CUDA,
    ]
    for name, extra in (("pixels", []), ("stored", ["--features", tmp_path / "vsr"])):
        code, _, err = run_cli(capsys, *common, *extra, "--out", tmp_path / name)
        assert code == 0, err
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        losses = [h["train_loss"] for h in metrics["runs"][0]["history"]]
        assert losses[-1] < 0.95 * losses[0], (name, losses)
        assert 0 <= metrics["runs"][0]["test"]["accuracy"] <= 1


def test_features_reach_the_gpu_chunk_by_chunk_unchanged():
    from probing.core.device_copies import to_device_chunked

    features = torch.randn(1000, 3, 7, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    placed = to_device_chunked(features, torch.device(CUDA), torch.bfloat16, chunk_bytes=3 * 7 * 2 * 64)  # 16 chunks
    assert placed.device.type == "cuda" and placed.dtype == torch.bfloat16 and placed.shape == features.shape
    assert torch.equal(placed.cpu(), features.to(torch.bfloat16))
