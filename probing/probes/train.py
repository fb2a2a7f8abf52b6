"""Training probes: frozen (K probes batched on resident features) and unfrozen (Q-Former + probe).

One schedule code path for every mode: AdamW (weight decay only on weight matrices, never on biases,
norms or parameters without gradient), the learning rate warmed up linearly over the first 10 % of steps
and then decayed linearly (`schedule_factor`), evaluation on val after every epoch, the best epoch kept by
the task's main metric in its direction (the first epoch reaching the best value), early stopping after
`patience` epochs without improvement (`EarlyStopping`), and seeds for initialisation and batch order.
What a task predicts and how it is judged is its head's say (`probing.tasks.heads`).

- `train_frozen`: the chosen layer's features sit on the device (GPU if present, bf16 there); batches are
  sliced by index, no DataLoader; K trials (lr, epochs, loss scales, seed) run in one pass over the data as
  a `ProbeBank`, each with its own schedule, early-stopping state and best epoch, updated by
  `BatchedAdamW`. Trials of one pass share the batch order (drawn from `order_seed`); a trial's seed sets
  its initialisation. The `logreg` probe is fitted by scikit-learn instead (`probing.probes.logreg`), which the
  frozen trainer (`probing.probes.trainers`) calls for it.
- `train_module`: the standard single-probe loop (DataLoader, `torch.optim.AdamW`, `LambdaLR`) through
  accelerate; it runs frozen single probes (the reference the batched trainer is tested against) and
  unfrozen training (`probing.probes.unfrozen`), with bf16 autocast on GPU and DDP under `accelerate launch`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from probing.core.device_copies import to_device_chunked
from probing.core.devices import resolve_device
from probing.core.errors import ProbingError
from probing.data.types import Example
from probing.probes.checkpoints import TrialCheckpoint, load_optimizer, optimizer_tensors
from probing.probes.modules import Probe, ProbeBank, new_probe, probe_kind
from probing.probes.settings import LATENT_READINGS, TrainSettings, Trial, check_latent_reading  # noqa: F401 (their home was here)
from probing.tasks.heads import Head

log = logging.getLogger(__name__)

BETAS = (0.9, 0.999)
EPS = 1e-8
EVAL_CHUNK = 1024  # rows per evaluation forward: bounds the activations of a whole split


def probe_inputs(states: torch.Tensor, reading: str) -> torch.Tensor:
    """`[B, Q, H]` latents -> `[B, inputs]` probe inputs, read as `reading` says (`LATENT_READINGS`)."""
    if reading == "mean":
        return states.mean(dim=1, dtype=torch.float32).to(states.dtype)
    return states.flatten(1)


def probe_input_size(latents: int, width: int, reading: str) -> int:
    return width if reading == "mean" else latents * width


@dataclass
class ProbeData:
    """One split ready for probing: flattened features, targets, ids and examples (aligned).

    `features` is `[N, Q*H]`, one row per example; or, with `rows`, one row per image (a backend that reads
    no text) and example i reads row `rows[i]`.
    """

    task: str
    split: str
    features: torch.Tensor
    targets: torch.Tensor  # [N, 4] normalized xyxy boxes, or [N] labels 0/1
    ids: list[int]
    examples: list[Example]
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def example_features(self) -> torch.Tensor:
        """`[N, Q*H]`, one row per example (a copy for per-image features)."""
        return self.features if self.rows is None else self.features.index_select(0, self.rows)


@dataclass
class TrialResult:
    trial: Trial
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    val_metrics: dict[str, float]  # at the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    probe: Probe | None = None  # weights of the best epoch, on the CPU
    pruned: bool = False  # stopped by the search's pruner (its history ends where it was stopped)


# A search's pruner, consulted after each epoch: (epoch, each trial's val metric, which trials ran) -> which trials
# to stop now.
EpochCallback = Callable[[int, list[float], list[bool]], list[bool]]


def schedule_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier for optimiser step `step` (1-based) of `total_steps`.

    Linear warm-up to 1 over the first `warmup_fraction` of the steps (none under 10 steps at 10 %), then
    linear decay from 1 to 1/(decay steps) at the last step; no step has a zero learning rate.
    """
    warmup = int(warmup_fraction * total_steps)
    if step <= warmup:
        return step / warmup
    return max(0.0, (total_steps - step + 1) / (total_steps - warmup))


