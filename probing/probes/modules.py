"""Diagnostic probes on flattened query outputs, single and batched.

Architectures (the paper's Table 3), on the flattened `Q x H` query outputs (32 x 768 = 24,576 inputs):
- `linear`: one linear map to the output (4 box coordinates, or 1 logit), as the paper.
- `swiglu2` / `swiglu4`: n layers in sequence; each but the last is a SwiGLU layer
  `silu(x W_gate) * (x W_up)` of width `hidden`, the last is linear. The gate and value projections of a
  SwiGLU layer count as one layer. `hidden` defaults to the Q-Former width H (768): a probe no wider than
  the representation it reads.

Probes register themselves (`register_probe`): a `ProbeKind` says how the probe is built and how frozen trials
of it are fitted. SwiGLU MLPs of any depth (`layers`) train K trials at once in a `ProbeBank`; any other module
(`build`) trains one trial at a time in the standard loop; the logistic regression is fitted by L-BFGS
(`probing.probes.logreg`). A new probe is one file with one `register_probe` call (docs/extending.md).

`Probe` is a plain module made of `nn.Linear` (separate runs, unfrozen training, saved weights).
`ProbeBank` holds K independent probes of one architecture with stacked parameters: one matmul per layer
serves all K on a shared batch. Its first layer is stored `[in, K, out]` so that `x @ W` over all K heads
is one GEMM on a free view; later layers are `[K, in, out]` for batched matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from probing.core.errors import ProbingError
from probing.core.registry import Registry


@dataclass(frozen=True)
class ProbeKind:
    """A registered probe."""

    name: str  # --probe, configs' `probes`, manifests
    title: str  # how reports name it
    layers: int | None = None  # a `Probe` of this many layers (1: linear; more: SwiGLU MLP): frozen trials batched
    build: Callable[[int, int, int], nn.Module] | None = None  # (inputs, outputs, hidden) -> any other module
    fit: Literal["sgd", "lbfgs"] = "sgd"  # lbfgs: scikit-learn's logistic regression (binary, frozen)

    @property
    def batched(self) -> bool:
        return self.fit == "sgd" and self.layers is not None


def _check_probe(name: str, kind: ProbeKind, others: dict[str, ProbeKind]) -> None:
    if (kind.layers is None) == (kind.build is None):
        raise ProbingError(f"probe '{kind.name}': give exactly one of layers and build")


# Installed packages may add probes through the entry-point group `probing.probes.modules` (a `ProbeKind`).
PROBES: Registry[ProbeKind] = Registry("probe", "probing.probes.modules", check=_check_probe)


def register_probe(kind: ProbeKind, *, replace: bool = False) -> ProbeKind:
    return PROBES.register(kind.name, kind, replace=replace)


def probe_kind(name: str, option: str = "--probe") -> ProbeKind:
    return PROBES.get(name, option)


for _kind in (
    ProbeKind("linear", "linear", layers=1),
    ProbeKind("swiglu2", "SwiGLU 2 layers", layers=2),
    ProbeKind("swiglu4", "SwiGLU 4 layers", layers=4),
    ProbeKind("logreg", "logistic regression (L-BFGS)", layers=1, fit="lbfgs"),
):
    register_probe(_kind)


def layer_count(architecture: str) -> int:
    layers = probe_kind(architecture).layers
    if layers is None:
        raise ProbingError(f"--probe: '{architecture}' is not a layered probe")
    return layers


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


def new_probe(architecture: str, inputs: int, outputs: int, hidden: int, seed: int) -> nn.Module:
    """A probe initialised from `seed` alone (a `Probe` as `nn.Linear` does: uniform +-1/sqrt(fan_in))."""
    kind = probe_kind(architecture)
    with seeded(seed):
        if kind.build is not None:
            return kind.build(inputs, outputs, hidden)
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

    def forward(self, features: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """`which` (probe indices, `[K']`): only those probes, `[K', B, out]` (default all K)."""
        inputs = features.flatten(1)  # [B, in]
        first = self._parameter(0, "weight", which)
        hidden = inputs @ first.reshape(first.shape[0], -1)  # [B, K*out]
        hidden = (
            hidden.view(inputs.shape[0], first.shape[1], -1).transpose(0, 1)
            + self._parameter(0, "bias", which)[:, None, :]
        )
        for index, (_, _, is_swiglu) in enumerate(self.shapes):
            if index > 0:
                hidden = torch.baddbmm(
                    self._parameter(index, "bias", which)[:, None, :], hidden, self._parameter(index, "weight", which)
                )
            if is_swiglu:
                hidden = swiglu(hidden)
        return hidden  # [K, B, out]

    def forward_each(self, features: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Each probe on a batch of its own: `features [K', B, in]` -> `[K', B, out]`, probe `which[k]` (default
        all K in order) reading `features[k]`. Probes that train on different data in one pass (the online
        code's prefixes, `probing.studies.mdl`) use this form."""
        hidden = features.flatten(2)
        for index, (_, _, is_swiglu) in enumerate(self.shapes):
            weight = self._parameter(index, "weight", which)
            if index == 0:
                weight = weight.transpose(0, 1)  # [K', in, out]
            hidden = torch.baddbmm(self._parameter(index, "bias", which)[:, None, :], hidden, weight)
            if is_swiglu:
                hidden = swiglu(hidden)
        return hidden

    def _parameter(self, index: int, kind: str, which: torch.Tensor | None) -> torch.Tensor:
        """`weight_<index>` or `bias_<index>`, of the probes `which` only when given (gradients reach the stack)."""
        name = f"{kind}_{index}"
        parameter = getattr(self, name)
        return parameter if which is None else parameter.index_select(self.probe_axis(name), which)

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
