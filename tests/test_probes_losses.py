"""Probe architectures, losses and metrics against hand-computed values."""

import math

import pytest
import torch

from probing.core.errors import ProbingError
from probing.probes.modules import Probe, ProbeBank, layer_shapes, new_probe
from probing.tasks import get_task
from probing.tasks.heads import BinaryHead, BoxHead
from probing.tasks.losses import binary_loss, box_loss, predicted_boxes


def raw_outputs_for(cxcywh):
    """Raw probe outputs whose sigmoid is the given normalized cxcywh box."""
    return torch.logit(torch.tensor(cxcywh, dtype=torch.float64)).float()


def test_architectures_and_widths():
    assert layer_shapes("linear", 32 * 768, 4, 768) == [(24576, 4, False)]
    assert layer_shapes("swiglu2", 24576, 1, 768) == [(24576, 1536, True), (768, 1, False)]
    assert [s[:2] for s in layer_shapes("swiglu4", 100, 4, 8)] == [(100, 16), (8, 16), (8, 16), (8, 4)]
    probe = Probe("swiglu4", 100, 4, 8)
    assert len(probe.layers) == 4 and probe(torch.randn(3, 4, 25)).shape == (3, 4)  # [B, Q, H] is flattened
    with pytest.raises(ProbingError, match="unknown probe 'mlp'"):
        Probe("mlp", 10, 1)


def test_swiglu_layer_is_gated():
    probe = new_probe("swiglu2", 6, 1, 3, seed=0)
    x = torch.randn(5, 6)
    gate, value = probe.layers[0](x).chunk(2, dim=-1)
    expected = probe.layers[1](torch.nn.functional.silu(gate) * value)
    assert torch.allclose(probe(x), expected)


def test_seeded_init_is_independent_of_global_state():
    torch.manual_seed(123)
    first = new_probe("linear", 20, 4, 8, seed=7)
    torch.rand(1000)
    again = new_probe("linear", 20, 4, 8, seed=7)
    assert torch.equal(first.layers[0].weight, again.layers[0].weight)
    assert not torch.equal(first.layers[0].weight, new_probe("linear", 20, 4, 8, seed=8).layers[0].weight)
    bound = 1 / math.sqrt(20)  # nn.Linear's init
    assert first.layers[0].weight.abs().max() <= bound


@pytest.mark.parametrize("architecture", ["linear", "swiglu2", "swiglu4"])
def test_bank_equals_its_probes(architecture):
    probes = [new_probe(architecture, 30, 4, 6, seed) for seed in range(5)]
    bank = ProbeBank(probes)
    x = torch.randn(9, 30)
    outputs = bank(x)
    assert outputs.shape == (5, 9, 4)
    for index, probe in enumerate(probes):
        assert torch.allclose(outputs[index], probe(x), atol=1e-6)
        extracted = bank.probe(index)
        for (name, mine), (_, theirs) in zip(extracted.state_dict().items(), probe.state_dict().items(), strict=True):
            assert torch.equal(mine, theirs), name
    assert bank.weight_0.shape == (30, 5, 2 * 6 if architecture != "linear" else 4)  # [in, K, out]