class EarlyStopping:
    """Best epoch and patience for K trials by the main metric in its direction (host side, consulted once per
    epoch)."""

    def __init__(self, trials: Sequence[Trial], patience: int | None, direction: str = "maximize"):
        self.trials, self.patience, self.maximize = list(trials), patience, direction == "maximize"
        self.best_value = [-math.inf if self.maximize else math.inf] * len(trials)
        self.best_epoch = [0] * len(trials)
        self.stopped = [False] * len(trials)
        self.epochs_run = [0] * len(trials)

    def running(self, epoch: int) -> list[bool]:
        return [not stopped and epoch <= trial.epochs for stopped, trial in zip(self.stopped, self.trials, strict=True)]

    def prune(self, index: int) -> None:
        """Stop trial `index` now (a search's pruner judged it hopeless)."""
        self.stopped[index] = True

    def state(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "stopped": self.stopped,
            "epochs_run": self.epochs_run,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch = list(state["best_value"]), list(state["best_epoch"])
        self.stopped, self.epochs_run = list(state["stopped"]), list(state["epochs_run"])

    def update(self, epoch: int, values: Sequence[float], running: Sequence[bool]) -> list[bool]:
        """Record the epoch's val metric per trial; return which trials improved (strictly)."""
        improved = []
        for index, (value, active) in enumerate(zip(values, running, strict=True)):
            better = active and (value > self.best_value[index] if self.maximize else value < self.best_value[index])
            if active:
                self.epochs_run[index] = epoch
            if better:
                self.best_value[index], self.best_epoch[index] = value, epoch
            elif active and self.patience is not None and epoch - self.best_epoch[index] >= self.patience:
                self.stopped[index] = True
            improved.append(better)
        return improved


def val_metrics_at(epoch_record: dict[str, float]) -> dict[str, float]:
    """The val part of a history record, named as test metrics are: {'loss', 'acc@0.5', ...}."""
    return {("loss" if k == "val_loss" else k): v for k, v in epoch_record.items() if k not in ("epoch", "train_loss")}


def is_main_process() -> bool:
    """False only in the second and later processes of `accelerate launch` / torchrun (they set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (features resident and matmuls in bf16, master weights fp32), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def decays(name: str, parameter: torch.Tensor) -> bool:
    """Weight decay on weight matrices (and query tokens), never on biases or norms (LAVIS's rule)."""
    lowered = name.lower()
    return parameter.ndim >= 2 and "norm" not in lowered and not lowered.endswith("bias")


class EpochOrder(torch.utils.data.Sampler[int]):
    """The batch order: a fresh permutation of the rows per epoch from one seeded generator.

    Both trainers draw from it (the batched one directly, the module loop as a DataLoader sampler), so a
    batched pass and a plain run with the same `order_seed` see the same batches. (A DataLoader's own
    `shuffle=True, generator=...` also draws a worker seed from the generator, so it would not match.)
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(self.next_order().tolist())

    def next_order(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=self.generator)


# ---------------------------------------------------------------------------------------------- batched


def along_probe_axis(values: torch.Tensor, parameter: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-probe values `[K]` shaped to broadcast over a stacked parameter whose probe axis is `axis`."""
    shape = [1] * parameter.ndim
    shape[axis] = -1
    return values.view(shape)


class BatchedAdamW:
    """AdamW over stacked probe parameters with one learning rate, step count and on/off switch per probe.

    Written by hand because `torch.optim.AdamW` has one learning rate per parameter tensor, while a stacked
    tensor holds K probes. The arithmetic follows `torch.optim.AdamW` step by step (decoupled decay first,
    then the bias-corrected update); the tests check the batched result against K runs of the real thing.
    """

    def __init__(self, bank: ProbeBank, weight_decay: float, betas=BETAS, eps: float = EPS):
        self.bank, self.weight_decay, self.betas, self.eps = bank, weight_decay, betas, eps
        # Stacked tensors carry a probe axis, so decide on the name: weight_i decays, bias_i does not.
        self.entries = [
            (name, parameter, bank.probe_axis(name), name.startswith("weight_"))
            for name, parameter in bank.named_parameters()
        ]
        self.exp_avg = {name: torch.zeros_like(p) for name, p, _, _ in self.entries}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p, _, _ in self.entries}
        self.steps = torch.zeros(bank.size, dtype=torch.float64, device=bank.weight_0.device)

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, active: torch.Tensor) -> None:
        """One update; `lrs` [K] (already scheduled), `active` [K] bool (inactive probes are left as they are)."""
        beta1, beta2 = self.betas
        self.steps += active.to(self.steps.dtype)
        steps = self.steps.clamp(min=1)
        correction1 = 1 - beta1**steps
        correction2_sqrt = (1 - beta2**steps).sqrt()
        step_sizes = lrs.to(steps.dtype) / correction1
        for name, parameter, axis, decay in self.entries:
            gradient = parameter.grad
            on = along_probe_axis(active, parameter, axis)
            lr = along_probe_axis(lrs.to(parameter.dtype), parameter, axis)
            if decay:
                parameter.mul_(torch.where(on, 1 - lr * self.weight_decay, 1.0))
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.copy_(torch.where(on, exp_avg.lerp(gradient, 1 - beta1), exp_avg))
            exp_avg_sq.copy_(torch.where(on, exp_avg_sq * beta2 + (1 - beta2) * gradient * gradient, exp_avg_sq))
            denominator = (
                exp_avg_sq.sqrt() / along_probe_axis(correction2_sqrt.to(parameter.dtype), parameter, axis)
            ).add_(self.eps)
            update = exp_avg / denominator * along_probe_axis(step_sizes.to(parameter.dtype), parameter, axis)
            parameter.sub_(torch.where(on, update, 0.0))


