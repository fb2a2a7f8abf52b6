"""The paper's inputs: texts as LAVIS prepares them (a recorded choice), RCM captions whose claimed cell the
token limit cuts, InstructBLIP's Q-Former instruction (a recorded choice)."""

from pathlib import Path

import pytest
from conftest import run_cli

from probing.data.rcm import rcm_caption
from probing.data.types import Example, SplitData
from probing.models import load_resampler
from probing.models.text import QFormerText, lavis_caption
from probing.store.extract import ExtractionRequest, store_identity, text_truncation

# Hand-checked against BlipCaptionProcessor.pre_caption's definition (lower-case; .!"()*#:;~ -> space; runs of
# two or more whitespace characters -> one space; trailing newlines, then surrounding spaces, stripped; 50 words).
LAVIS_CASES = [
    ("The cup is on top of the dining table.", "the cup is on top of the dining table"),
    ('He said: "Look!" (twice) ~ *wow* #1;  done...', "he said look twice wow 1 done"),
    ("A  man   in RED\t\tholding a cup", "a man in red holding a cup"),
    ("  one tab\there, a\nnewline ", "one tab\there, a\nnewline"),  # single tabs/newlines stay, as in LAVIS
    ("it's a dog's bowl, isn't it?", "it's a dog's bowl, isn't it?"),  # ' , ? are kept
    ("", ""),
]


@pytest.mark.parametrize("text,expected", LAVIS_CASES)
def test_lavis_caption_matches_hand_checked_outputs(text, expected):
    assert lavis_caption(text) == expected


def test_lavis_caption_keeps_at_most_50_words():
    words = [f"w{i}" for i in range(60)]
    assert lavis_caption(" ".join(words) + ".") == " ".join(words[:50])
    assert lavis_caption(" ".join(words[:50]) + ".") == " ".join(words[:50])  # 50 words: all kept
    # words are counted after the punctuation became spaces: "a.b" is two words
    assert lavis_caption("A.B " + " ".join(words[:49])) == "a b " + " ".join(words[:48])


@pytest.fixture(scope="module")
def blip2(tiny_checkpoints):
    return load_resampler(str(tiny_checkpoints["blip2"]))


@pytest.fixture(scope="module")
def instructblip(tiny_checkpoints):
    return load_resampler(str(tiny_checkpoints["instructblip"]))


def test_the_resampler_tokenizes_the_preprocessed_text(blip2):
    raw = ["The MAN is (next to) the dog.", "A cat: on the bed!"]
    try:
        plain = blip2.tokenize(lavis_caption(t) for t in raw)
        blip2.set_text(QFormerText(text_preprocessing="lavis"))
        lavis = blip2.tokenize(raw)
    finally:
        blip2.set_text(QFormerText())
    assert plain["input_ids"].tolist() == lavis["input_ids"].tolist()
    assert blip2.tokenize(raw)["input_ids"].shape[1] > lavis["input_ids"].shape[1]  # the periods, parentheses ...


def rcm_examples(phrase_words: list[int]) -> SplitData:
    vocabulary = "man woman dog cat horse car bus table chair couch".split()
    examples = []
    for index, count in enumerate(phrase_words):
        phrase = " ".join(vocabulary[i % len(vocabulary)] for i in range(count))
        examples.append(
            Example(
                example_id=index,
                image_id=1,
                image_path=Path("x.jpg"),
                text=rcm_caption(phrase, 0),
                category="animal",
                label=1,
                metadata={"cell_name": "top left", "cell": 0},
            )
        )
    return SplitData(task="rcm", split="val", examples=examples, fingerprint="f", sources={})


def test_rcm_texts_whose_cell_words_are_cut_are_counted(blip2, instructblip, caplog, tmp_path):
    # "The phrase '<k words>' refers to the top left part of the image." is 16 + k tokens with [CLS] and [SEP];
    # BLIP-2 keeps [CLS], 30 tokens and [SEP]: truncated when k > 16; "left" (token k + 9) lost when k > 21.
    data = rcm_examples([10, 17, 21, 22, 30])
    caplog.set_level("WARNING")
    assert text_truncation(blip2, data, tmp_path) == {"truncated_texts": 4, "key_words_cut": 2}
    assert "2 of 5 texts lose the words their label depends on to the 32-token truncation" in caplog.text
    # the LAVIS text drops the final period: 15 + k tokens, truncated when k > 17, "left" still lost when k > 21
    blip2.set_text(QFormerText(text_preprocessing="lavis"))
    try:
        assert text_truncation(blip2, data, tmp_path) == {"truncated_texts": 3, "key_words_cut": 2}
    finally:
        blip2.set_text(QFormerText())
    # InstructBLIP truncates on the left at 128 tokens: nothing is cut
    assert text_truncation(instructblip, data, tmp_path) == {"truncated_texts": 0, "key_words_cut": 0}
    # a task without key words counts truncated texts only
    vsr = SplitData(task="vsr", split="val", examples=data.examples, fingerprint="f", sources={})
    assert text_truncation(blip2, vsr, tmp_path) == {"truncated_texts": 4}


