"""Minimum description length by the online code (Voita & Titov, 2020): `probing mdl`.

How many bits does it take to transmit a task's train targets to a receiver who has the features and learns a
probe as the data arrives? A representation that makes the targets easy to learn transmits them in few bits;
memorising noise costs many. Beside accuracy, which a large enough probe can push up on anything, this
measures how much effort the probe needs.

- Order and blocks: the train examples in a seeded random order (`shuffle_seed`), cut into blocks that end at
  0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25, 50 and 100 % of them (`PORTIONS`, Voita & Titov's), each end
  rounded down and at least 1 (ends that coincide on a small split are merged: `block_ends`).
- The first block is sent with the uniform code: `Head.uniform_bits` per example (1 bit for a binary label,
  4 x log2(100) bits for a box: each coordinate one of 100 bins).
- Every next block is sent with the probe trained on all blocks before it, at -log2 p(target | features) bits
  per example under the head's likelihood (`Head.code_bits`):
  - binary: Bernoulli(sigmoid(logit)), i.e. the probe's binary cross-entropy in bits;
  - box: each `cxcywh` coordinate of the target, in one of 100 bins of [0, 1] (1 % of the image side, the
    outer bins open-ended so the code sums to one), under a Laplace centred on the probe's coordinate. Why
    Laplace: the box probe is trained with L1 + GIoU; L1 is the negative log-likelihood of a Laplace (GIoU is
    no likelihood), so the Laplace is the distribution the probe was fitted to. Its scale per coordinate is
    the maximum-likelihood one (the mean absolute error) on the val split at the kept epoch: val is shared
    by sender and receiver, as the early stopping that reads it already is, so the code stays decodable.
    Discretised because a density has no codelength: 100 bins are finer than Acc@IoU>=0.5 needs and about
    the precision of COCO's annotated boxes.
- codelength = the first block's uniform bits + the bits of every next block (the probe of the last prefix,
  50 %, codes the last block; no probe is trained on all of train, which would code nothing); the uniform
  codelength sends every train example uniformly; compression = uniform / online (1: the probe learnt
  nothing; the higher, the more the representation makes the targets learnable).
- Each prefix's probe is trained as a frozen trial (`probing.probes.train.train_frozen`): the given probe,
  hyper-parameters (a search's best trial in a config), schedule, batch size and early stopping; the epoch
  kept is the one of the lowest val loss (Voita & Titov: the model with the best held-out loss, the quantity
  the code pays for; for binary heads the loss is the code's cross-entropy itself), not the best accuracy.
  A control task's codelength (`--control`) and the noise floor's (`--shuffled-features`: the same code with
  the feature rows permuted, what the targets' prior alone compresses) are measured the same way.
- Units: bits; reports show kbits (1 kbit = 1,000 bits) beside the uniform codelength.
- All prefixes train together (`train_prefixes`) as one `ProbeBank` with `BatchedAdamW` on resident
  features: each probe reads batches of its own prefix in its own order (`ProbeBank.forward_each`), with its
  own schedule, early stopping and best epoch, and only the probes still training do any work in a step. It
  gives what training each prefix alone gives (`online_code(..., batched=False)`, the tests' reference and
  the benchmark's plain way), in one pass.

The folder: `mdl.json` (`probing.core.records.MdlRecord`: block ends, bits per block and per example, codelengths,
compression, each prefix probe's best epoch and val metric) and `manifest.json` (task, layer, probe, trial,
settings, shuffle seed, portions, the code, control, the stores' identity). Reused when the manifest matches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from probing.core.artifacts import (
    code_version,
    existing_output_matches,
    first_difference,
    read_manifest,
    staged_directory,
    write_json,
)
from probing.core.device_copies import to_device_chunked
from probing.core.devices import resolve_device
from probing.core.errors import ProbingError
from probing.core.records import MdlRecord, StageResult
from probing.probes.modules import ProbeBank, new_probe, probe_kind
from probing.probes.train import (
    EVAL_CHUNK,
    BatchedAdamW,
    EarlyStopping,
    EpochOrder,
    ProbeData,
    TrainSettings,
    Trial,
    TrialResult,
    compute_dtype,
    load_best_weights,
    probe_outputs,
    result_at_best,
    schedule_table,
    train_frozen,
)
from probing.probes.trainers import FrozenTrainer
from probing.studies.settings import MdlRequest  # noqa: F401 (its home was here)
from probing.tasks import get_task
from probing.tasks.heads import Head

MDL_FORMAT_VERSION = 1
SELECTION = "val_loss"  # how each prefix probe's epoch is chosen (recorded in the identity and the record)
PORTIONS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)  # % of train (Voita & Titov, 2020)


def block_ends(examples: int) -> list[int]:
    """Where the blocks end: each portion of `examples`, rounded down, at least 1, coinciding ends merged."""
    if examples < 2:
        raise ProbingError(f"mdl: the online code needs at least 2 train examples, got {examples}")
    return sorted({max(1, math.floor(examples * Fraction(str(portion)) / 100)) for portion in PORTIONS})


def transmission_order(examples: int, seed: int) -> torch.Tensor:
    """The order in which train examples are sent: a permutation drawn from `seed`."""
    return torch.randperm(examples, generator=torch.Generator().manual_seed(seed))


def reordered(data: ProbeData, order: torch.Tensor) -> ProbeData:
    """`data`'s examples in `order`, reading the same feature rows (nothing copied but the targets)."""
    rows = order if data.rows is None else data.rows.index_select(0, order)
    picked = order.tolist()
    return ProbeData(
        task=data.task,
        split=data.split,
        features=data.features,
        targets=data.targets.index_select(0, order),
        ids=[data.ids[i] for i in picked],
        examples=[data.examples[i] for i in picked] if data.examples else [],
        rows=rows,
    )


