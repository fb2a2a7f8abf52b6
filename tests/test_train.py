"""The trainers: batching changes speed, not results; probes learn what is encoded and nothing else."""

import pytest
import torch

from probing.core.errors import ProbingError
from probing.probes.modules import ProbeBank, new_probe
from probing.probes.train import (
    BatchedAdamW,
    EarlyStopping,
    ProbeData,
    TrainSettings,
    Trial,
    parameter_groups,
    schedule_factor,
    train_frozen,
    train_single,
)


def synthetic(task: str, rows: int, dims: int = 64, seed: int = 0, shuffle_labels: bool = False) -> ProbeData:
    """Features where the answer is a linear function of the features (plus nothing else)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dims, 4, generator=torch.Generator().manual_seed(1234))  # shared by all splits
    features = torch.randn(rows, dims, generator=generator)
    if task == "refcocog":
        unit = (features @ direction / dims**0.5).sigmoid()
        centre, size = 0.25 + 0.5 * unit[:, :2], 0.2 + 0.3 * unit[:, 2:]
        targets = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    else:
        targets = (features @ direction[:, 0] > 0).float()
    if shuffle_labels:
        targets = targets[torch.randperm(rows, generator=generator)]
    return ProbeData(task, "synthetic", features, targets, list(range(rows)), [])


@pytest.mark.parametrize(
    "task,probe", [("vsr", "linear"), ("refcocog", "linear"), ("refcocog", "swiglu2"), ("rcm", "swiglu4")]
)
def test_batched_trials_equal_separate_runs(task, probe):
    """K trials in one pass (ProbeBank + BatchedAdamW) == K standard loops (torch.optim.AdamW), same seeds."""
    train, val = synthetic(task, 300), synthetic(task, 100, seed=1)
    settings = TrainSettings(task=task, probe=probe, hidden=8, batch_size=32, patience=2, device="cpu")
    trials = [
        Trial(lr=3e-3, epochs=4, seed=1, giou_scale=2.0, l1_scale=5.0),
        Trial(lr=1e-3, epochs=7, seed=2),
        Trial(lr=2e-2, epochs=3, seed=3, giou_scale=1.0, l1_scale=10.0),
    ]
    batched = train_frozen(train, val, trials, settings)
    for trial, together in zip(trials, batched, strict=True):
        alone = train_single(train, val, trial, settings)
        assert together.best_epoch == alone.best_epoch and together.epochs_run == alone.epochs_run
        assert together.stopped_early == alone.stopped_early
        for name in together.val_metrics:
            assert together.val_metrics[name] == pytest.approx(alone.val_metrics[name], abs=1e-5), name
        for (name, mine), (_, theirs) in zip(
            together.probe.state_dict().items(), alone.probe.state_dict().items(), strict=True
        ):
            # rounding differences (a different matmul order), amplified by Adam's normalisation: ~1e-6
            assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), name
        assert [h["epoch"] for h in together.history] == [h["epoch"] for h in alone.history]
        for mine, theirs in zip(together.history, alone.history, strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_batched_adamw_step_equals_torch_adamw():
    """On identical gradients (spanning 10 orders of magnitude) one probe's update is torch's, to rounding."""
    probes = [new_probe("swiglu2", 40, 4, 8, seed) for seed in range(3)]
    bank = ProbeBank(probes)
    optimizer = BatchedAdamW(bank, weight_decay=0.01)
    references = [new_probe("swiglu2", 40, 4, 8, seed) for seed in range(3)]
    lrs, active = torch.tensor([1e-2, 3e-3, 5e-3]), torch.tensor([True, True, False])
    torch_optimizers = [
        torch.optim.AdamW(parameter_groups(r.named_parameters(), 0.01), lr=float(lr))
        for r, lr in zip(references, lrs, strict=True)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        gradients = {
            name: torch.randn(p.shape, generator=generator)
            * 10.0 ** torch.randint(-10, 0, p.shape, generator=generator).float()
            for name, p in bank.named_parameters()
        }
        for name, parameter in bank.named_parameters():
            parameter.grad = gradients[name].clone()
        optimizer.step(lrs, active)
        for k, (reference, torch_optimizer) in enumerate(zip(references, torch_optimizers, strict=True)):
            if not active[k]:
                continue
            for index, layer in enumerate(reference.layers):
                weight = gradients[f"weight_{index}"]
                layer.weight.grad = (weight[:, k] if index == 0 else weight[k]).t().clone()
                layer.bias.grad = gradients[f"bias_{index}"][k].clone()
            torch_optimizer.step()
    for k in range(3):
        expected = references[k] if active[k] else new_probe("swiglu2", 40, 4, 8, k)  # inactive: untouched
        for mine, theirs in zip(bank.probe(k).state_dict().values(), expected.state_dict().values(), strict=True):
            assert torch.allclose(mine, theirs, atol=5e-8, rtol=0)


@pytest.mark.parametrize("task,metric,floor", [("vsr", "accuracy", 0.9), ("refcocog", "acc@0.5", 0.8)])
def test_a_linear_probe_learns_what_is_linearly_encoded(task, metric, floor):
    train, val = synthetic(task, 2000), synthetic(task, 500, seed=1)
    settings = TrainSettings(task=task, batch_size=64, device="cpu")
    result = train_frozen(train, val, [Trial(lr=1e-2, epochs=15, giou_scale=2.0, l1_scale=5.0)], settings)[0]
    assert result.val_metrics[metric] > floor


def test_shuffled_labels_stay_at_chance():
    train = synthetic("vsr", 2000, shuffle_labels=True)
    val = synthetic("vsr", 1000, seed=1)
    settings = TrainSettings(task="vsr", batch_size=64, device="cpu")
    results = train_frozen(train, val, [Trial(lr=1e-2, epochs=10, seed=s) for s in range(3)], settings)
    for result in results:
        final = result.history[-1]["accuracy"]
        assert 0.42 < final < 0.58


def test_schedule_warms_up_then_decays():
    factors = [schedule_factor(step, 100, 0.1) for step in range(1, 101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0  # warm-up over 10 steps
    assert factors[10] == 1.0 and factors[11] < 1.0  # the decay starts from 1
    assert factors[-1] == pytest.approx(1 / 90)  # ... and never wastes a step at zero
    assert all(a <= b for a, b in zip(factors[:9], factors[1:10], strict=True))
    assert all(a >= b for a, b in zip(factors[9:-1], factors[10:], strict=True))
    assert schedule_factor(1, 5, 0.1) == 5 / 5  # under 10 steps there is no warm-up


def test_early_stopping_keeps_the_first_best_epoch():
    stopper = EarlyStopping([Trial(lr=1.0, epochs=20), Trial(lr=1.0, epochs=3)], patience=2)
    values = [[0.5, 0.1], [0.7, 0.2], [0.7, 0.3], [0.6, 0.0], [0.9, 0.0]]
    for epoch, value in enumerate(values, start=1):
        stopper.update(epoch, value, stopper.running(epoch))
    assert stopper.best_epoch == [2, 3] and stopper.stopped[0]  # stopped after epochs 3 and 4 without gain
    assert stopper.epochs_run == [4, 3] and not stopper.running(6)[1]


def test_weight_decay_groups():
    probe = new_probe("swiglu2", 10, 1, 4, 0)
    groups = parameter_groups(probe.named_parameters(), 0.01)
    assert {id(p) for p in groups[0]["params"]} == {id(probe.layers[0].weight), id(probe.layers[1].weight)}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    groups = parameter_groups(probe.named_parameters(), 0.01, without_gradient={"layers.1.weight"})
    assert {id(p) for p in groups[0]["params"]} == {id(probe.layers[0].weight)}


def test_reproducible_for_a_seed():
    train, val = synthetic("vsr", 300), synthetic("vsr", 100, seed=1)
    settings = TrainSettings(task="vsr", batch_size=32, device="cpu")
    first = train_frozen(train, val, [Trial(lr=1e-2, epochs=3, seed=4)], settings)[0]
    again = train_frozen(train, val, [Trial(lr=1e-2, epochs=3, seed=4)], settings)[0]
    assert torch.equal(first.probe.layers[0].weight, again.probe.layers[0].weight)
    assert first.history == again.history


def test_bad_settings_are_one_line():
    # one message template for every declared setting: the option, the bound, the value
    with pytest.raises(ProbingError, match="^--lr: must be > 0, got 0$"):
        Trial(lr=0.0, epochs=3).check()
    with pytest.raises(ProbingError, match="^--epochs: must be >= 1, got 0$"):
        Trial(lr=1e-3, epochs=0).check()
    with pytest.raises(ProbingError, match="^--patience: must be >= 0, got -1$"):
        TrainSettings(task="vsr", patience=-1).check()
    with pytest.raises(ProbingError, match=r"^--probe: unknown probe 'deep'; known: linear, swiglu2, swiglu4, logreg$"):
        TrainSettings(task="vsr", probe="deep").check()
    with pytest.raises(ProbingError, match="^--giou-scale: must be a finite number, got nan$"):
        Trial(lr=1e-3, epochs=1, giou_scale=float("nan")).check()