def test_the_store_identity_records_the_text_choices_only_when_made(blip2, instructblip, tmp_path):
    data = rcm_examples([3])
    request = ExtractionRequest(model="m", data=None, split="val", out=tmp_path)
    default = store_identity(blip2, data, request)
    assert "text_preprocessing" not in default and "instruction" not in default  # stores made before stay valid
    lavis = ExtractionRequest(model="m", data=None, split="val", out=tmp_path, text_preprocessing="lavis")
    assert store_identity(blip2, data, lavis) == default | {"text_preprocessing": "lavis"}
    instructed = ExtractionRequest(model="m", data=None, split="val", out=tmp_path, instruction="Is it {text}?")
    assert store_identity(instructblip, data, instructed)["instruction"] == "Is it {text}?"


PAPER_CONFIGS = [
    "table1",
    "table2",
    "table3",
    "table5",
    "figure2a",
    "figure2b",
    "figure4",
    "figure5",
    "controls",
    "rigor",
]


def test_the_paper_configs_read_texts_as_lavis_and_the_demo_as_given(tmp_path):
    from probing.models import ModelSource
    from probing.runs.config import load_config
    from probing.runs.pipeline import plan, search_request

    root = Path(__file__).resolve().parents[1]
    for name in PAPER_CONFIGS:
        assert load_config(root / "experiments" / f"{name}.yaml", check_paths=False).extract.text_preprocessing == (
            "lavis"
        ), name
    assert load_config(root / "probing" / "runs" / "demo.yaml", check_paths=False).extract.text_preprocessing == "none"
    # unfrozen searches read their texts as the config's stores were extracted; frozen ones take them from the stores
    table1 = load_config(root / "experiments" / "table1.yaml", check_paths=False)
    units = [unit for unit in plan(table1, {"BLIP-2": 12, "InstructBLIP": 12}) if unit.task == "vsr"]
    sources = {label: ModelSource(model="blip2") for label in ("BLIP-2", "InstructBLIP")}
    options = {"vsr": None}
    modes = {u.mode: search_request(table1, u, sources, options, tmp_path).text_preprocessing for u in units}
    assert modes == {"frozen": "none", "unfrozen": "lavis"}