def _bank_outputs(bank: ProbeBank, features: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """All K probes on all rows, `[K, N, out]` in fp32, evaluated in chunks."""
    outputs = []
    with torch.no_grad(), torch.autocast(features.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(features), chunk):
            outputs.append(bank(features[start : start + chunk]).float())
    return torch.cat(outputs, dim=1)


def _per_example(outputs: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`[K, M, out]` outputs of per-image rows -> `[K, N, out]` per example (unchanged without `rows`)."""
    return outputs if rows is None else outputs.index_select(1, rows.to(outputs.device))


def schedule_table(
    lrs: Sequence[float], total_steps: Sequence[int], warmup_fraction: float, device: torch.device
) -> torch.Tensor:
    """`[max(total_steps), K]` learning rates: row s - 1 holds each probe's rate at its step s (0 once its own
    `total_steps` are done). The whole schedule as one table on the device: no per-step host work or
    synchronisation."""
    return torch.tensor(
        [
            [
                lr * schedule_factor(s, total, warmup_fraction) if s <= total else 0.0
                for lr, total in zip(lrs, total_steps, strict=True)
            ]
            for s in range(1, max(total_steps) + 1)
        ],
        dtype=torch.float32,
        device=device,
    )


def load_best_weights(bank: ProbeBank, best: dict[str, torch.Tensor]) -> None:
    """Put each probe's best epoch's weights (kept aside in `best`) back into the bank."""
    with torch.no_grad():
        for name, parameter in bank.named_parameters():
            parameter.copy_(best[name])


def result_at_best(
    trial: Trial,
    stopper: EarlyStopping,
    index: int,
    history: list[dict[str, float]],
    probe: Probe,
    pruned: bool = False,
) -> TrialResult:
    """The TrialResult of trial `index` of `stopper`: its best epoch, how long it ran, its val metrics there."""
    best_epoch = stopper.best_epoch[index]
    return TrialResult(
        trial=trial,
        best_epoch=best_epoch,
        epochs_run=stopper.epochs_run[index],
        stopped_early=stopper.stopped[index] and stopper.epochs_run[index] < trial.epochs,
        val_metrics=val_metrics_at(next(h for h in history if h["epoch"] == best_epoch)),
        history=history,
        probe=probe,
        pruned=pruned,
    )


@dataclass
class _BankPass:
    """What every epoch of one batched pass (`train_frozen`) reads: the bank, its optimiser, the resident
    features and targets, the schedule table, and the global step reached."""

    bank: ProbeBank
    optimizer: BatchedAdamW
    head: Head
    weights: dict[str, torch.Tensor]
    features: torch.Tensor
    targets: torch.Tensor
    row_of: torch.Tensor | None  # per-image features: the feature row of each train example
    val_features: torch.Tensor
    val_targets: torch.Tensor
    val_rows: torch.Tensor | None
    lr_table: torch.Tensor
    steps_per_epoch: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    step: int = 0


def _checked_batched_trials(trials: Sequence[Trial], settings: TrainSettings) -> list[Trial]:
    settings.check()
    trials = [trial.check(settings.probe) for trial in trials]
    if not trials:
        raise ProbingError("no trial to train")
    if not probe_kind(settings.probe).batched:
        raise ProbingError(f"--probe {settings.probe}: not a batched probe (the frozen trainer fits it its own way)")
    return trials


def _bank_pass(train: ProbeData, val: ProbeData, trials: list[Trial], settings: TrainSettings) -> _BankPass:
    """Features and targets moved to the device once, K fresh probes stacked, their schedules tabulated."""
    head = settings.head
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)
    features = to_device_chunked(train.features, device, dtype)
    val_features = to_device_chunked(val.features, device, dtype)
    targets, val_targets = train.targets.to(device), val.targets.to(device)
    row_of = train.rows.to(device) if train.rows is not None else None
    bank = ProbeBank(
        [new_probe(settings.probe, features.shape[1], head.outputs, settings.hidden, t.seed) for t in trials]
    ).to(device)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    return _BankPass(
        bank=bank,
        optimizer=BatchedAdamW(bank, settings.weight_decay),
        head=head,
        weights=head.weights(trials, device),
        features=features,
        targets=targets,
        row_of=row_of,
        val_features=val_features,
        val_targets=val_targets,
        val_rows=val.rows,
        lr_table=schedule_table(
            [t.lr for t in trials], [t.epochs * steps_per_epoch for t in trials], settings.warmup_fraction, device
        ),
        steps_per_epoch=steps_per_epoch,
        batch_size=settings.batch_size,
        device=device,
        dtype=dtype,
    )


def _bank_epoch(run: _BankPass, order: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One epoch of optimiser steps for the active probes in batch order `order`; the summed train loss `[K]`."""
    loss_sum = torch.zeros(run.bank.size, device=run.device)
    for start in range(0, len(order), run.batch_size):
        rows = order[start : start + run.batch_size]
        with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
            # index_select, not features[rows]: the same rows, 7x faster on the CPU (a memcpy per row)
            predictions = run.bank(run.features.index_select(0, rows if run.row_of is None else run.row_of[rows]))
        losses = run.head.loss(predictions, run.targets[rows], run.weights)
        losses.sum().backward()  # probes share no parameter: each gradient is its own probe's
        run.optimizer.step(run.lr_table[run.step], active)
        run.bank.zero_grad(set_to_none=True)
        loss_sum += losses.detach()
        run.step += 1
    return loss_sum


def _bank_validation(run: _BankPass) -> tuple[list[float], dict[str, list[float]]]:
    """Every probe's val loss and val metrics (host lists) after an epoch."""
    val_outputs = _per_example(_bank_outputs(run.bank, run.val_features, EVAL_CHUNK, run.dtype), run.val_rows)
    val_losses = run.head.loss(val_outputs, run.val_targets, run.weights)
    val_values = run.head.metrics(val_outputs, run.val_targets)
    return val_losses.tolist(), {name: v.tolist() for name, v in val_values.items()}


def _keep_improved(bank: ProbeBank, best: dict[str, torch.Tensor], improved: list[bool], device: torch.device) -> None:
    """Copy the weights of the probes that improved this epoch into `best` (on the device, no host copy)."""
    with torch.no_grad():
        mask = torch.tensor(improved, device=device)
        for name, parameter in bank.named_parameters():
            keep = along_probe_axis(mask, parameter, bank.probe_axis(name))
            best[name].copy_(torch.where(keep, parameter, best[name]))


def train_frozen(
    train: ProbeData,
    val: ProbeData,
    trials: Sequence[Trial],
    settings: TrainSettings,
    on_epoch: EpochCallback | None = None,
    select_by_loss: bool = False,
) -> list[TrialResult]:
    """Train K probes in one pass over resident features; one TrialResult per trial, best weights kept (the
    epoch of the best val main metric; `select_by_loss`: of the lowest val loss, as the online code asks)."""
    trials = _checked_batched_trials(trials, settings)
    run = _bank_pass(train, val, trials, settings)
    head, bank = run.head, run.bank
    stopper = EarlyStopping(trials, settings.effective_patience, "minimize" if select_by_loss else head.direction)
    best = {name: p.detach().clone() for name, p in bank.named_parameters()}
    histories: list[list[dict[str, float]]] = [[] for _ in trials]
    pruned = [False] * len(trials)
    epoch_order = EpochOrder(len(train), settings.order_seed)
    epochs = tqdm(
        range(1, max(t.epochs for t in trials) + 1),
        desc=f"train {len(trials)} probe(s)",
        unit="epoch",
        disable=None,
        leave=False,
    )  # a bar on a terminal only
    for epoch in epochs:
        running = stopper.running(epoch)
        if not any(running):
            break
        active = torch.tensor(running, device=run.device)
        loss_sum = _bank_epoch(run, epoch_order.next_order().to(run.device), active)
        val_loss_values, values = _bank_validation(run)
        train_losses = (loss_sum / run.steps_per_epoch).tolist()  # one host synchronisation per epoch
        improved = stopper.update(epoch, val_loss_values if select_by_loss else values[head.main_metric], running)
        if on_epoch is not None:
            for index, prune in enumerate(on_epoch(epoch, values[head.main_metric], running)):
                if prune and running[index]:
                    stopper.prune(index)
                    pruned[index] = True
        _keep_improved(bank, best, improved, run.device)
        for index, is_running in enumerate(running):
            if is_running:
                histories[index].append(
                    {
                        "epoch": epoch,
                        "train_loss": train_losses[index],
                        "val_loss": val_loss_values[index],
                        **{name: v[index] for name, v in values.items()},
                    }
                )
    load_best_weights(bank, best)
    return [
        result_at_best(trial, stopper, index, histories[index], bank.probe(index).cpu(), pruned[index])
        for index, trial in enumerate(trials)
    ]


# ---------------------------------------------------------------------------------------------- module loop


def parameter_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, without_gradient: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices that receive gradient, none on biases, norms or the rest."""
    decay, plain = [], []
    for name, parameter in named:
        if parameter.requires_grad:
            (decay if decays(name, parameter) and name not in without_gradient else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@dataclass
class ModuleRun:
    """What `train_module` needs to train one model: how to run a batch and which parameters to train."""

    model: nn.Module
    forward: Callable[[nn.Module, Any], torch.Tensor]  # (prepared model, batch) -> outputs [B, out]
    targets: Callable[[Any], torch.Tensor]  # batch -> targets
    train_loader: DataLoader
    val_loader: DataLoader
    groups: list[dict[str, Any]]
    probe: Callable[[nn.Module], Probe]  # (unwrapped model) -> the probe, for saving


@dataclass
class _PreparedModule:
    """A ModuleRun's model, optimiser and loaders as accelerate prepared them, and the schedule stepped with them."""

    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    scheduler: torch.optim.lr_scheduler.LambdaLR


def _prepare_module(run: ModuleRun, trial: Trial, settings: TrainSettings, accelerator) -> _PreparedModule:
    from accelerate import Accelerator

    device = resolve_device(settings.device)
    # The same precision rule as train_frozen; `--device cpu` on a GPU machine stays fp32.
    mixed_precision = "bf16" if compute_dtype(device) == torch.bfloat16 else "no"
    accelerator = accelerator or Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(run.groups, lr=trial.lr, betas=BETAS, eps=EPS)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        run.model, optimizer, run.train_loader, run.val_loader
    )
    total = trial.epochs * len(train_loader)
    # Stepped by hand once per optimiser step (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: schedule_factor(done + 1, total, settings.warmup_fraction)
    )
    return _PreparedModule(accelerator, model, optimizer, train_loader, val_loader, scheduler)


