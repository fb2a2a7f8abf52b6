"""Zero-shot baselines (`probing zeroshot`) on tiny random checkpoints of the real classes: InstructBLIP's answers
are the model's own forward and `generate`'s pick, BLIP-2's are its ITM head's `logits_per_image`; the run folder
is a run like `probing train`'s for analyze and report; mistakes are one line; only this command reads an LLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_results_hold_every_number, run_cli

from probing.data import DataOptions
from probing.data.images import load_rgb_image
from probing.models import ModelSource, family_named
from probing.models.answering import DEFAULT_PROMPT, MatchScorer, PromptScorer, generate_position_ids
from probing.models.checkpoint import CheckpointSource
from probing.models.loading import load_config
from probing.tasks import load_split

CPU = torch.device("cpu")


def scorer(kind, folder: Path, **settings):
    checkpoint = CheckpointSource(str(folder))
    config = load_config(checkpoint)
    family = family_named("instructblip" if kind is PromptScorer else "blip2")
    made = kind(checkpoint, config, family, kind.resolved(settings, CPU), ModelSource(model=str(folder)), CPU)
    made.load()
    return made


@pytest.fixture(scope="module")
def prompt_scorer(tiny_checkpoints):
    return scorer(PromptScorer, tiny_checkpoints["instructblip"])


@pytest.fixture(scope="module")
def vsr_options(demo_options):
    return DataOptions(task="vsr", **demo_options["vsr"])


@pytest.fixture(scope="module")
def examples(vsr_options):
    """Five val examples whose captions differ in length (so a batch of them is padded)."""
    found = load_split(vsr_options, "val").examples
    chosen = sorted(found, key=lambda e: len(e.text))
    return [chosen[0], chosen[-1], chosen[len(chosen) // 2], chosen[1], chosen[-2]]


def pixels_of(made, examples):
    return torch.stack([made.pixels.host_pixels(load_rgb_image(e.image_path)) for e in examples])


def reference_parts(made, checkpoint: Path):
    """The model as transformers loads it and InstructBLIP's own processor, from the same folder."""
    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration, InstructBlipProcessor

    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = InstructBlipProcessor(
        image_processor=made.image_processor,
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        qformer_tokenizer=AutoTokenizer.from_pretrained(checkpoint / "qformer_tokenizer"),
        num_query_tokens=model.config.num_query_tokens,
    )
    return model, processor


@pytest.mark.parametrize("answers", [None, ("yes true", "no")], ids=["one-token answers", "a two-token answer"])
def test_answer_scores_equal_the_models_own_forward(tiny_checkpoints, examples, answers):
    """Each answer's log-probability (summed over its tokens) equals what the model's own forward gives the
    processor's input for that example alone; the batch is padded, the single examples are not."""
    folder = tiny_checkpoints["instructblip"]
    made = scorer(PromptScorer, folder, answers=answers)
    with torch.no_grad():
        embeds = made.encode_images(pixels_of(made, examples))
        ours = made.answer_logprobs(embeds, [e.text for e in examples])
    model, processor = reference_parts(made, folder)
    assert made.prompts(["x"]) == [DEFAULT_PROMPT.replace("{text}", "x")]
    for row, (example, prompt) in enumerate(zip(examples, made.prompts([e.text for e in examples]), strict=True)):
        image = load_rgb_image(example.image_path)
        for column, tokens in enumerate(made.answer_tokens):
            # the prompt followed by the answer, all but its last token: the model's next-token log-probabilities
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            tail = torch.tensor([tokens[:-1]], dtype=torch.long)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
            with torch.no_grad():
                logprobs = model(**inputs).logits[0].log_softmax(-1)
            last = logprobs.shape[0] - len(tokens)
            expected = sum(float(logprobs[last + j, token]) for j, token in enumerate(tokens))
            assert abs(float(ours[row, column]) - expected) < 1e-5
    if answers is not None:
        assert [len(tokens) for tokens in made.answer_tokens] == [2, 1]


