"""Beyond accuracy: control tasks and selectivity, MDL by the online code, the rigour table.

Synthetic features where the truth is known: a planted linear target is selective and compresses; targets
that a memorisable type decides are matched by the control (selectivity ~ 0). The online code equals a
hand computation, its portions are the published ones, and training the prefixes in one batched pass gives
what training each prefix alone gives.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_results_hold_every_number, assert_rows_hold_their_numbers, extract_splits, report_tables
from scipy.special import expit
from scipy.stats import laplace

from probing.core.errors import ProbingError
from probing.data.types import Example
from probing.probes.modules import new_probe
from probing.probes.train import ProbeData, TrainSettings, Trial, train_frozen
from probing.report.analysis import estimate, load_run, paired_difference, seeds_and_examples, single_class
from probing.report.tables import SINGLE_CLASS_MARK, SINGLE_CLASS_NOTE
from probing.studies.mdl import PORTIONS, block_ends, codelength, online_code, reordered, transmission_order
from probing.tasks import get_task
from probing.tasks.controls import MetadataType, shuffled_rows, stable_uniform, type_lookup
from probing.tasks.heads import BinaryHead, BoxHead
from probing.tasks.metrics import BOX_CODE_BINS, discretised_laplace_bits

# ---------------------------------------------------------------------------------------------- data


def examples_of(types: list[int], targets: torch.Tensor, task: str) -> list[Example]:
    """Examples whose metadata carry a type the way the task reads it (VSR: subject and object; REFER tasks:
    the COCO category id)."""
    made = []
    for index, (kind, target) in enumerate(zip(types, targets.tolist(), strict=True)):
        metadata = {"subject": f"s{kind % 7}", "object": f"o{kind}"} if task == "vsr" else {"category_id": kind}
        made.append(
            Example(
                example_id=index,
                image_id=index,
                image_path="unused.jpg",
                text="",
                category="all",
                label=int(target) if task == "vsr" else None,
                box=None if task == "vsr" else tuple(target),
                metadata=metadata,
            )
        )
    return made


def planted(task: str, rows: int, seed: int, dims: int = 32, types: int = 40) -> ProbeData:
    """The target is a linear function of the features; every example has a random type the features do not
    carry."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dims, 4, generator=torch.Generator().manual_seed(1234))
    features = torch.randn(rows, dims, generator=generator)
    if task == "vsr":
        targets = (features @ direction[:, 0] > 0).float()
    else:
        unit = (features @ direction / dims**0.5).sigmoid()
        centre, size = 0.25 + 0.5 * unit[:, :2], 0.2 + 0.3 * unit[:, 2:]
        targets = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    kinds = torch.randint(0, types, (rows,), generator=generator).tolist()
    return ProbeData(task, "synthetic", features, targets, list(range(rows)), examples_of(kinds, targets, task))