def _module_epoch(
    run: ModuleRun, prepared: _PreparedModule, head: Head, trial: Trial, weights: dict[str, float]
) -> tuple[float, float, dict[str, float]]:
    """One epoch of the standard loop, then val: (mean train loss across processes, val loss, val metrics)."""
    accelerator, model, optimizer = prepared.accelerator, prepared.model, prepared.optimizer
    model.train()
    loss_sum, batches = torch.zeros((), device=accelerator.device), 0
    for batch in prepared.train_loader:
        outputs = run.forward(model, batch)
        loss = head.loss(outputs, run.targets(batch), weights)
        accelerator.backward(loss)
        optimizer.step()
        prepared.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        batches += 1
    val_loss, values = evaluate_module(run, model, prepared.val_loader, head, trial, accelerator)
    train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(batches, 1)
    return train_loss, val_loss, values


def _trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trains changes: no copy of a frozen ViT (a billion parameters) per improvement."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_module(
    run: ModuleRun,
    trial: Trial,
    settings: TrainSettings,
    accelerator=None,
    on_epoch: EpochCallback | None = None,
    checkpoint: TrialCheckpoint | None = None,
) -> TrialResult:
    """The standard loop: one model, `torch.optim.AdamW`, `LambdaLR`, through accelerate.

    With `checkpoint`, every epoch's end is saved (trained weights, optimizer, scheduler, random states, early
    stopping, history, the best epoch's weights) and a run that finds a checkpoint resumes after its epoch:
    the resumed run's weights and metrics are those of an uninterrupted one.
    """
    settings.check()
    trial.check(settings.probe)
    head = settings.head
    prepared = _prepare_module(run, trial, settings, accelerator)
    accelerator, model = prepared.accelerator, prepared.model
    stopper = EarlyStopping([trial], settings.effective_patience, head.direction)
    metric = head.main_metric
    weights = {name: getattr(trial, name) for name in head.loss_weights}
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    pruned = False
    first_epoch = 1
    saved = checkpoint.latest() if checkpoint is not None else None
    if saved is not None:
        history, best_state = _resume(
            saved, accelerator.unwrap_model(model), prepared.optimizer, prepared.scheduler, stopper, run
        )
        first_epoch = saved[1]["epoch"] + 1
    epochs = tqdm(
        range(first_epoch, trial.epochs + 1),
        desc="train",
        unit="epoch",
        leave=False,
        disable=None if accelerator.is_main_process else True,
    )  # a bar on a terminal only
    for epoch in epochs:
        if not stopper.running(epoch)[0]:
            break
        train_loss, val_loss, values = _module_epoch(run, prepared, head, trial, weights)
        if stopper.update(epoch, [values[metric]], [True])[0]:
            best_state = _trainable_snapshot(accelerator.unwrap_model(model))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, **values})
        epochs.set_postfix(loss=f"{train_loss:.3f}", **{metric: f"{values[metric]:.3f}"})
        if checkpoint is not None and accelerator.is_main_process:
            _save(checkpoint, epoch, prepared, stopper, history, best_state, run)
        if on_epoch is not None and on_epoch(epoch, [values[metric]], [True])[0]:
            stopper.prune(0)
            pruned = True
            break
    unwrapped = accelerator.unwrap_model(model)
    _load_best_state(unwrapped, best_state)
    return result_at_best(trial, stopper, 0, history, run.probe(unwrapped).cpu(), pruned)