def materialised(data: ProbeData, start: int, end: int) -> ProbeData:
    """Examples `start:end` of `data` with their own feature rows (a copy of just those rows)."""
    return ProbeData(
        task=data.task,
        split=data.split,
        features=data.example_features()[start:end]
        if data.rows is None
        else data.features.index_select(0, data.rows[start:end]),
        targets=data.targets[start:end],
        ids=data.ids[start:end],
        examples=data.examples[start:end],
    )


def codelength(uniform_bits: float, ends: Sequence[int], block_bits: Sequence[float]) -> tuple[float, float]:
    """(online, uniform) codelengths in bits: the first block (`ends[0]` examples) at `uniform_bits` each plus
    `block_bits[i]`, the bits of block i + 2 under the probe of prefix i + 1; every example uniformly."""
    if len(block_bits) != len(ends) - 1:
        raise ValueError(f"{len(ends)} blocks need {len(ends) - 1} coded blocks, got {len(block_bits)}")
    return ends[0] * uniform_bits + float(sum(block_bits)), ends[-1] * uniform_bits


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _PrefixPass:
    """One batched pass of `train_prefixes`: the bank of K prefix probes, what each step reads (resident
    features, targets, the schedule table), and each probe's own progress (epoch, position in it, batch order,
    summed train loss, whether it still trains, early stopping, best weights, history)."""

    bank: ProbeBank
    optimizer: BatchedAdamW
    head: Head
    weights: dict[str, torch.Tensor]
    autocast: dict[str, Any]
    features: torch.Tensor
    row_of: torch.Tensor  # the feature row of each train example
    targets: torch.Tensor
    val_features: torch.Tensor
    val_targets: torch.Tensor
    batch: int
    steps_per_epoch: list[int]
    lr_table: torch.Tensor
    on_device: _DeviceIndices
    orders: list[EpochOrder]
    stoppers: list[EarlyStopping]
    best: dict[str, torch.Tensor]
    histories: list[list[dict[str, float]]]
    device: torch.device
    step: int = 0
    epoch: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    order: list[torch.Tensor | None] = field(default_factory=list)
    loss_sums: list[torch.Tensor | None] = field(default_factory=list)
    training: list[bool] = field(default_factory=list)


def _checked_prefix_trial(train: ProbeData, ends: Sequence[int], trial: Trial, settings: TrainSettings) -> Trial:
    settings.check()
    trial = trial.check(settings.probe)
    if not probe_kind(settings.probe).batched:
        raise ProbingError(f"mdl: --probe {settings.probe} is not a batched probe (linear, swiglu2, swiglu4 ...)")
    if not ends or any(end < 1 or end > len(train) for end in ends):
        raise ValueError(f"prefix ends must lie in 1..{len(train)}, got {list(ends)}")
    return trial