def test_instructblip_reads_its_text_inside_the_instruction(instructblip):
    import torch

    texts = ["The cat is on the bed."]
    template = "Is this true of the image? {text} Answer:"
    embeds = torch.randn(
        1, 17, instructblip.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    bare = instructblip.query_states(embeds, texts, [4])
    try:
        instructblip.set_text(QFormerText(text_preprocessing="lavis", instruction=template))
        tokens = instructblip.tokenize(texts)
        instructed = instructblip.query_states(embeds, texts, [4])
    finally:
        instructblip.set_text(QFormerText())
    expected = instructblip.tokenize(["Is this true of the image? the cat is on the bed Answer:"])
    assert tokens["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(instructed, instructblip.query_states(embeds, expected, [4]))
    assert not torch.allclose(bare, instructed)


def test_instructions_are_refused_without_a_text_field_and_for_blip2(capsys, tiny_checkpoints, demo_options, tmp_path):
    common = ["extract", "--task", "vsr", "--split", "val", "--out", tmp_path / "store", "--device", "cpu"]
    data = [f"--{name}={value}" for name, value in demo_options["vsr"].items()]
    code, _, err = run_cli(
        capsys, *common, *data, "--model", tiny_checkpoints["instructblip"], "--instruction", "Is it true?"
    )
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --instruction: the template has no {text} (where each example's text goes)"
    )
    code, _, err = run_cli(capsys, *common, *data, "--model", tiny_checkpoints["blip2"], "--instruction", "Q: {text}")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --instruction: the blip2 Q-Former reads the text itself, never an instruction (InstructBLIP only)"
    )
    assert not (tmp_path / "store").exists()


# (relation, label, prediction); the official script (analysis_scripts/eval_compute_acc_by_rel_meta_cat.py) maps
# each relation through rel_meta_category_dict.txt (later lines win: "among" is Unallocated) and skips a relation
# missing from it ("congruent") with "no availible meta cat". By hand: Projective 1/2 (on top of right, under
# wrong), Topological 2/3, Adjacency 0/1, Unallocated 2/2 (next to, among); congruent (0/2) in no category; overall
# 5/10.
VSR_FIXTURE = [
    ("on top of", 1, 1),
    ("under", 0, 1),
    ("contains", 1, 1),
    ("inside", 0, 0),
    ("touching", 1, 0),
    ("adjacent to", 1, 0),
    ("congruent", 1, 0),
    ("next to", 1, 1),
    ("among", 0, 0),
    ("congruent", 0, 1),
]
OFFICIAL_PER_CATEGORY = {
    "Adjacency": (0.0, 1),
    "Projective": (0.5, 2),
    "Topological": (2 / 3, 3),
    "Unallocated": (1.0, 2),
}


def test_vsr_per_category_accuracy_matches_the_official_script(tmp_path):
    import json

    import numpy as np

    from probing.data.vsr import read_vsr_file
    from probing.report.analysis import RunResults, analyse, per_category
    from probing.tasks import get_task

    lines = [
        {
            "image": f"{index:012d}.jpg",
            "caption": f"The cat is {relation} the dog.",
            "label": label,
            "relation": relation,
        }
        for index, (relation, label, _) in enumerate(VSR_FIXTURE)
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_vsr_file(tmp_path / "test.jsonl")
    correct = np.array([[int(label == prediction) for _, label, prediction in VSR_FIXTURE]])
    run = RunResults(
        path=tmp_path,
        task="vsr",
        mode="frozen",
        layer=12,
        probe="linear",
        family="blip2",
        init="pretrained",
        label="BLIP-2",
        metric="accuracy",
        seeds=[0],
        ids=list(range(len(records))),
        categories=[record.meta_category for record in records],
        correct=correct,
        metadata=[{} for _ in records],
    )
    estimates = per_category(run)
    assert {c: e.examples for c, e in estimates.items()} == {c: n for c, (_, n) in OFFICIAL_PER_CATEGORY.items()}
    assert {c: e.mean for c, e in estimates.items()} == pytest.approx(
        {c: a for c, (a, _) in OFFICIAL_PER_CATEGORY.items()}
    )
    examples = [Example(0, 0, Path("x.jpg"), "", category=r.meta_category) for r in records]
    assert get_task("vsr").category_counts(examples) == {c: n for c, (_, n) in OFFICIAL_PER_CATEGORY.items()}
    analysis = analyse(run)
    assert analysis["test"]["mean"] == pytest.approx(0.5)  # the overall accuracy keeps every example
    assert set(analysis["per_category"]) == set(OFFICIAL_PER_CATEGORY)


FIXTURES = Path(__file__).parent / "fixtures"
# What the key map may leave out: the MLM head, the ITC temperature, position-id buffers, the language model.
DROPPED = ("Qformer.cls.", "temp", "Qformer.bert.embeddings.position_ids", "llm_model.")


def lavis_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """The fixture's checkpoints: {section: {LAVIS key: shape}}."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    for line in (FIXTURES / "lavis_blip2_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, shape = line.split()
        current[key] = () if shape == "-" else tuple(int(n) for n in shape.split(","))
    return sections


@pytest.mark.parametrize("section,family", [("blip2_pretrain", "blip2"), ("instructblip_vicuna7b", "instructblip")])
def test_the_lavis_key_map_sends_every_real_key_to_a_transformers_parameter_of_its_shape(section, family):
    import torch
    from transformers import Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

    from probing.models import family_named
    from probing.models.lavis import lavis_to_hf
    from probing.models.tiny import build_config

    state = {key: torch.empty(shape, device="meta") for key, shape in lavis_keys()[section].items()}
    config = build_config(family, "real", vocab_size=30523)
    model_class = {"blip2": Blip2ForImageTextRetrieval, "instructblip": InstructBlipForConditionalGeneration}[family]
    with torch.device("meta"):  # the real size, nothing allocated
        model = model_class(config)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    mapped, ignored = lavis_to_hf(state, family_named(family).lavis, config.vision_config.num_hidden_layers)
    assert sorted(k for k in ignored if not k.startswith(DROPPED)) == []
    assert {k: tuple(v.shape) for k, v in mapped.items()} == reference  # every key, every shape, nothing left over
    resampler_class = family_named(family).resampler
    needed = {k for k in reference if k.startswith(resampler_class.checkpoint_prefixes)}
    assert needed <= set(mapped) and any(k.startswith("vision_model.encoder.layers.38.") for k in needed)


def test_a_lavis_second_stage_checkpoint_is_refused_naming_what_it_is(tmp_path, capsys, demo_options):
    import torch

    from probing.core.errors import ProbingError
    from probing.models.lavis import second_stage_problem

    stage1 = {key: torch.zeros(1) for key in lavis_keys()["blip2_pretrain"] if key.startswith(("Qformer.", "query"))}
    # blip2_t5 (pretrain_flant5xl): its Q-Former loses the text embeddings and text FFNs, gains a T5 head
    stage2 = {k: v for k, v in stage1.items() if "embeddings.word" not in k and "embeddings.position_emb" not in k}
    stage2 |= {"t5_proj.weight": torch.zeros(1), "t5_model.shared.weight": torch.zeros(1)}
    torch.save({"model": stage2}, tmp_path / "blip2_pretrained_flant5xl.pth")
    message = (
        f"--model {tmp_path / 'blip2_pretrained_flant5xl.pth'}: a LAVIS BLIP-2 second-stage checkpoint (FlanT5 "
        "language-model head, a Q-Former without text embeddings): use a first-stage one (blip2_pretrained.pth) or "
        "an InstructBLIP one"
    )
    for family in (None, "instructblip"):  # also when told it is InstructBLIP (whose marker t5_proj is)
        with pytest.raises(ProbingError) as caught:
            load_resampler(str(tmp_path / "blip2_pretrained_flant5xl.pth"), family=family)
        assert str(caught.value) == message
    code, _, err = run_cli(
        capsys,
        "extract",
        "--task",
        "vsr",
        "--split",
        "val",
        "--out",
        tmp_path / "s",
        "--model",
        tmp_path / "blip2_pretrained_flant5xl.pth",
        *[f"--{name}={value}" for name, value in demo_options["vsr"].items()],
    )
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {message}"
    # InstructBLIP FlanT5 keeps its Q-Former text embeddings (t5_proj marks it): not refused
    instruct_t5 = stage1 | {"t5_proj.weight": torch.zeros(1)}
    assert second_stage_problem(instruct_t5, "x") is None
    opt = stage2 | {"opt_proj.weight": torch.zeros(1)}
    assert "(FlanT5 and OPT language-model head" in second_stage_problem(opt, "x")


def test_unfrozen_runs_read_and_record_their_text_choices(tiny_checkpoints, demo_options, tmp_path):
    from probing.core.errors import ProbingError
    from probing.data.types import DataOptions
    from probing.models import ModelSource
    from probing.probes.run import TrainRequest
    from probing.probes.train import TrainSettings, Trial
    from probing.probes.trainers import UnfrozenTrainer

    source = ModelSource(model=str(tiny_checkpoints["instructblip"]))
    data = DataOptions(task="vsr", **demo_options["vsr"])
    settings = TrainSettings(task="vsr", batch_size=8, device="cpu")
    text = QFormerText(text_preprocessing="lavis", instruction="Q: {text}")
    trainer = UnfrozenTrainer("vsr", source, data, 2, settings, text=text)
    assert trainer.inputs["text"] == {"text_preprocessing": "lavis", "instruction": "Q: {text}"}
    trial_copy = trainer.setup.base.truncated(2)  # what a trial trains reads the texts the same way
    caption = trainer.setup.examples["train"][0].text
    as_given = load_resampler(str(tiny_checkpoints["instructblip"]))
    expected = as_given.tokenize([f"Q: {lavis_caption(caption)}"])["input_ids"].tolist()
    assert trial_copy.tokenize([caption])["input_ids"].tolist() == expected
    assert as_given.tokenize([caption])["input_ids"].tolist() != expected
    assert "text" not in UnfrozenTrainer("vsr", source, data, 2, settings).inputs  # runs made before: unchanged
    # a frozen probe reads its stores' texts: the options are refused there
    frozen = TrainRequest(
        task="vsr", layer=2, out=tmp_path, trials=(Trial(lr=0.01, epochs=1),), settings=settings,
        features=tmp_path, text_preprocessing="lavis",
    )  # fmt: skip
    with pytest.raises(ProbingError, match=r"^--text-preprocessing: unfrozen only \(a frozen probe reads the texts"):
        frozen.check()


def test_an_extraction_records_its_text_choice_and_a_store_made_otherwise_is_refused(
    capsys, tiny_checkpoints, demo_options, tmp_path
):
    import json

    data = [f"--{name}={value}" for name, value in demo_options["vsr"].items()]
    common = ["extract", "--task", "vsr", "--split", "val", "--model", tiny_checkpoints["blip2"], "--device", "cpu"]
    common += [*data, "--layers", "4", "--workers", "0", "--out", tmp_path / "store"]
    code, _, err = run_cli(capsys, *common, "--text-preprocessing", "lavis")
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["request"]["text_preprocessing"] == "lavis" and manifest["truncated_texts"] == 0
    assert "key_words_cut" not in manifest  # VSR's labels hang on no particular words
    code, _, err = run_cli(capsys, *common)  # the texts as given: another store
    assert code == 2 and "text_preprocessing" in err.strip().splitlines()[-1]