def test_batched_input_is_generates_and_the_answer_is_its_greedy_pick(prompt_scorer, tiny_checkpoints, examples):
    """The LLM's input is the processor's (image placeholders, BOS, left padding) with generate's position ids:
    greedy `generate` restricted to the two answers picks our answer, from the same log-probabilities."""
    made = prompt_scorer
    model, processor = reference_parts(made, tiny_checkpoints["instructblip"])
    prompts = made.prompts([e.text for e in examples])
    images = [load_rgb_image(e.image_path) for e in examples]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding="longest")
    built = made.llm_inputs(prompts)
    assert torch.equal(built["input_ids"], batch["input_ids"])
    assert torch.equal(built["attention_mask"], batch["attention_mask"])
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded (on the left)
    # The Q-Former's instruction padded on the right, as LAVIS and extraction do (see PromptScorer.image_features).
    right = made.qformer_tokenizer(prompts, padding="longest", padding_side="right", return_tensors="pt")
    batch["qformer_input_ids"], batch["qformer_attention_mask"] = right["input_ids"], right["attention_mask"]
    allowed = [tokens[0] for tokens in made.answer_tokens]
    with torch.no_grad():
        ours = made.score(
            made.encode_images(pixels_of(made, examples)), torch.arange(len(examples)), [e.text for e in examples]
        )
        generated = model.generate(
            **batch,
            max_new_tokens=1,
            do_sample=False,
            prefix_allowed_tokens_fn=lambda row, ids: allowed,
            output_logits=True,
            return_dict_in_generate=True,
        )
    picked = generated.sequences[:, -1].tolist()
    assert picked == [allowed[0] if logit > 0 else allowed[1] for logit in ours.logits.tolist()]
    their = generated.logits[0].log_softmax(-1)[:, allowed]
    assert torch.allclose(their[:, 0] - their[:, 1], ours.logits, atol=1e-5)
    assert generate_position_ids(batch["attention_mask"])[0, -1] == batch["attention_mask"][0].sum() - 1


def test_llm_dtype_applies_to_the_language_model_only(prompt_scorer, tiny_checkpoints, examples):
    """`--llm-dtype bfloat16`: the LLM in bf16, the resampler and projection kept in fp32 (as they load), the
    answers within bf16 rounding of fp32's."""
    made = scorer(PromptScorer, tiny_checkpoints["instructblip"], llm_dtype="bfloat16")
    dtypes = {name.split(".")[0]: p.dtype for name, p in made.model.named_parameters()}
    assert dtypes == {
        "query_tokens": torch.float32,
        "vision_model": torch.float32,
        "qformer": torch.float32,
        "language_projection": torch.float32,
        "language_model": torch.bfloat16,
    }
    with torch.no_grad():
        texts = [e.text for e in examples]
        half = made.answer_logprobs(made.encode_images(pixels_of(made, examples)), texts)
        full = prompt_scorer.answer_logprobs(prompt_scorer.encode_images(pixels_of(prompt_scorer, examples)), texts)
    assert torch.allclose(half, full, atol=0.05) and not torch.equal(half, full)


def test_itm_path_equals_the_models_logits_per_image(tiny_checkpoints, examples):
    """BLIP-2's match log-odds, with each image through the ViT once, equal `logits_per_image` of
    `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)` for each example alone."""
    from transformers import Blip2ForImageTextRetrieval

    folder = tiny_checkpoints["blip2"]
    made = scorer(MatchScorer, folder)
    twice = [examples[0], examples[1], examples[0]]  # an image read by two texts
    distinct = [twice[0], twice[1]]
    with torch.no_grad():
        ours = made.score(
            made.encode_images(pixels_of(made, distinct)), torch.tensor([0, 1, 0]), [e.text for e in twice]
        )
    model = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    for row, example in enumerate(twice):
        tokens = made.resampler.tokenize([example.text])
        pixels = made.resampler.preprocess([load_rgb_image(example.image_path)])
        with torch.no_grad():
            logits = model(pixel_values=pixels, **tokens, use_image_text_matching_head=True).logits_per_image[0]
        assert abs(float(ours.logits[row]) - float(logits[1] - logits[0])) < 1e-5
        assert abs(ours.fields[row]["match_probability"] - float(logits.softmax(-1)[1])) < 1e-5