def _prefix_pass(
    train: ProbeData, val: ProbeData, ends: Sequence[int], trial: Trial, settings: TrainSettings
) -> _PrefixPass:
    """Features moved to the device once, K copies of the trial's initial probe, each prefix's schedule."""
    head = settings.head
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)
    features = to_device_chunked(train.features, device, dtype)
    val_features = to_device_chunked(val.features, device, dtype)
    row_of = (train.rows if train.rows is not None else torch.arange(len(train))).to(device)
    targets, val_targets = train.targets.to(device), val.targets.to(device)
    count, batch = len(ends), settings.batch_size
    probe = new_probe(settings.probe, features.shape[1], head.outputs, settings.hidden, trial.seed)
    bank = ProbeBank([probe] * count).to(device)  # K copies of the same initial probe (stacked, not shared)
    steps_per_epoch = [math.ceil(end / batch) for end in ends]
    return _PrefixPass(
        bank=bank,
        optimizer=BatchedAdamW(bank, settings.weight_decay),
        head=head,
        weights=head.weights([trial], device),
        autocast={"device_type": device.type, "dtype": dtype, "enabled": dtype != torch.float32},
        features=features,
        row_of=row_of,
        targets=targets,
        val_features=val_features,
        val_targets=val_targets,
        batch=batch,
        steps_per_epoch=steps_per_epoch,
        lr_table=schedule_table(
            [trial.lr] * count,
            [trial.epochs * steps for steps in steps_per_epoch],
            settings.warmup_fraction,
            device,
        ),
        on_device=_DeviceIndices(count, device),
        orders=[EpochOrder(end, settings.order_seed) for end in ends],
        stoppers=[EarlyStopping([trial], settings.effective_patience, "minimize") for _ in ends],  # by val loss
        best={name: p.detach().clone() for name, p in bank.named_parameters()},
        histories=[[] for _ in ends],
        device=device,
        epoch=[0] * count,
        position=[0] * count,
        order=[None] * count,
        loss_sums=[None] * count,
        training=[True] * count,
    )


def _start_epochs(run: _PrefixPass) -> list[int]:
    """Probes at the start of an epoch go on (a fresh batch order) or stop (epochs done, or patience); the
    probes that train this step."""
    for k in range(len(run.training)):
        if run.training[k] and run.position[k] == 0:
            run.epoch[k] += 1
            if not run.stoppers[k].running(run.epoch[k])[0]:
                run.training[k] = False
                continue
            run.order[k] = run.orders[k].next_order().to(run.device)
            run.loss_sums[k] = torch.zeros((), device=run.device)
    return [k for k in range(len(run.training)) if run.training[k]]


def _prefix_step(run: _PrefixPass, active: list[int]) -> None:
    """One step of every active probe on a batch of its own prefix; probes whose batches have the same size
    (all full ones, usually) run as one batched matmul."""
    batch = run.batch
    rows = {k: run.order[k][run.position[k] * batch : (run.position[k] + 1) * batch] for k in active}
    groups: dict[int, list[int]] = defaultdict(list)
    for k in active:
        groups[len(rows[k])].append(k)
    for size, members in groups.items():
        local = torch.stack([rows[k] for k in members])  # [K', size], positions within the prefixes
        inputs = run.features.index_select(0, run.row_of[local.flatten()]).view(len(members), size, -1)
        with torch.autocast(**run.autocast):
            predictions = run.bank.forward_each(inputs, run.on_device.indices(members))
        losses = run.head.loss(predictions, run.targets[local], run.weights)
        losses.sum().backward()  # probes share no parameter: each gradient is its own probe's
        for k, loss in zip(members, losses.detach(), strict=True):
            run.loss_sums[k] += loss
    # Every probe steps at every global step from the first until it stops, so its own step is the global
    # one and its learning rate a row of one table on the device (no per-step host copy).
    run.optimizer.step(run.lr_table[run.step], run.on_device(active))
    run.bank.zero_grad(set_to_none=True)
    run.step += 1


def _end_epochs(run: _PrefixPass, active: list[int], val: ProbeData) -> None:
    """Advance each active probe by a batch; those at their epoch's end are validated and their epoch recorded."""
    ending = []
    for k in active:
        run.position[k] += 1
        if run.position[k] == run.steps_per_epoch[k]:
            run.position[k] = 0
            ending.append(k)
    if ending:
        records = _validate(
            run.bank,
            ending,
            run.val_features,
            val,
            run.val_targets,
            run.head,
            run.weights,
            run.autocast,
            run.stoppers,
            run.epoch,
            run.best,
        )
        for k, record in zip(ending, records, strict=True):
            train_loss = (run.loss_sums[k] / run.steps_per_epoch[k]).item()
            run.histories[k].append({"epoch": run.epoch[k], "train_loss": train_loss, **record})


