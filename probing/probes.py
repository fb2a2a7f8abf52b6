"""Diagnostic probes on flattened query outputs, single and batched.

Architectures (the paper's Table 3), on the flattened `Q x H` query outputs (32 x 768 = 24,576 inputs):
- `linear`: one linear map to the output (4 box coordinates, or 1 logit), as the paper.
- `swiglu2` / `swiglu4`: n layers in sequence; each but the last is a SwiGLU layer
  `silu(x W_gate) * (x W_up)` of width `hidden`, the last is linear. The gate and value projections of a
  SwiGLU layer count as one layer. `hidden` defaults to the Q-Former width H (768): a probe no wider than
  the representation it reads.

`Probe` is a plain module made of `nn.Linear` (separate runs, unfrozen training, saved weights).
`ProbeBank` holds K independent probes of one architecture with stacked parameters: one matmul per layer
serves all K on a shared batch. Its first layer is stored `[in, K, out]` so that `x @ W` over all K heads
is one GEMM on a free view; later layers are `[K, in, out]` for batched matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from probing.errors import ProbingError

ARCHITECTURES = {"linear": 1, "swiglu2": 2, "swiglu4": 4}  # name -> number of layers


def layer_count(architecture: str) -> int:
    if architecture not in ARCHITECTURES:
        raise ProbingError(f"--probe: unknown probe '{architecture}' (choose {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[architecture]


def layer_shapes(architecture: str, inputs: int, outputs: int, hidden: int) -> list[tuple[int, int, bool]]:
    """(fan_in, fan_out, is_swiglu) per layer; a SwiGLU layer's fan_out is 2 * hidden (gate and value)."""
    count = layer_count(architecture)
    shapes, width = [], inputs
    for _ in range(count - 1):
        shapes.append((width, 2 * hidden, True))
        width = hidden
    shapes.append((width, outputs, False))
    return shapes


def swiglu(projected: torch.Tensor) -> torch.Tensor:
    gate, value = projected.chunk(2, dim=-1)
    return F.silu(gate) * value


class Probe(nn.Module):
    """One probe: `forward(x [B, Q*H]) -> [B, outputs]`."""

    def __init__(self, architecture: str, inputs: int, outputs: int, hidden: int = 768):
        super().__init__()
        self.architecture, self.inputs, self.outputs, self.hidden = architecture, inputs, outputs, hidden
        self.shapes = layer_shapes(architecture, inputs, outputs, hidden)
        self.layers = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out, _ in self.shapes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features.flatten(1)
        for layer, (_, _, is_swiglu) in zip(self.layers, self.shapes, strict=True):
            hidden = layer(hidden)
            if is_swiglu:
                hidden = swiglu(hidden)
        return hidden


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under `seed` without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def new_probe(architecture: str, inputs: int, outputs: int, hidden: int, seed: int) -> Probe:
    """A probe initialised as `nn.Linear` does (uniform +-1/sqrt(fan_in)) from `seed` alone."""
    with seeded(seed):
        return Probe(architecture, inputs, outputs, hidden)


class ProbeBank(nn.Module):
    """K independent probes of one architecture with stacked parameters.

    `forward(x [B, in]) -> [K, B, outputs]`: every probe reads the same batch. Parameters:
    `weight_0 [in, K, out]`, `bias_0 [K, out]`, then `weight_i [K, in, out]`, `bias_i [K, out]`.
    `probe_axis(name)` says which dimension indexes the probes (for per-probe optimiser steps).
    """

    def __init__(self, probes: Sequence[Probe]):
        super().__init__()
        if not probes:
            raise ValueError("a ProbeBank needs at least one probe")
        first = probes[0]
        self.architecture, self.shapes = first.architecture, first.shapes
        self.inputs, self.outputs, self.hidden = first.inputs, first.outputs, first.hidden
        self.size = len(probes)
        for index in range(len(self.shapes)):
            weights = torch.stack([p.layers[index].weight.detach().t() for p in probes])  # [K, in, out]
            if index == 0:
                weights = weights.permute(1, 0, 2)  # [in, K, out]: one GEMM for all K heads
            self.register_parameter(f"weight_{index}", nn.Parameter(weights.contiguous()))
            biases = torch.stack([p.layers[index].bias.detach() for p in probes])
            self.register_parameter(f"bias_{index}", nn.Parameter(biases.contiguous()))

    @staticmethod
    def probe_axis(name: str) -> int:
        return 1 if name == "weight_0" else 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        inputs = features.flatten(1)  # [B, in]
        first = self.weight_0
        hidden = inputs @ first.reshape(first.shape[0], -1)  # [B, K*out]
        hidden = hidden.view(inputs.shape[0], self.size, -1).transpose(0, 1) + self.bias_0[:, None, :]
        for index, (_, _, is_swiglu) in enumerate(self.shapes):
            if index > 0:
                hidden = torch.baddbmm(
                    getattr(self, f"bias_{index}")[:, None, :], hidden, getattr(self, f"weight_{index}")
                )
            if is_swiglu:
                hidden = swiglu(hidden)
        return hidden  # [K, B, out]

    def probe(self, index: int) -> Probe:
        """Probe `index` as a plain module (for saving, evaluation and unfrozen use)."""
        probe = Probe(self.architecture, self.inputs, self.outputs, self.hidden)
        with torch.no_grad():
            for layer_index, layer in enumerate(probe.layers):
                weight = getattr(self, f"weight_{layer_index}")
                weight = weight[:, index] if layer_index == 0 else weight[index]
                layer.weight.copy_(weight.t())
                layer.bias.copy_(getattr(self, f"bias_{layer_index}")[index])
        return probe.to(self.weight_0.device)