def zeroshot_args(checkpoint, vsr_options, out, *extra):
    return [
        "zeroshot",
        "--model",
        checkpoint,
        "--task",
        "vsr",
        "--vsr",
        vsr_options.vsr,
        "--images",
        vsr_options.images,
        "--workers",
        "0",
        "--out",
        out,
        *extra,
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", "Is it true? Short answer:"], "error: --prompt: the template has no {text}"),
        (["--answers", "\x01,no"], "error: --answers: '\\x01' tokenizes to nothing"),
        (["--answers", "yes,Yes"], "error: --answers: 'yes' and 'Yes' tokenize to the same tokens"),
        (["--answers", "yes"], "error: --answers: expected 2 comma-separated answers"),
        (["--answers", "yes,zebra"], "error: --answers: 'zebra' has a token the language model's tokenizer"),
        (["--split", "holdout"], "error: --split: unknown split 'holdout'"),
    ],
)
def test_bad_prompts_and_answers_are_refused_in_one_line(
    capsys, tiny_checkpoints, vsr_options, tmp_path, extra, message
):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *zeroshot_args(tiny_checkpoints["instructblip"], vsr_options, out, *extra))
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_what_does_not_apply_is_refused(capsys, tiny_checkpoints, vsr_options, demo_options, tmp_path):
    code, _, err = run_cli(
        capsys, *zeroshot_args(tiny_checkpoints["blip2"], vsr_options, tmp_path / "a", "--prompt", "{text}")
    )
    assert code == 2 and err == "error: --prompt: the ITM head method reads no prompt\n"
    refcocog = demo_options["refcocog"]
    code, _, err = run_cli(
        capsys,
        "zeroshot",
        "--model",
        tiny_checkpoints["blip2"],
        "--task",
        "refcocog",
        *["--refs", refcocog["refs"], "--instances", refcocog["instances"], "--images", refcocog["images"]],
        "--out",
        tmp_path / "b",
    )
    assert code == 2 and err.startswith("error: --task refcocog: zero-shot scoring asks whether a caption is true")