def train_prefixes(
    train: ProbeData, val: ProbeData, ends: Sequence[int], trial: Trial, settings: TrainSettings
) -> list[TrialResult]:
    """One probe per prefix `train[:end]` of `ends`, all in one pass; each trained as `train_frozen` trains it
    alone with `select_by_loss` (same initialisation from the trial's seed, batch order `EpochOrder(end,
    order_seed)`, schedule over its own steps, early stopping, best epoch by the lowest val loss)."""
    trial = _checked_prefix_trial(train, ends, trial, settings)
    run = _prefix_pass(train, val, ends, trial, settings)
    while True:
        active = _start_epochs(run)
        if not active:
            break
        _prefix_step(run, active)
        _end_epochs(run, active, val)
    load_best_weights(run.bank, run.best)
    return [
        result_at_best(trial, stopper, 0, run.histories[k], run.bank.probe(k).cpu())
        for k, stopper in enumerate(run.stoppers)
    ]


class _DeviceIndices:
    """Device copies of probe index lists and of on/off masks, made once per distinct list (the set of active
    probes changes only when one stops), so the training loop copies nothing to the device per step."""

    def __init__(self, count: int, device: torch.device):
        self.count, self.device = count, device
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def indices(self, members: Sequence[int]) -> torch.Tensor:
        key = tuple(members)
        if key not in self._indices:
            self._indices[key] = torch.tensor(key, device=self.device)
        return self._indices[key]

    def __call__(self, active: Sequence[int]) -> torch.Tensor:
        key = tuple(active)
        if key not in self._masks:
            self._masks[key] = torch.tensor([k in key for k in range(self.count)], device=self.device)
        return self._masks[key]


def _validate(
    bank, ending, val_features, val, val_targets, head, weights, autocast, stoppers, epoch, best
) -> list[dict[str, float]]:
    """Val after an epoch of the probes `ending`: early stopping and best weights updated; their val records."""
    which = torch.tensor(ending, device=val_features.device)
    chunks = []
    with torch.no_grad(), torch.autocast(**autocast):
        for start in range(0, len(val_features), EVAL_CHUNK):
            chunks.append(bank(val_features[start : start + EVAL_CHUNK], which).float())
    outputs = torch.cat(chunks, dim=1)
    if val.rows is not None:
        outputs = outputs.index_select(1, val.rows.to(outputs.device))
    losses = head.loss(outputs, val_targets, weights).tolist()
    values = {name: value.tolist() for name, value in head.metrics(outputs, val_targets).items()}
    records = []
    for j, k in enumerate(ending):
        improved = stoppers[k].update(epoch[k], [losses[j]], [True])[0]
        records.append({"val_loss": losses[j], **{name: v[j] for name, v in values.items()}})
        if improved:
            with torch.no_grad():
                index = torch.tensor([k], device=val_features.device)
                for name, parameter in bank.named_parameters():
                    axis = bank.probe_axis(name)
                    best[name].index_copy_(axis, index, parameter.index_select(axis, index))
    return records


# ---------------------------------------------------------------------------------------------- the code


@dataclass
class OnlineCode:
    """The online code of one split's targets."""

    ends: list[int]
    uniform_bits_per_example: float
    example_bits: list[torch.Tensor]  # block i + 2's bits per example, under the probe of prefix i + 1
    fits: list[TrialResult]  # the probe of each prefix (ends[:-1])

    @property
    def online_bits(self) -> float:
        return codelength(self.uniform_bits_per_example, self.ends, [float(b.sum()) for b in self.example_bits])[0]

    @property
    def uniform_bits(self) -> float:
        return self.ends[-1] * self.uniform_bits_per_example

    @property
    def compression(self) -> float:
        return self.uniform_bits / self.online_bits


def online_code(
    train: ProbeData,
    val: ProbeData,
    trial: Trial,
    settings: TrainSettings,
    shuffle_seed: int = 0,
    batched: bool = True,
) -> OnlineCode:
    """The online code of `train`'s targets: prefix probes trained in one pass (`batched`) or each on its own
    (`train_frozen` on a copy of the prefix's rows: the plain way), then each next block coded."""
    head = settings.head
    if head.uniform_bits is None:
        raise ProbingError(f"mdl: the {head.kind} head has no code for its targets")
    ordered = reordered(train, transmission_order(len(train), shuffle_seed))
    ends = block_ends(len(ordered))
    prefixes = ends[:-1]
    if batched:
        fits = train_prefixes(ordered, val, prefixes, trial, settings)
    else:
        fits = [
            train_frozen(materialised(ordered, 0, end), val, [trial], settings, select_by_loss=True)[0]
            for end in prefixes
        ]
    bits = []
    for index, fit in enumerate(fits):
        block = materialised(ordered, ends[index], ends[index + 1])
        outputs = probe_outputs(fit.probe, block, settings)
        bits.append(head.code_bits(outputs, block.targets, probe_outputs(fit.probe, val, settings), val.targets).cpu())
    return OnlineCode(ends=ends, uniform_bits_per_example=head.uniform_bits, example_bits=bits, fits=fits)