def test_box_loss_is_zero_for_identical_boxes():
    target_cxcywh = [[0.4, 0.5, 0.2, 0.3], [0.7, 0.2, 0.1, 0.1]]
    targets = torch.tensor([[0.3, 0.35, 0.5, 0.65], [0.65, 0.15, 0.75, 0.25]])
    loss = box_loss(raw_outputs_for(target_cxcywh), targets, giou_scale=3.0, l1_scale=7.0)
    # torchvision's GIoU divides by (area + 1e-7): about 1e-7 / 0.01 per term for these small boxes
    assert loss.item() == pytest.approx(0.0, abs=3e-5)
    assert box_loss(raw_outputs_for(target_cxcywh), targets, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_box_loss_known_value():
    # prediction cxcywh (0.5, 0.5, 0.5, 0.5) = xyxy (0.25, 0.25, 0.75, 0.75); target xyxy (0, 0, 0.5, 0.5).
    # IoU = 0.0625 / 0.4375; enclosing box 0.5625; GIoU = IoU - (0.5625 - 0.4375) / 0.5625.
    # L1 on cxcywh: |0.5 - 0.25| + |0.5 - 0.25| + 0 + 0 = 0.5.
    giou = 0.0625 / 0.4375 - 0.125 / 0.5625
    loss = box_loss(raw_outputs_for([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([[0.0, 0.0, 0.5, 0.5]]), 2.0, 5.0)
    assert loss.item() == pytest.approx(2 * (1 - giou) + 5 * 0.5, abs=1e-5)


def test_disjoint_boxes_have_giou_loss_above_one():
    # prediction (0.1, 0.1, 0.2, 0.2) xyxy, target (0.8, 0.8, 0.9, 0.9): IoU 0, GIoU negative.
    loss = box_loss(raw_outputs_for([[0.15, 0.15, 0.1, 0.1]]), torch.tensor([[0.8, 0.8, 0.9, 0.9]]), 1.0, 0.0)
    enclosing = 0.8 * 0.8
    assert loss.item() > 1
    assert loss.item() == pytest.approx(1 + (enclosing - 0.02) / enclosing, abs=1e-5)


def test_gradients_are_finite_on_degenerate_predictions():
    outputs = torch.tensor(
        [
            [-60.0, -60.0, -60.0, -60.0],  # a zero-size box at the origin
            [60.0, 60.0, 60.0, 60.0],  # saturated sigmoid
            [0.0, 0.0, -80.0, -80.0],
        ],
        requires_grad=True,
    )  # zero width and height
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 0.5, 0.5]])
    loss = box_loss(outputs, targets, 2.0, 5.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(outputs.grad).all()
    predicted = predicted_boxes(outputs.detach())
    assert (predicted[:, 2:] >= predicted[:, :2]).all()  # always valid boxes


def test_losses_keep_probes_apart():
    outputs = torch.randn(3, 8, 4)
    targets = predicted_boxes(torch.randn(8, 4))
    scales = torch.tensor([1.0, 2.0, 4.0])
    together = box_loss(outputs, targets, scales, scales * 2)
    for k in range(3):
        alone = box_loss(outputs[k], targets, float(scales[k]), float(scales[k] * 2))
        assert together[k].item() == pytest.approx(alone.item(), rel=1e-6)
    logits = torch.randn(3, 8, 1)
    labels = torch.randint(0, 2, (8,)).float()
    assert torch.allclose(binary_loss(logits, labels), torch.stack([binary_loss(logits[k], labels) for k in range(3)]))


def test_binary_loss_known_values():
    assert binary_loss(torch.zeros(4, 1), torch.tensor([0.0, 1.0, 1.0, 0.0])).item() == pytest.approx(math.log(2))
    assert binary_loss(torch.tensor([[2.0]]), torch.tensor([1.0])).item() == pytest.approx(math.log1p(math.exp(-2)))


def test_metrics_on_hand_made_cases():
    # IoUs 1.0, 0.6 (pred inside target, 60 % of it), 0.4, 0.0
    targets = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.1, 0.1]])
    predicted_cxcywh = [
        [0.4, 0.4, 0.4, 0.4],
        [0.15, 0.5, 0.3, 1.0 - 1e-7],
        [0.1, 0.5, 0.2, 1.0 - 1e-7],
        [0.9, 0.9, 0.1, 0.1],
    ]
    metrics = BoxHead().metrics(raw_outputs_for(predicted_cxcywh), targets)
    assert metrics["acc@0.5"].item() == pytest.approx(0.5)  # 2 of 4 at IoU >= 0.5
    assert metrics["mean_iou"].item() == pytest.approx((1.0 + 0.6 + 0.4 + 0.0) / 4, abs=1e-4)
    accuracy = BinaryHead().metrics(torch.tensor([[2.0], [-1.0], [0.5], [-3.0]]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert accuracy["accuracy"].item() == pytest.approx(0.5)
    assert get_task("refcocog").metric == "acc@0.5" and get_task("rcm").metric == "accuracy"