def test_only_zeroshot_reads_the_language_model(capsys, tiny_checkpoints, vsr_options, tmp_path):
    """With the shards that hold only LLM weights deleted, extraction runs as before (it never opens them) and
    `probing zeroshot`, the one command that needs them, says in one line which file is missing."""
    folder = tmp_path / "no-llm"
    shutil.copytree(tiny_checkpoints["instructblip"], folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
    llm_only = sorted(set(weight_map.values()) - needed)
    assert llm_only
    for name in llm_only:
        (folder / name).unlink()
    code, _, err = run_cli(
        capsys,
        "extract",
        "--model",
        folder,
        "--task",
        "vsr",
        "--vsr",
        vsr_options.vsr,
        "--images",
        vsr_options.images,
        "--split",
        "val",
        "--layers",
        "4",
        "--workers",
        "0",
        "--out",
        tmp_path / "features",
    )
    assert code == 0, err
    code, _, err = run_cli(capsys, *zeroshot_args(folder, vsr_options, tmp_path / "run"))
    assert code == 2 and err == f"error: {folder / llm_only[0]}: file not found\n"


def test_run_folder_in_analyze_and_report_then_reused(capsys, tiny_checkpoints, vsr_options, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for family in ("instructblip", "blip2"):
        code, out, err = run_cli(capsys, *zeroshot_args(tiny_checkpoints[family], vsr_options, runs / family))
        assert code == 0, err
        assert "zero-shot run written" in out and "test accuracy" in out
    run = runs / "instructblip"
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["mode"], manifest["probe"], manifest["layer"]) == ("zero-shot prompt", "none", 4)
    assert manifest["settings"]["prompt"] == DEFAULT_PROMPT and manifest["settings"]["answers"] == ["yes", "no"]
    records = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    test = load_split(vsr_options, "test").examples
    assert [r["id"] for r in records] == [e.example_id for e in test]  # split order, every example once
    for record in records:
        logprobs = record["answer_logprobs"]
        odds = logprobs["yes"] - logprobs["no"]
        assert abs(record["probability"] - 1 / (1 + np.exp(-odds))) < 1e-5
        assert record["predicted"] == int(odds > 0) and record["correct"] == (record["predicted"] == record["label"])
        assert record["category"] and "relation" in record  # the category and the example's metadata
    metrics = json.loads((run / "metrics.json").read_text())
    accuracy = metrics["runs"][0]["test"]["accuracy"]
    assert abs(accuracy - np.mean([r["correct"] for r in records])) < 1e-6
    code, out, err = run_cli(capsys, "analyze", run)
    assert code == 0 and out.startswith(
        f"InstructBLIP zero-shot prompt vsr layer 4 none: test accuracy {100 * accuracy:.1f}%"
    )
    code, out, err = run_cli(capsys, "report", runs, "--out", tmp_path / "report")
    assert code == 0, err
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text()
    prompted = next(line for line in table1.splitlines() if line.startswith("| InstructBLIP | zero-shot prompt |"))
    assert prompted.split(" | ")[3].startswith(f"{100 * accuracy:.1f} [")  # val, then test
    assert "| BLIP-2 | ITM head |" in table1
    assert assert_results_hold_every_number(tmp_path / "report") > 20
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert results[results["probe"] == "none"]["layer"].isna().all()  # a model's own answer reads no layer
    assert "| InstructBLIP | zero-shot prompt |" in (tmp_path / "report" / "tables" / "table2.md").read_text()
    # Again: reused without loading a model; another prompt is refused, naming it.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    def no_loading(self):
        raise AssertionError("the model was loaded for a run that exists")

    monkeypatch.setattr(PromptScorer, "load", no_loading)
    code, out, err = run_cli(capsys, *zeroshot_args(tiny_checkpoints["instructblip"], vsr_options, run))
    assert code == 0 and "zero-shot run already there" in out, err
    assert stamps == {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    other = ["--prompt", "Question: {text} Short answer:"]
    code, _, err = run_cli(capsys, *zeroshot_args(tiny_checkpoints["instructblip"], vsr_options, run, *other))
    assert code == 2 and "made with a different 'settings.prompt'" in err


def test_threshold_from_val_is_the_most_accurate_on_val(capsys, tiny_checkpoints, vsr_options, tmp_path):
    out = tmp_path / "itm"
    code, _, err = run_cli(
        capsys,
        *zeroshot_args(tiny_checkpoints["blip2"], vsr_options, out, "--threshold-from", "val", "--split", "test"),
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    threshold = manifest["decision"]["threshold"]
    assert manifest["settings"]["splits"] == ["val", "test"]  # val scored to choose the threshold

    def records(split):
        return [json.loads(line) for line in (out / "predictions" / f"{split}.jsonl").read_text().splitlines()]

    def log_odds(record):
        return float(np.log(record["match_probability"]) - np.log1p(-record["match_probability"]))

    val = records("val")
    odds, labels = np.array([log_odds(r) for r in val]), np.array([r["label"] for r in val])
    cuts = np.concatenate([odds - 1e-9, odds + 1e-9, [-np.inf, np.inf]])
    best = max(np.mean((odds > cut) == labels) for cut in cuts)
    chosen = np.mean((odds > threshold) == labels)
    assert abs(chosen - best) < 1e-12 and abs(np.mean([r["correct"] for r in val]) - chosen) < 1e-12
    for record in records("test"):  # decided at the same threshold (away from it: float32 probabilities)
        if abs(log_odds(record) - threshold) > 1e-4:
            assert record["predicted"] == int(log_odds(record) > threshold)


def test_each_image_goes_through_the_vit_once(prompt_scorer, vsr_options, monkeypatch):
    from probing.baselines.zeroshot import ZeroShotRequest, plan_batches, score_split

    split = load_split(vsr_options, "test").examples
    # Examples of one image in a row: the batches keep them together.
    batches = plan_batches(split, 4)
    assert sorted(i for batch in batches for i in batch) == list(range(len(split)))
    seen = []
    original = PromptScorer.encode_images

    def counting(self, pixels):
        seen.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(PromptScorer, "encode_images", counting)
    request = ZeroShotRequest(model="x", data=vsr_options, out=Path("unused"), batch_size=4, workers=0, progress=False)
    scores = score_split(prompt_scorer, split, request)
    assert sum(seen) == len({e.image_path for e in split}) < len(split)
    with torch.no_grad():  # the same answers as one batch of everything
        everything = prompt_scorer.score(
            prompt_scorer.encode_images(pixels_of(prompt_scorer, split)),
            torch.arange(len(split)),
            [e.text for e in split],
        )
    assert torch.allclose(scores.logits, everything.logits, atol=1e-5)


def test_a_tiny_instructblip_written_before_its_llm_tokenizer_gains_it(tiny_checkpoints, tmp_path):
    from probing.core.artifacts import write_json
    from probing.models.tiny import ensure_checkpoint

    folder = tmp_path / "tiny-instructblip"
    shutil.copytree(tiny_checkpoints["instructblip"], folder)
    write_json(
        folder / "manifest.json", {"kind": "tiny-checkpoint", "family": "instructblip", "seed": 7, "size": "tiny"}
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as `probing demo` wrote it before
        (folder / name).unlink()
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert ensure_checkpoint(folder, "instructblip", seed=7).reused
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {name: data for name, data in after.items() if name in before} == before  # nothing else changed
    assert set(after) - set(before) == {Path("tokenizer.json"), Path("tokenizer_config.json")}
    assert (folder / "tokenizer.json").read_bytes() == (
        tiny_checkpoints["instructblip"] / "tokenizer.json"
    ).read_bytes()


def test_settings_reach_the_request_from_the_command_line_and_a_config(capsys, monkeypatch, tmp_path):
    """Every zero-shot setting of the run's identity can be set both ways (as `tests/test_settings.py` checks
    for the other commands)."""
    import probing.baselines.zeroshot
    from probing.baselines.zeroshot import ZeroShotSettings
    from probing.core.settings import declared, identity
    from probing.runs.config import Config, from_dict
    from probing.runs.pipeline import plan as plan_units
    from probing.runs.pipeline import zeroshot_request

    routes = {
        "prompt": (["--prompt", "Q: {text} A:"], "Q: {text} A:"),
        "answers": (["--answers", "true,false"], ["true", "false"]),
        "llm_dtype": (["--llm-dtype", "bfloat16"], "bfloat16"),
        "threshold_from": (["--threshold-from", "val"], "val"),
        "splits": (["--split", "val,test"], ["val", "test"]),
        "batch_size": (["--batch-size", "5"], 5),
        "text_preprocessing": (["--text-preprocessing", "lavis"], "lavis"),
    }
    assert sorted(f.name for f, info in declared(ZeroShotSettings) if info.identity) == sorted(routes)
    seen = {}

    def stage(request):
        seen["request"] = request
        raise KeyboardInterrupt  # stop there (the CLI exits with 130)

    monkeypatch.setattr(probing.baselines.zeroshot, "run_zeroshot", stage)
    for name, (args, value) in routes.items():
        code, _, _ = run_cli(capsys, "zeroshot", "--model", "instructblip", "--task", "vsr", "--out", "x", *args)
        assert code == 130 and identity(seen["request"])[name] == value
        config = from_dict(
            Config,
            {
                "name": "t",
                "workspace": str(tmp_path),
                "models": {"m": {"model": "instructblip"}},
                "experiments": [
                    {"name": "z", "tasks": ["vsr"], "models": ["m"], "modes": ["zeroshot"], "zeroshot": {name: value}}
                ],
            },
        )
        units = plan_units(config, {"m": 4})
        request = zeroshot_request(
            config, units[0], {"m": ModelSource(model="instructblip")}, {"vsr": DataOptions(task="vsr")}
        )
        assert identity(request)[name] == value
        assert request.out == tmp_path / "runs" / "z" / "m" / "vsr" / "zeroshot" and request.label == "m"


def test_a_config_runs_its_zeroshot_experiment_and_reuses_it(capsys, tmp_path):
    config = tmp_path / "zeroshot.yaml"
    config.write_text(
        f"""
name: zs
workspace: {tmp_path / "workspace"}
models:
  BLIP-2 (tiny random): {{tiny: blip2}}
  InstructBLIP (tiny random): {{tiny: instructblip}}
data:
  demo: {{refcocog_images: 20, vsr_images: 30}}
extract: {{workers: 0}}
experiments:
  - name: zeroshot
    tasks: [vsr]
    models: [BLIP-2 (tiny random), InstructBLIP (tiny random)]
    modes: [zeroshot]
    zeroshot: {{batch_size: 8}}
"""
    )
    code, out, err = run_cli(capsys, "run", config)
    assert code == 0, err
    assert "zero-shot runs: 2 built, 0 reused" in out
    runs = tmp_path / "workspace" / "runs" / "zeroshot"
    assert (runs / "InstructBLIP (tiny random)" / "vsr" / "zeroshot" / "metrics.json").is_file()
    table1 = (tmp_path / "workspace" / "report-zs" / "tables" / "table1.md").read_text()
    assert (
        "| InstructBLIP (tiny random) | zero-shot prompt |" in table1
        and "| BLIP-2 (tiny random) | ITM head |" in table1
    )
    code, out, err = run_cli(capsys, "run", config)
    assert code == 0 and "zero-shot runs: 0 built, 2 reused" in out, err


@pytest.mark.parametrize(
    "experiment,message",
    [
        (
            "{name: z, tasks: [vsr, refcocog], models: [m], modes: [zeroshot]}",
            "config field 'experiments[0].tasks[1]': the mode zeroshot answers binary tasks; refcocog is a box task",
        ),
        (
            "{name: z, tasks: [vsr], models: [r], modes: [zeroshot]}",
            "config field 'models.r.init': the mode zeroshot (experiments[0]) needs the pretrained weights",
        ),
        (
            "{name: z, tasks: [vsr], models: [m], modes: [zeroshot], zeroshot: {batch_size: 0}}",
            "config field 'experiments[0].zeroshot.batch_size': must be >= 1, got 0",
        ),
    ],
)
def test_zeroshot_config_mistakes_name_the_field(tmp_path, experiment, message):
    from probing.core.errors import ProbingError
    from probing.runs.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(
        "name: c\nworkspace: w\nmodels: {m: {model: instructblip}, r: {model: blip2, init: random}}\n"
        f"experiments: [{experiment}]\n"
    )
    with pytest.raises(ProbingError) as caught:
        load_config(config, check_paths=False)
    assert str(caught.value) == f"{config}: {message}"