def _load_best_state(model: nn.Module, best_state: dict[str, torch.Tensor]) -> None:
    """Put the best epoch's trainable weights back (the rest never changed)."""
    missing = set(best_state) - {name for name, _ in model.named_parameters()}
    assert not missing, missing  # the snapshot names trainable parameters of this very model
    model.load_state_dict(best_state, strict=False)


def _random_states(run: ModuleRun) -> dict[str, torch.Tensor]:
    """The generators an epoch draws from: torch's (dropout, loader seeds), CUDA's, the batch order's."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    sampler = getattr(run.train_loader, "sampler", None)
    if isinstance(sampler, EpochOrder):
        states["rng.order"] = sampler.generator.get_state()
    return states


def _save(checkpoint, epoch, prepared: _PreparedModule, stopper, history, best_state, run) -> None:
    """Save the state at an epoch's end: what trains, the best epoch's weights, optimiser, schedule, generators."""
    model = prepared.accelerator.unwrap_model(prepared.model)
    optimizer_state, groups = optimizer_tensors(prepared.optimizer)
    tensors = {f"model.{name}": p for name, p in model.named_parameters() if p.requires_grad}
    tensors |= {f"best.{name}": value for name, value in (best_state or {}).items()}
    tensors |= optimizer_state | _random_states(run)
    checkpoint.save(
        epoch,
        tensors,
        {
            "epoch": epoch,
            "optimizer": groups,
            "scheduler": prepared.scheduler.state_dict(),
            "stopper": stopper.state(),
            "history": history,
        },
    )


def _resume(saved, model, optimizer, scheduler, stopper, run) -> tuple[list[dict[str, float]], dict | None]:
    tensors, state = saved
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.startswith("model."):
                parameters[key.removeprefix("model.")].copy_(tensor)
    load_optimizer(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper.restore(state["stopper"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    sampler = getattr(run.train_loader, "sampler", None)
    if isinstance(sampler, EpochOrder) and "rng.order" in tensors:
        sampler.generator.set_state(tensors["rng.order"])
    best = {key.removeprefix("best."): tensor for key, tensor in tensors.items() if key.startswith("best.")}
    log.info("resuming a trial after its epoch %d", state["epoch"])
    return list(state["history"]), best or None


def module_outputs(
    run: ModuleRun, model: nn.Module, loader: DataLoader, accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [N, out], targets) over a loader, gathered across processes, in loader order."""
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            predicted = run.forward(model, batch).float()
            expected = run.targets(batch)
            predicted, expected = accelerator.gather_for_metrics((predicted, expected))
            outputs.append(predicted)
            targets.append(expected)
    return torch.cat(outputs), torch.cat(targets)