# ---------------------------------------------------------------------------------------------- the stage


def check_from_search(search: Path, request: MdlRequest) -> None:
    """`--from-search`: the search's best trial codes these targets only if it was searched on the same
    features (the same model's stores) and the same targets: a search of another model, of a control (for a
    code of the task, or of another control seed) or of a floor is refused naming the option. A control's code
    from its task's search is what controls are by default (the task's hyper-parameters)."""
    manifest = read_manifest(search) or {}
    inputs = FrozenTrainer(request.task, request.features, request.layer, request.settings, request.data).inputs
    different = first_difference(manifest.get("inputs", {}), inputs)
    if different is not None:
        raise ProbingError(
            f"--from-search: {search} searched other features than --features {request.features} "
            f"(field '{different}' differs: another model or store)"
        )
    if manifest.get("shuffled_features", False) and not request.shuffled_features:
        raise ProbingError(f"--from-search: {search} is a search on shuffled features (a floor), not on the features")
    if manifest.get("control", False):
        seed = manifest.get("control_seed", 0)
        if not request.control or request.control_seed != seed:
            raise ProbingError(
                f"--from-search: {search} is a search on the control targets of control seed {seed}; "
                + ("give --control" if not request.control else f"not of --control-seed {request.control_seed}")
                + " (or the task's search: controls train with the task's hyper-parameters)"
            )


def mdl_identity(request: MdlRequest, inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that define an online code."""
    spec = get_task(request.task)
    settings = request.settings.identity()
    top = {name: settings.pop(name) for name in ("probe", "hidden")}
    return {
        "kind": "mdl",
        "format_version": MDL_FORMAT_VERSION,
        "task": spec.name,
        "layer": request.layer,
        **top,
        **request.control_identity(),
        "portions": list(PORTIONS),
        "code": spec.head.code,
        "shuffle_seed": request.shuffle_seed,
        "selection": SELECTION,
        "trial": request.trial.identity(),
        "settings": settings,
        "inputs": inputs,
    }


def run_mdl(request: MdlRequest) -> StageResult[MdlRecord]:
    """The online code of the task's (or its control's) train targets on one layer; writes `request.out`."""
    request.check()
    trainer = FrozenTrainer(
        request.task,
        request.features,
        request.layer,
        request.settings,
        request.data,
        request.control_targets_seed,
        request.shuffled_features,
    )
    identity = mdl_identity(request, trainer.inputs)
    if existing_output_matches(request.out, identity, "mdl"):
        return StageResult(MdlRecord.read(request.out), request.out, "reused")
    code = online_code(
        trainer.splits["train"], trainer.splits["val"], request.trial, request.settings, request.shuffle_seed
    )
    blocks = []
    for index, (fit, bits) in enumerate(zip(code.fits, code.example_bits, strict=True)):
        blocks.append(
            {
                "trained_on": code.ends[index],
                "start": code.ends[index],
                "end": code.ends[index + 1],
                "bits": float(bits.sum()),
                "best_epoch": fit.best_epoch,
                "epochs_run": fit.epochs_run,
                "val": fit.val_metrics,
            }
        )
    record = MdlRecord(
        task=trainer.spec.name,
        metric=SELECTION,
        control=request.control,
        layer=request.layer,
        probe=request.settings.probe,
        examples=code.ends[-1],
        ends=code.ends,
        uniform_bits_per_example=code.uniform_bits_per_example,
        online_bits=code.online_bits,
        uniform_bits=code.uniform_bits,
        blocks=blocks,
        example_bits=[bits.tolist() for bits in code.example_bits],
        label=request.label,
    )
    with staged_directory(request.out) as staging:
        write_json(staging / "mdl.json", record.to_json())
        write_json(staging / "manifest.json", {**identity, "code_version": code_version(), **trainer.sources()})
    return StageResult(record, request.out, "built")