def typed_noise(rows: int, seed: int, dims: int = 16, types: int = 16) -> ProbeData:
    """Features that carry nothing but the example's type (a vector per type plus noise); the target is a
    random label per type (drawn with another seed than the control's)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(types, dims, generator=torch.Generator().manual_seed(99)) * 3
    kinds = torch.randint(0, types, (rows,), generator=generator)
    features = centres[kinds] + 0.3 * torch.randn(rows, dims, generator=generator)
    labels = torch.tensor([float(stable_uniform(12345, ("s", int(k))) < 0.5) for k in kinds])
    return ProbeData(
        "vsr", "synthetic", features, labels, list(range(rows)), examples_of(kinds.tolist(), labels, "vsr")
    )


def controlled(data: ProbeData, train: ProbeData, seed: int = 0) -> ProbeData:
    """The same split with its control targets (drawn from the train split)."""
    spec = get_task(data.task)
    targets = spec.control_targets(train.examples, data.examples, seed, "synthetic")
    return ProbeData(data.task, data.split, data.features, targets, data.ids, data.examples)


def test_correct(train: ProbeData, val: ProbeData, test: ProbeData, trial: Trial, settings: TrainSettings, seeds=1):
    """Per-example correctness on test of the probe trained on train (best epoch by val); with several `seeds`,
    the mean over the probes of trials with seeds 0, 1, ... (as a run's final seeds are averaged)."""
    trials = [replace(trial, seed=seed) for seed in range(seeds)]
    correct = []
    for result in train_frozen(train, val, trials, settings):
        with torch.no_grad():
            outputs = result.probe(test.features)
        correct.append(settings.head.correct(outputs, test.targets).numpy())
    return np.mean(correct, axis=0)


test_correct.__test__ = False  # a helper, not a test


# ---------------------------------------------------------------------------------------------- controls


def test_stable_uniform_is_a_hash_of_the_seed_and_the_type():
    digest = hashlib.sha256(json.dumps([3, ["dog", 4]]).encode()).digest()
    assert stable_uniform(3, ("dog", 4)) == int.from_bytes(digest[:8], "big") / 2.0**64
    draws = [stable_uniform(0, kind) for kind in range(4000)]
    assert 0 <= min(draws) and max(draws) < 1 and abs(np.mean(draws) - 0.5) < 0.02  # uniform-looking


@pytest.mark.parametrize("task", ["vsr", "refcocog"])
def test_control_targets_are_a_fixed_function_of_the_type(task):
    spec = get_task(task)
    train, test = planted(task, 600, seed=0, types=30), planted(task, 300, seed=1, types=34)  # 4 unseen types
    targets = spec.control_targets(train.examples, test.examples, 0, "test")
    by_type = {}
    for example, target in zip(test.examples, targets.tolist(), strict=True):
        assert by_type.setdefault(spec.control_type(example), target) == target  # one target per type
    # the same in any split, any subset, any order of the train examples
    reversed_train = train.examples[::-1]
    again = spec.control_targets(reversed_train, test.examples[::-1], 0, "test")
    assert torch.equal(again.flip(0), targets)
    alone = spec.control_targets(train.examples, test.examples[:5], 0, "test")
    assert torch.equal(alone, targets[:5])
    on_train = spec.control_targets(train.examples, train.examples, 0, "train")
    for example, target in zip(train.examples, on_train.tolist(), strict=True):
        if spec.control_type(example) in by_type:
            assert by_type[spec.control_type(example)] == target
    other = spec.control_targets(train.examples, test.examples, 1, "test")
    assert not torch.equal(other, targets)  # another seed, another control
    train_targets = {}
    for example, target in zip(train.examples, train.targets.tolist(), strict=True):
        train_targets.setdefault(spec.control_type(example), set()).add(tuple(np.atleast_1d(target)))
    if task == "refcocog":  # a box of the type's own train boxes; an unseen type, any train box
        every = set().union(*train_targets.values())
        for kind, box in by_type.items():
            assert tuple(box) in train_targets.get(kind, every)
    else:  # labels drawn at the train rate of 1s, the same as the uniform draw says
        rate = float(train.targets.mean())
        assert all(value == float(stable_uniform(0, kind) < rate) for kind, value in by_type.items())


def test_binary_control_labels_follow_the_train_label_rate():
    kinds = list(range(5000))
    rate = torch.tensor([1.0] * 3 + [0.0] * 7)  # 30 % ones
    labels = BinaryHead().control_targets(rate, list(range(10)), kinds, 0)
    assert abs(float(labels.mean()) - 0.3) < 0.02


def test_the_builtin_control_types():
    assert get_task("refcocog").control_type == MetadataType(("category_id",), "COCO category")
    assert get_task("vsr").control_type.fields == ("subject", "object")
    assert get_task("vsr-zeroshot").control_type.fields == ("subject", "object")
    assert get_task("rcm").control_type.fields == ("category_id", "cell")
    example = Example(1, 1, "x.jpg", "", "all", label=1, metadata={"category_id": 18, "cell": 4, "box": [1, 2]})
    assert get_task("rcm").control_type(example) == (18, 4)
    assert MetadataType(("box",), "box")(example) == (1, 2)  # lists become hashable


def test_planted_linear_targets_are_selective():
    """The target is linear in the features and the type is not in them: the probe learns the task, not the
    control (which it could only memorise from the type), so selectivity is high."""
    train, val, test = (
        planted("vsr", 1000, 0, dims=16),
        planted("vsr", 300, 1, dims=16),
        planted("vsr", 600, 2, dims=16),
    )
    settings = TrainSettings(task="vsr", batch_size=128, device="cpu")
    trial = Trial(lr=0.1, epochs=8)
    task = test_correct(train, val, test, trial, settings)
    control = test_correct(controlled(train, train), controlled(val, train), controlled(test, train), trial, settings)
    assert task.mean() > 0.9 and control.mean() < 0.65
    difference = paired_difference(task[None], control[None])
    assert difference.mean == pytest.approx(task.mean() - control.mean())
    assert difference.low > 0.25 and difference.low < difference.mean < difference.high


def test_targets_a_type_decides_are_matched_by_the_control():
    """Features carry only the type and the target is a random function of the type: the control (another
    random function of the type) is as learnable, so selectivity is about 0 (its interval holds 0)."""
    train, val, test = typed_noise(800, 0), typed_noise(200, 1), typed_noise(400, 2)
    settings = TrainSettings(task="vsr", batch_size=64, device="cpu")
    trial = Trial(lr=0.1, epochs=10)
    task = test_correct(train, val, test, trial, settings)
    control = test_correct(controlled(train, train), controlled(val, train), controlled(test, train), trial, settings)
    assert task.mean() > 0.95 and control.mean() > 0.95
    difference = paired_difference(task[None], control[None])
    assert abs(difference.mean) < 0.03 and difference.low <= 0 <= difference.high


def test_the_paired_interval_is_narrower_than_unpaired_ones():
    """What both runs get right or wrong together does not widen a paired interval."""
    generator = np.random.default_rng(0)
    hard = generator.random(2000) < 0.5
    first = (hard | (generator.random(2000) < 0.2)).astype(float)[None]
    second = (hard & (generator.random(2000) < 0.9)).astype(float)[None]
    paired = paired_difference(first, second)
    rows = np.stack([first[0], second[0]])
    unpaired_width = 2 * 1.96 * np.sqrt(rows.mean(1) @ (1 - rows.mean(1)) / 2000)  # two independent samples
    assert paired.high - paired.low < 0.7 * unpaired_width


# ---------------------------------------------------------------------------------------------- MDL


def test_the_portions_are_voita_and_titovs():
    assert PORTIONS == (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25, 50, 100)
    assert block_ends(1000) == [1, 2, 4, 8, 16, 32, 62, 125, 250, 500, 1000]
    assert block_ends(80512) == [80, 161, 322, 644, 1288, 2576, 5032, 10064, 20128, 40256, 80512]  # RefCOCOg train
    assert block_ends(10) == [1, 2, 5, 10]  # on a tiny split the first ends coincide and merge


def test_codelength_formula():
    online, uniform = codelength(2.0, [1, 3, 6], [1.5, 4.0])
    assert online == 2.0 + 1.5 + 4.0 and uniform == 12.0
    with pytest.raises(ValueError):
        codelength(1.0, [1, 3, 6], [1.0])


@pytest.mark.parametrize("task", ["vsr", "refcocog"])
def test_the_codelength_of_a_tiny_case_equals_a_hand_computation(task):
    """With a learning rate too small to move them, every prefix's probe is the initial probe: the online code is
    the first example under the uniform code plus every other example under that probe's likelihood, which
    numpy and scipy compute here from the probe's weights."""
    train, val = planted(task, 100, 0, dims=8), planted(task, 40, 1, dims=8)
    settings = TrainSettings(task=task, batch_size=16, device="cpu")
    code = online_code(train, val, Trial(lr=1e-12, epochs=1, seed=5), settings, shuffle_seed=3)
    ends = [1, 3, 6, 12, 25, 50, 100]  # 0.1 ... 1.6 % of 100 examples all round to 1 (at least 1)
    assert code.ends == ends
    probe = new_probe("linear", 8, 4 if task == "refcocog" else 1, 768, 5).layers[0]
    weight, bias = probe.weight.detach().double().numpy(), probe.bias.detach().double().numpy()
    order = transmission_order(100, 3).numpy()
    outputs = train.features.double().numpy()[order] @ weight.T + bias
    targets = train.targets.double().numpy()[order]
    if task == "vsr":
        logits = outputs[:, 0]
        bits = -np.log2(np.where(targets == 1, expit(logits), 1 - expit(logits)))
        first = 1.0
    else:

        def cxcywh(boxes):
            return np.stack(
                [
                    (boxes[:, 0] + boxes[:, 2]) / 2,
                    (boxes[:, 1] + boxes[:, 3]) / 2,
                    boxes[:, 2] - boxes[:, 0],
                    boxes[:, 3] - boxes[:, 1],
                ],
                1,
            )

        locations = expit(outputs)
        values = cxcywh(targets)
        val_locations = expit(val.features.double().numpy() @ weight.T + bias)
        scales = np.maximum(np.abs(cxcywh(val.targets.double().numpy()) - val_locations).mean(0), 0.5 / BOX_CODE_BINS)
        index = np.clip(np.floor(values * BOX_CODE_BINS), 0, BOX_CODE_BINS - 1)
        high = np.where(index == BOX_CODE_BINS - 1, np.inf, (index + 1) / BOX_CODE_BINS)
        low = np.where(index == 0, -np.inf, index / BOX_CODE_BINS)
        probability = laplace.cdf(high, locations, scales) - laplace.cdf(low, locations, scales)
        bits = -np.log2(probability).sum(1)
        first = 4 * math.log2(BOX_CODE_BINS)
    expected = first + bits[1:].sum()
    assert code.online_bits == pytest.approx(expected, rel=1e-7)
    assert code.uniform_bits == pytest.approx(100 * first)
    for index, block in enumerate(code.example_bits):  # block by block
        assert block.numpy() == pytest.approx(bits[ends[index] : ends[index + 1]], rel=1e-6)


def test_discretised_laplace_against_scipy_and_summing_to_one():
    generator = torch.Generator().manual_seed(0)
    locations = torch.rand(50, generator=generator, dtype=torch.float64)
    scales = 0.005 + 0.3 * torch.rand(50, generator=generator, dtype=torch.float64)
    centres = (torch.arange(BOX_CODE_BINS, dtype=torch.float64) + 0.5) / BOX_CODE_BINS
    bits = discretised_laplace_bits(centres[None, :], locations[:, None], scales[:, None])  # [50, bins]
    assert torch.allclose((2.0**-bits).sum(1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    edges = np.arange(BOX_CODE_BINS + 1) / BOX_CODE_BINS
    edges[0], edges[-1] = -np.inf, np.inf
    where = {"loc": locations.numpy()[:, None], "scale": scales.numpy()[:, None]}
    low, high = edges[None, :-1], edges[None, 1:]
    # scipy's CDF below the location and its survival function above it: each exact in its own tail
    reference = np.where(
        low >= where["loc"],
        laplace.sf(low, **where) - laplace.sf(high, **where),
        laplace.cdf(high, **where) - laplace.cdf(low, **where),
    )
    usable = reference > 1e-200
    assert usable.mean() > 0.8
    assert np.allclose(2.0 ** -bits.numpy()[usable], reference[usable], rtol=1e-9, atol=0)
    far = discretised_laplace_bits(torch.tensor([0.995]), torch.tensor([0.001]), torch.tensor([0.001]))
    assert torch.isfinite(far).all() and far.item() > 1000  # scipy's difference is exactly 0 there


@pytest.mark.parametrize("task,probe", [("vsr", "linear"), ("refcocog", "linear"), ("rcm", "swiglu2")])
def test_prefixes_trained_together_equal_prefixes_trained_alone(task, probe):
    """One batched pass over every prefix == `train_frozen` on each prefix's own copy of its rows."""
    kind = "vsr" if task == "rcm" else task
    train, val = planted(kind, 700, 0), planted(kind, 150, 1)
    train, val = (ProbeData(task, d.split, d.features, d.targets, d.ids, d.examples) for d in (train, val))
    settings = TrainSettings(task=task, probe=probe, hidden=8, batch_size=32, patience=2, device="cpu")
    trial = Trial(lr=5e-3, epochs=4, seed=2, giou_scale=2.0, l1_scale=5.0)
    together = online_code(train, val, trial, settings, shuffle_seed=1)
    alone = online_code(train, val, trial, settings, shuffle_seed=1, batched=False)
    assert together.ends == alone.ends == [1, 2, 5, 11, 22, 43, 87, 175, 350, 700]
    for mine, theirs in zip(together.fits, alone.fits, strict=True):
        assert (mine.best_epoch, mine.epochs_run, mine.stopped_early) == (
            theirs.best_epoch,
            theirs.epochs_run,
            theirs.stopped_early,
        )
        assert [h["epoch"] for h in mine.history] == [h["epoch"] for h in theirs.history]
        for name, value in mine.val_metrics.items():
            assert value == pytest.approx(theirs.val_metrics[name], abs=1e-5), name
        for (name, a), (_, b) in zip(mine.probe.state_dict().items(), theirs.probe.state_dict().items(), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), name
    assert together.online_bits == pytest.approx(alone.online_bits, rel=1e-5)
    assert together.compression > 1  # the planted target is learnt from the features


def test_planted_targets_compress_and_their_control_does_not():
    train, val = planted("vsr", 2000, 0, dims=16), planted("vsr", 300, 1, dims=16)
    settings = TrainSettings(task="vsr", batch_size=128, device="cpu")
    trial = Trial(lr=0.3, epochs=10)
    task = online_code(train, val, trial, settings)
    control = online_code(controlled(train, train), controlled(val, train), trial, settings)
    assert task.uniform_bits == 2000 and task.compression > 4  # >> 1: the representation makes it learnable
    assert 0.85 < control.compression < 1.1  # random labels per type, not in the features: about a bit each


def test_reordered_reads_the_same_rows():
    data = planted("vsr", 10, 0, dims=4)
    order = transmission_order(10, 0)
    ordered = reordered(data, order)
    assert torch.equal(ordered.example_features(), data.features[order]) and ordered.ids == order.tolist()
    per_image = ProbeData(
        "vsr", "x", data.features[:5], data.targets, data.ids, data.examples, rows=torch.arange(10) % 5
    )
    assert torch.equal(reordered(per_image, order).example_features(), data.features[:5][order % 5])


def test_box_head_code_bits_are_coordinate_sums():
    head = BoxHead()
    outputs = torch.zeros(3, 4)  # every coordinate at 0.5
    targets = torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 3)  # cxcywh (0.5, 0.5, 0.5, 0.5)
    bits = head.code_bits(outputs, targets, outputs, targets)  # a perfect reference: the scale floor, half a bin
    per_coordinate = discretised_laplace_bits(torch.tensor(0.5), torch.tensor(0.5), torch.tensor(0.5 / BOX_CODE_BINS))
    assert torch.allclose(bits, 4 * per_coordinate.expand(3)) and head.uniform_bits == 4 * math.log2(BOX_CODE_BINS)


# ---------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def vsr_stores(tiny_checkpoints, demo_options, tmp_path_factory):
    """Layer 4 of the tiny BLIP-2 on the demo's VSR, as trained and with re-drawn (random) weights."""
    from probing.data import DataOptions

    root = tmp_path_factory.mktemp("rigour")
    options = DataOptions(task="vsr", **demo_options["vsr"])
    for name, init in (("trained", "pretrained"), ("random", "random")):
        extract_splits(tiny_checkpoints["blip2"], options, root / name, init=init)
    return root


def test_control_search_mdl_and_the_rigour_table(capsys, vsr_stores, demo_options, tmp_path):
    from conftest import run_cli

    from probing.core.records import MdlRecord
    from probing.data import DataOptions
    from probing.tasks import load_split

    search = ["search", "--task", "vsr", "--layer", 4, "--device", "cpu", "--trials", 2, "--trials-per-batch", 2]
    search += ["--lr-range", "0.001,0.03", "--epoch-choices", "5", "--final-seeds", "0,1"]
    runs = tmp_path / "runs"
    for name, features, extra in (
        ("task", "trained", []),
        ("control", "trained", ["--control"]),
        ("random", "random", []),
    ):
        code, out, err = run_cli(capsys, *search, "--features", vsr_stores / features, *extra, "--out", runs / name)
        assert code == 0, err
        assert ("control task" in out) == (name == "control")
    task_manifest = json.loads((runs / "task" / "manifest.json").read_text())
    control_manifest = json.loads((runs / "control" / "manifest.json").read_text())
    assert "control" not in task_manifest and "control_seed" not in task_manifest  # identities made before stay
    assert control_manifest["control"] is True and "control_seed" not in control_manifest  # seed 0: omitted
    assert json.loads((runs / "control" / "best" / "manifest.json").read_text())["control"] is True
    # the control's test labels: a label per (subject, object), drawn at the train labels' rate
    train = load_split(DataOptions(task="vsr", **demo_options["vsr"]), "train").examples
    rate = np.mean([example.label for example in train])
    records = [json.loads(line) for line in (runs / "control" / "best" / "predictions" / "test.jsonl").open()]
    assert len(records) == 2 * len({record["id"] for record in records})  # two final seeds
    for record in records:
        assert record["label"] == int(stable_uniform(0, (record["subject"], record["object"])) < rate)
    # the floors: the same probes and hyper-parameters on shuffled feature rows
    for name, extra in (("task", []), ("control", ["--control"])):
        best = json.loads((runs / name / "summary.json").read_text())["best"]["params"]
        floor = ["train", "--task", "vsr", "--layer", 4, "--device", "cpu", "--features", vsr_stores / "trained"]
        floor += ["--lr", best["lr"], "--epochs", best["epochs"], "--seeds", "0,1", "--shuffled-features", *extra]
        code, out, err = run_cli(capsys, *floor, "--out", runs / f"{name}-floor")
        assert code == 0, err
        # a probe that answers one class is marked wherever its accuracy is printed
        assert out.strip().endswith(SINGLE_CLASS_NOTE) == single_class(load_run(runs / f"{name}-floor"))
        manifest = json.loads((runs / f"{name}-floor" / "manifest.json").read_text())
        assert manifest["shuffled_features"] is True and manifest.get("control", False) == (name == "control")
    assert single_class(load_run(runs / "task"))  # this tiny probe collapsed: `analyze` says so
    code, out, err = run_cli(capsys, "analyze", runs / "task")
    assert code == 0 and f"]{SINGLE_CLASS_MARK} (2 seed(s)" in out and out.strip().endswith(SINGLE_CLASS_NOTE), out
    assert json.loads(run_cli(capsys, "analyze", runs / "task", "--json")[1])["single_class"] is True
    # a control request never reuses (or overwrites) the task's folder
    code, _, err = run_cli(capsys, *search, "--features", vsr_stores / "trained", "--control", "--out", runs / "task")
    assert code == 2 and err.startswith("error: ") and "control" in err and len(err.strip().splitlines()) == 1
    # the online codes, with the searches' best trials
    mdl = ["mdl", "--task", "vsr", "--layer", 4, "--device", "cpu", "--features", vsr_stores / "trained"]
    code, out, err = run_cli(capsys, *mdl, "--from-search", runs / "task", "--out", runs / "task-mdl")
    assert code == 0, err
    assert "compression" in out and "kbits" in out
    code, out, err = run_cli(
        capsys, *mdl, "--control", "--from-search", runs / "control", "--out", runs / "control-mdl"
    )
    assert code == 0, err
    code, out, err = run_cli(
        capsys, *mdl, "--shuffled-features", "--from-search", runs / "task", "--out", runs / "task-floor-mdl"
    )
    assert code == 0, err
    record = MdlRecord.read(runs / "task-mdl")
    assert record.control is False and MdlRecord.read(runs / "control-mdl").control is True
    assert record.online_bits == pytest.approx(
        record.ends[0] * record.uniform_bits_per_example + sum(sum(block) for block in record.example_bits)
    )
    assert record.uniform_bits == record.examples and record.ends[-1] == record.examples  # 1 bit per label
    best = json.loads((runs / "task" / "summary.json").read_text())["best"]["params"]
    assert json.loads((runs / "task-mdl" / "manifest.json").read_text())["trial"]["lr"] == best["lr"]
    code, out, _ = run_cli(capsys, *mdl, "--from-search", runs / "task", "--out", runs / "task-mdl")
    assert code == 0 and "already there" in out
    # the report: one rigour row, every cell filled
    code, out, err = run_cli(capsys, "report", runs, "--out", tmp_path / "report")
    assert code == 0, err
    table = (tmp_path / "report" / "tables" / "rigor.md").read_text().splitlines()
    assert table[2].startswith(
        "| model | task | mode | layer | probe | accuracy (%) | floor (%) | control (%) | control floor (%) | "
        "ceiling (%) | selectivity (points) | MDL (kbits) | uniform (kbits) | compression | noise floor compression"
    )
    rows = [line for line in table if line.startswith("| BLIP-2")]
    # every cell filled but the control's noise-floor code (not made here); the control searched on its own: §
    assert len(rows) == 1 and rows[0].count("–") == 1 and "§ (1 seed)" in rows[0], rows
    assert any(line.startswith("_§ the control had a hyper-parameter search of its own") for line in table)
    import pandas as pd

    numbers = pd.read_csv(tmp_path / "report" / "tables" / "rigor.csv").iloc[0]
    floors = {name: load_run(runs / f"{name}-floor").correct.mean() for name in ("task", "control")}
    assert numbers["floor_mean"] == pytest.approx(floors["task"])
    assert numbers["control_floor_mean"] == pytest.approx(floors["control"])
    assert numbers["selectivity_mean"] == pytest.approx(
        numbers["accuracy_mean"] - floors["task"] - (numbers["control_mean"] - floors["control"])
    )
    # the ceiling: each test example's control label looked up among the train labels of its type
    by_type = {}
    for example, label in zip(train, get_task("vsr").control_targets(train, train, 0, "x").tolist(), strict=True):
        by_type.setdefault((example.metadata["subject"], example.metadata["object"]), []).append(label)
    majority = int(
        2 * sum(int(stable_uniform(0, (e.metadata["subject"], e.metadata["object"])) < rate) for e in train)
        > len(train)
    )
    looked_up = []
    for line in records[: len(records) // 2]:
        labels = by_type.get((line["subject"], line["object"]), [])
        answer = majority if 2 * sum(labels) == len(labels) else int(2 * sum(labels) > len(labels))
        looked_up.append(answer == line["label"])
    assert numbers["ceiling_mean"] == pytest.approx(np.mean(looked_up))
    assert numbers["noise_floor_compression"] == pytest.approx(MdlRecord.read(runs / "task-floor-mdl").compression)
    assert numbers["selectivity_ci_low"] <= numbers["selectivity_mean"] <= numbers["selectivity_ci_high"]
    assert numbers["codelength_kbits"] == pytest.approx(record.online_bits / 1000)
    assert numbers["codelength_ci_low"] <= numbers["codelength_kbits"] <= numbers["codelength_ci_high"]
    assert numbers["compression"] == pytest.approx(record.compression)
    assert numbers["random_model"] == "BLIP-2 (random)" and 0 <= numbers["random_mean"] <= 1
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text()
    assert table1.count("| BLIP-2 | frozen |") == 1  # the control run is no row of other tables
    assert assert_results_hold_every_number(tmp_path / "report") > 50  # selectivity and the codes' numbers too
    assert assert_rows_hold_their_numbers(report_tables([runs]), tmp_path / "report") > 50
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    codes = results[results["metric"] == "mdl_codelength_kbits"].set_index("control")
    assert codes.loc[False, "value"] == pytest.approx(record.online_bits / 1000)
    assert codes.loc[False, "split"] == "train" and codes.loc[True, "value"] > 0


def test_rigour_mistakes_are_one_line(capsys, vsr_stores, tmp_path):
    from conftest import run_cli

    mdl = ["mdl", "--task", "vsr", "--layer", 4, "--features", vsr_stores / "trained", "--out", tmp_path / "m"]
    for extra, message in (
        (["--probe", "logreg", "--lr", "0.01", "--epochs", "2"], "mdl: --probe logreg is not a batched probe"),
        (["--lr", "0.01", "--epochs", "2", "--from-search", tmp_path], "--from-search: give it or --lr and --epochs"),
        (["--epochs", "2"], "--lr is required for --probe linear"),
    ):
        code, _, err = run_cli(capsys, *mdl, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()
    task = tmp_path / "plain.yaml"
    task.write_text(
        "name: plain\nkind: binary\nsplits: {train: t.jsonl, val: v.jsonl}\nfields: {image: i, text: t, label: l}\n"
    )
    code, _, err = run_cli(
        capsys,
        "search",
        "--task",
        task,
        "--layer",
        4,
        "--features",
        tmp_path,
        "--control",
        "--out",
        tmp_path.parent / f"{tmp_path.name}-s",
    )
    assert code == 2 and "--control: task 'plain' has no control type" in err


def test_a_yaml_tasks_control_type_names_record_fields(tmp_path):
    from probing.data import DataOptions
    from probing.tasks import load_split

    lines = [
        {"image": "a.jpg", "caption": f"c{i}", "label": i % 2, "relation": ["left of", "above"][i % 2], "obj": i % 3}
        for i in range(12)
    ]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "task.yaml").write_text(
        "name: typed\nkind: binary\nsplits: {train: train.jsonl, val: val.jsonl}\n"
        "fields: {image: image, text: caption, label: label, category: relation}\ncontrol_type: [relation, obj]\n"
    )
    spec = get_task(str(tmp_path / "task.yaml"))
    assert spec.control_type.fields == ("relation", "obj") and spec.describe()["control_type"] == "relation, obj"
    train = load_split(DataOptions(task=str(tmp_path / "task.yaml")), "train").examples
    assert spec.control_type(train[4]) == ("left of", 1)  # a role's field (the category) is kept too
    targets = spec.control_targets(train, train, 0, "x")
    assert torch.equal(targets[:6], targets[6:])  # lines i and i + 6 share their type
    (tmp_path / "val.jsonl").write_text(json.dumps({k: v for k, v in lines[0].items() if k != "obj"}) + "\n")
    with pytest.raises(ProbingError, match=r"val.jsonl: line 1: missing field 'obj' \(control_type\)"):
        load_split(DataOptions(task=str(tmp_path / "task.yaml")), "val")
    (tmp_path / "bad.yaml").write_text((tmp_path / "task.yaml").read_text().replace("[relation, obj]", "[]"))
    with pytest.raises(ProbingError, match="line 5: field 'control_type': expected a field name or a list"):
        get_task(str(tmp_path / "bad.yaml"))


def test_rigour_config_fields_are_checked(tmp_path):
    from probing.runs.config import load_config

    base = {
        "name": "x",
        "workspace": str(tmp_path),
        "models": {"m": {"tiny": "blip2"}},
        "data": {"demo": {}},
        "experiments": [{"name": "e", "tasks": ["vsr"], "models": ["m"]}],
    }
    for change, message in (
        ({"mdl": True, "probes": ["logreg"]}, "'experiments[0].mdl': probe 'logreg' is not a batched probe"),
        ({"mdl": True, "modes": ["unfrozen"]}, "'experiments[0].mdl': the online code trains probes on stored"),
        ({"controls": "yes"}, "'experiments[0].controls': expected true or false"),
        ({"control_seeds": [0, -1]}, "'experiments[0].control_seeds': must be >= 0, got -1"),
        ({"control_seeds": [1, 1]}, "'experiments[0].control_seeds': expected distinct seeds, got [1, 1]"),
        ({"control_search": True}, "'experiments[0].control_search': needs 'controls: true'"),
    ):
        config = json.loads(json.dumps(base))
        config["experiments"][0] |= change
        (tmp_path / "c.yaml").write_text(json.dumps(config))
        with pytest.raises(ProbingError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(tmp_path / "c.yaml")


def test_the_rigour_config_reuses_the_paper_searches():
    from pathlib import Path

    from probing.runs.config import load_config

    root = Path(__file__).resolve().parent.parent / "experiments"
    rigor, table1 = load_config(root / "rigor.yaml", check_paths=False), load_config(root / "table1.yaml", False)
    main = rigor.experiments[0]
    assert main.controls and main.mdl and main.modes == ["frozen"] and main.layers == "last"
    assert main.name == table1.experiments[0].name and main.search == table1.experiments[0].search
    assert rigor.workspace == table1.workspace and "BLIP-2 (random)" in main.models
    assert rigor.models["BLIP-2 (random)"].init == "random"


def test_unfrozen_training_reads_the_control_targets(tiny_checkpoints, demo_options):
    from probing.data import DataOptions
    from probing.probes.unfrozen import UnfrozenSetup

    data = DataOptions(task="vsr", **demo_options["vsr"])
    settings = TrainSettings(task="vsr", device="cpu")
    plain = UnfrozenSetup("vsr", str(tiny_checkpoints["blip2"]), data, settings)
    control = UnfrozenSetup("vsr", str(tiny_checkpoints["blip2"]), data, settings, control_seed=4)
    spec = get_task("vsr")
    for split in ("train", "val", "test"):
        assert torch.equal(plain.targets[split], spec.head.targets(plain.examples[split], split))
        expected = spec.control_targets(plain.examples["train"], plain.examples[split], 4, split)
        assert torch.equal(control.targets[split], expected)


def test_the_online_code_reads_per_image_rows():
    """A store of a family that reads no text keeps one row per image: the code is that of the same features
    written out per example."""
    images = planted("vsr", 150, 0, dims=8)
    rows = torch.arange(300) % 150
    examples = examples_of([0] * 300, images.targets[rows], "vsr")
    per_image = ProbeData("vsr", "train", images.features, images.targets[rows], list(range(300)), examples, rows)
    per_example = ProbeData("vsr", "train", images.features[rows], images.targets[rows], list(range(300)), examples)
    val = planted("vsr", 60, 1, dims=8)
    val_per_image = ProbeData("vsr", "val", val.features, val.targets, val.ids, val.examples, torch.arange(60))
    settings = TrainSettings(task="vsr", batch_size=32, device="cpu")
    trial = Trial(lr=0.05, epochs=3)
    first = online_code(per_image, val_per_image, trial, settings)
    second = online_code(per_example, val, trial, settings)
    assert first.online_bits == pytest.approx(second.online_bits, rel=1e-6)


# ---------------------------------------------------------------------------------------------- floors


def noise_split(task: str, rows: int, seed: int, dims: int = 32) -> ProbeData:
    """Pure noise features (they tell nothing) with targets and types shaped like the task's data.

    Types: 80 categories, the largest holding 35 % of the examples (as `person` holds about a third of
    RefCOCOg's), the other 65 % Zipf over the rest; VSR a (subject, object) pair of 12 x 12 nouns; RCM a
    (category, claimed cell). Boxes: each category's typical centre and size (drawn once) plus jitter, so that
    the control's per-category boxes are as varied as real ones. Labels: random at a rate of one half."""
    generator = np.random.default_rng(seed)
    shares = np.r_[0.35, 0.65 * (1 / np.arange(1, 80)) / (1 / np.arange(1, 80)).sum()]
    categories = generator.choice(80, size=rows, p=shares)
    typical = np.random.default_rng(1234).uniform(0.2, 0.8, size=(80, 4))  # centre x, y and size w, h
    centre = np.clip(typical[categories, :2] + generator.normal(0, 0.1, (rows, 2)), 0.1, 0.9)
    size = np.clip(typical[categories, 2:] * generator.uniform(0.5, 1.0, (rows, 2)), 0.05, 0.9)
    boxes = np.clip(np.concatenate([centre - size / 2, centre + size / 2], axis=1), 0, 1)
    labels = (generator.random(rows) < 0.5).astype(float)
    examples = []
    for index in range(rows):
        if task == "vsr":
            metadata = {"subject": f"s{categories[index] % 12}", "object": f"o{(categories[index] * 7) % 12}"}
        elif task == "rcm":
            metadata = {"category_id": int(categories[index]), "cell": int(generator.integers(9))}
        else:
            metadata = {"category_id": int(categories[index])}
        binary = task != "refcocog"
        examples.append(
            Example(
                example_id=index,
                image_id=index,
                image_path="unused.jpg",
                text="",
                category="all",
                label=int(labels[index]) if binary else None,
                box=None if binary else tuple(boxes[index]),
                metadata=metadata,
            )
        )
    targets = torch.tensor(labels if task != "refcocog" else boxes, dtype=torch.float32)
    features = torch.from_numpy(generator.normal(size=(rows, dims))).float()
    return ProbeData(task, "synthetic", features, targets, list(range(rows)), examples)


def floor_of(data: ProbeData) -> ProbeData:
    """The split as a floor reads it: its examples reading a permutation of the feature rows."""
    return ProbeData(
        data.task, data.split, data.features, data.targets, data.ids, data.examples, shuffled_rows(len(data), data.rows)
    )


def noise_rigour(task: str, seeds=(0, 1, 2, 3, 4)) -> dict:
    """Per-example test correctness of the task, its floor, and of each control seed and its floor, on noise."""
    train, val, test = noise_split(task, 2000, 0), noise_split(task, 400, 1), noise_split(task, 1000, 2)
    settings = TrainSettings(task=task, batch_size=128, device="cpu")
    trial = Trial(lr=0.01 if task == "refcocog" else 0.05, epochs=10)
    result = {
        "task": test_correct(train, val, test, trial, settings, seeds=3),
        "floor": test_correct(floor_of(train), floor_of(val), test, trial, settings, seeds=3),
        "control": [],
        "control_floor": [],
    }
    for seed in seeds:
        parts = [controlled(split, train, seed) for split in (train, val, test)]
        result["control"].append(test_correct(*parts, trial, settings, seeds=3))
        floors = (floor_of(parts[0]), floor_of(parts[1]), parts[2])
        result["control_floor"].append(test_correct(*floors, trial, settings, seeds=3))
    return result


@pytest.fixture(scope="module")
def noise_results():
    return {task: noise_rigour(task) for task in ("refcocog", "vsr", "rcm")}


@pytest.mark.parametrize("task", ["refcocog", "vsr", "rcm"])
def test_on_noise_features_selectivity_against_the_floors_covers_zero(noise_results, task):
    """Features that tell nothing: every accuracy is its floor's, and the selectivity's interval (examples and
    control seeds resampled) holds 0."""
    numbers = noise_results[task]
    above = np.stack(numbers["control"]) - np.stack(numbers["control_floor"])
    estimate = seeds_and_examples(-above, numbers["task"] - numbers["floor"])
    assert estimate.seeds == 5 and estimate.low <= 0 <= estimate.high, estimate
    assert estimate.mean == pytest.approx(
        numbers["task"].mean() - numbers["floor"].mean() - above.mean(axis=1).mean(), rel=1e-5
    )


def test_the_refcocog_control_above_its_floor_spreads_little_over_control_seeds(noise_results, capsys):
    """The control's accuracy itself depends on which box each category drew (a box the probe's mean
    prediction hits, for the 35 % category, is a third of the test set); above its floor it does not: within
    5 points over 5 control seeds. Prints both spreads (docs/rigor.md quotes this output)."""
    numbers = noise_results["refcocog"]
    raw = [float(100 * c.mean()) for c in numbers["control"]]
    above = [
        float(100 * (c.mean() - f.mean())) for c, f in zip(numbers["control"], numbers["control_floor"], strict=True)
    ]
    with capsys.disabled():
        print(
            f"\nRefCOCOg control on noise features, 5 control seeds: Acc@0.5 {[round(v, 1) for v in raw]} "
            f"(spread {max(raw) - min(raw):.1f} points); above its floor {[round(v, 1) for v in above]} "
            f"(spread {max(above) - min(above):.1f} points)"
        )
    assert max(above) - min(above) <= 5


def test_seeds_and_examples_covers_both_spreads():
    """The interval of a mean over control seeds widens with their spread, and equals a plain bootstrap over the
    examples when every seed gives the same."""
    generator = np.random.default_rng(0)
    same = (generator.random(500) < 0.6).astype(float)
    steady = seeds_and_examples(np.stack([same] * 5))
    assert steady.mean == pytest.approx(same.mean()) and steady.seed_std == 0
    plain = estimate(same[None])
    assert steady.high - steady.low == pytest.approx(plain.high - plain.low, abs=0.02)
    spread = np.stack([(generator.random(500) < p).astype(float) for p in (0.1, 0.3, 0.5, 0.7, 0.9)])
    wide = seeds_and_examples(spread)
    assert wide.high - wide.low > 0.3 and wide.seed_std == pytest.approx(np.std(spread.mean(1), ddof=1))
    shifted = seeds_and_examples(spread, shift=np.ones(500))
    assert shifted.mean == pytest.approx(1 + spread.mean())


def test_type_lookup_is_the_majority_label_of_each_train_type():
    answers = type_lookup(["a", "a", "a", "b", "b", "c"], [1, 1, 0, 0, 1, 1], ["a", "b", "c", "d"])
    assert answers == [1, 1, 1, 1]  # a: 2 of 3; b: a tie -> train majority (4 of 6 are 1); d unseen -> 1
    assert type_lookup(["a", "b", "b"], [1, 0, 0], ["a", "b", "z"]) == [1, 0, 0]


# ---------------------------------------------------------------------------------------------- refusals

# A value to give each scoped option, and a context its declared scope refuses (`probing.core.settings.Scope`).
SCOPED_VALUES = {
    "--lr": "0.01",
    "--epochs": "3",
    "--epoch-choices": "3,5",
    "--giou-scale": "2",
    "--l1-scale": "2",
    "--logreg-c": "0.5",
    "--hidden": "16",
    "--lr-range": "0.001,0.01",
    "--giou-scales": "1,2",
    "--l1-scales": "1,2",
    "--logreg-c-range": "0.01,1",
    "--shuffled-features": None,  # a flag
    "--in-memory": None,  # a flag (search)
}
SGD_SCOPE = "SGD probes (linear, swiglu2, swiglu4 ...)"
REFUSED_CONTEXT = {  # the scope's `what` -> options that put a command outside it, and how the message says so
    "SGD probes (linear, swiglu2, swiglu4 ...)": (["--probe", "logreg"], "--probe logreg"),
    "the logreg probe": (["--probe", "linear"], "--probe linear"),
    "probes with hidden layers (swiglu2, swiglu4 ...)": (["--probe", "linear"], "--probe linear"),
    "box tasks": ([], "a binary task"),  # the commands below run VSR
    "frozen probes (--mode frozen)": (["--mode", "unfrozen"], "--mode unfrozen"),
}


def scoped_cases():
    """Every command x every scoped setting it takes: (command, option, scope)."""
    import probing.probes.train  # noqa: F401  (their declarations register the scoped settings)
    from probing.core.settings import SCOPED, info_of, option_name
    from probing.probes.run import TrainRequest
    from probing.probes.train import TrainSettings, Trial
    from probing.studies.mdl import MdlRequest
    from probing.studies.search import SearchRequest
    from probing.tasks.search_space import SearchSpace

    takes = {  # the declarations each command's options derive from
        "train": (TrainRequest, TrainSettings, Trial),
        "search": (SearchRequest, TrainSettings, SearchSpace),
        "mdl": (MdlRequest, TrainSettings, Trial),
    }
    cases = []
    for command, classes in takes.items():
        for cls, name in SCOPED:
            if any(issubclass(owner, cls) for owner in classes):
                field = next(f for f in dataclasses.fields(cls) if f.name == name)
                scope = info_of(field).applies.what
                # mdl codes with frozen batched probes only: it has no --mode, and --probe logreg is refused first
                if option_name(field) in command_options(command) and (
                    command != "mdl" or scope not in ("frozen probes (--mode frozen)", SGD_SCOPE)
                ):
                    cases.append((command, option_name(field), scope))
    return cases


def command_options(name: str) -> set[str]:
    """The options a `probing` command takes, as typer made them."""
    from probing.cli.app import built_command

    return {option for parameter in built_command(name).params for option in parameter.opts}


@pytest.mark.parametrize(("command", "option", "scope"), scoped_cases())
def test_every_command_refuses_a_setting_where_it_would_be_ignored(
    capsys, vsr_stores, tiny_checkpoints, demo_options, tmp_path, command, option, scope
):
    from conftest import run_cli

    context, said = REFUSED_CONTEXT[scope]
    args = [command, "--task", "vsr", "--layer", 4, "--device", "cpu", "--features", vsr_stores / "trained"]
    if command != "mdl" and "--mode" in context:
        args += ["--model", tiny_checkpoints["blip2"], *[f"--{k}" for k in ("vsr",)], demo_options["vsr"]["vsr"]]
        args += ["--images", demo_options["vsr"]["images"]]
    if command != "search" and option not in ("--lr", "--epochs") and "logreg" not in context:
        args += ["--lr", "0.01", "--epochs", "2"]  # what an SGD probe needs besides the option
    value = SCOPED_VALUES[option]
    args += [*context, option, *([] if value is None else [value]), "--out", tmp_path / "out"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (args, out, err)
    assert err.strip() == f"error: {option}: applies to {scope} only, not {said}", args
    assert not (tmp_path / "out").exists()


def test_refused_values_and_sources(capsys, vsr_stores, tmp_path):
    """A range every command shares, and the hyper-parameters of a search that codes other targets."""
    from conftest import run_cli

    base = ["--task", "vsr", "--layer", 4, "--device", "cpu", "--features", vsr_stores / "trained"]
    fixed = ["--lr", "0.01", "--epochs", "2"]
    for command, extra in (("train", fixed), ("search", []), ("mdl", fixed)):
        code, _, err = run_cli(capsys, command, *base, *extra, "--warmup-fraction", "1.5", "--out", tmp_path / "o")
        assert code == 2 and err.strip() == "error: --warmup-fraction: must be <= 1, got 1.5", (command, err)
        assert not (tmp_path / "o").exists()
    search = [
        "search",
        *base,
        "--trials",
        1,
        "--trials-per-batch",
        1,
        "--lr-range",
        "0.01,0.02",
        "--epoch-choices",
        "1",
    ]
    for name, extra in (("task", []), ("control", ["--control", "--control-seed", "3"])):
        code, _, err = run_cli(capsys, *search, *extra, "--out", tmp_path / name)
        assert code == 0, err
    mdl = ["mdl", "--task", "vsr", "--layer", 4, "--device", "cpu"]
    for features, extra, message in (
        ("random", ["--from-search", tmp_path / "task"], "searched other features than --features"),
        ("trained", ["--from-search", tmp_path / "control"], "is a search on the control targets of control seed 3"),
        ("trained", ["--control", "--from-search", tmp_path / "control"], "not of --control-seed 0"),
    ):
        code, _, err = run_cli(capsys, *mdl, "--features", vsr_stores / features, *extra, "--out", tmp_path / "m")
        assert code == 2 and err.startswith("error: --from-search: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    # a control's code from its task's search: the task's hyper-parameters, as controls train by default
    code, _, err = run_cli(
        capsys,
        *mdl,
        "--features",
        vsr_stores / "trained",
        "--control",
        "--from-search",
        tmp_path / "task",
        "--out",
        tmp_path / "m",
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"warmup_fraction": 1.5}}, "config field 'train.warmup_fraction': must be <= 1, got 1.5"),
        (
            {"train": {"hidden": 16}},
            "config field 'train.hidden': applies to probes with hidden layers (swiglu2, swiglu4 ...) only, not "
            "probes linear",
        ),
        (
            {"space": {"vsr": {"giou_scale": [1, 2]}}},
            "config field 'experiments[0].search.space.vsr.giou_scale': applies to box tasks only, not a binary "
            "task ('vsr')",
        ),
        (
            {"space": {"vsr": {"logreg_c": [0.01, 1]}}},
            "config field 'experiments[0].search.space.vsr.logreg_c': applies to the logreg probe only, not probes "
            "linear",
        ),
        (
            {"zeroshot": {"text_preprocessing": "none"}},
            "config field 'experiments[1].zeroshot.text_preprocessing': 'none', while the probes' texts "
            "('extract.text_preprocessing') are prepared 'lavis'",
        ),
    ],
)
def test_probing_run_refuses_each_constraint_before_writing(capsys, tmp_path, change, message):
    from conftest import run_cli

    config = {
        "name": "x",
        "workspace": str(tmp_path / "workspace"),
        "models": {"m": {"tiny": "blip2"}},
        "data": {"demo": {}},
        "extract": {"text_preprocessing": "lavis"},
        "experiments": [
            {"name": "e", "tasks": ["vsr"], "models": ["m"], "search": {"space": change.get("space", {})}},
            {
                "name": "z",
                "tasks": ["vsr"],
                "models": ["m"],
                "modes": ["zeroshot"],
                "zeroshot": {"text_preprocessing": "lavis", **change.get("zeroshot", {})},
            },
        ],
        **({"train": change["train"]} if "train" in change else {}),
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", tmp_path / "c.yaml")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "workspace").exists()


def test_appendix_c_prepares_texts_as_the_probes_it_is_compared_with():
    from pathlib import Path

    from probing.runs.config import load_config

    root = Path(__file__).resolve().parent.parent / "experiments"
    appendix, table1 = load_config(root / "appendix_c.yaml", False), load_config(root / "table1.yaml", False)
    assert appendix.workspace == table1.workspace
    for experiment in appendix.experiments:
        assert experiment.zeroshot.text_preprocessing == table1.extract.text_preprocessing == "lavis"