def evaluate_module(
    run: ModuleRun, model: nn.Module, loader: DataLoader, head: Head, trial: Trial, accelerator
) -> tuple[float, dict[str, float]]:
    outputs, targets = module_outputs(run, model, loader, accelerator)
    loss = head.loss(outputs, targets, {name: getattr(trial, name) for name in head.loss_weights})
    return float(loss), {name: float(value) for name, value in head.metrics(outputs, targets).items()}


def frozen_module_run(train: ProbeData, val: ProbeData, trial: Trial, settings: TrainSettings) -> ModuleRun:
    """A single probe on features through the standard loop (DataLoader over a TensorDataset)."""
    probe = new_probe(settings.probe, train.features.shape[1], settings.head.outputs, settings.hidden, trial.seed)
    train_loader = DataLoader(
        TensorDataset(train.example_features().float(), train.targets),
        batch_size=settings.batch_size,
        sampler=EpochOrder(len(train), settings.order_seed),
    )  # train_frozen's batch order
    val_loader = DataLoader(TensorDataset(val.example_features().float(), val.targets), batch_size=EVAL_CHUNK)
    return ModuleRun(
        model=probe,
        forward=lambda model, batch: model(batch[0]),
        targets=lambda batch: batch[1],
        train_loader=train_loader,
        val_loader=val_loader,
        groups=parameter_groups(probe.named_parameters(), settings.weight_decay),
        probe=lambda model: model,
    )


def train_single(
    train: ProbeData, val: ProbeData, trial: Trial, settings: TrainSettings, on_epoch: EpochCallback | None = None
) -> TrialResult:
    """One frozen probe through the standard loop: the plain way, and the batched trainer's reference."""
    return train_module(frozen_module_run(train, val, trial, settings), trial, settings, on_epoch=on_epoch)


def probe_outputs(probe: Probe, data: ProbeData, settings: TrainSettings) -> torch.Tensor:
    """A trained probe's raw outputs on a split, `[N, out]` in fp32 on the CPU, in example order."""
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)
    probe = probe.to(device).eval()
    chunks = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(data.features), EVAL_CHUNK):
            rows = data.features[start : start + EVAL_CHUNK].to(device=device, dtype=dtype)
            chunks.append(probe(rows).float().cpu())
    outputs = torch.cat(chunks) if chunks else torch.empty(0, settings.head.outputs)
    return outputs if data.rows is None else outputs.index_select(0, data.rows)
