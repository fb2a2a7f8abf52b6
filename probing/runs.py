"""`probing train`: one probe configuration (one or several seeds), frozen or unfrozen, written as a run folder.

    RUN/manifest.json              what was trained on what (features / model identity, data fingerprints,
                                   layer, probe, hyper-parameters, settings, code version)
    RUN/metrics.json               per seed: best epoch, val and test metrics, the epoch history;
                                   across seeds: mean and standard deviation
    RUN/predictions/val.jsonl      one line per example and seed: id, category, target, prediction,
    RUN/predictions/test.jsonl     correctness and the example's metadata (for per-category analysis)
    RUN/probes/seed-<s>.safetensors  the best epoch's probe weights

The folder appears whole (written aside, renamed when complete); a run folder made for the same request is
reused, one made for another request is refused naming the differing field.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from probing.artifacts import code_version, existing_output_matches, staged_directory, write_json
from probing.data import DataOptions, Example
from probing.errors import ProbingError
from probing.losses import predicted_boxes, task_loss
from probing.metrics import IOU_THRESHOLD, binary_correct, box_ious, main_metric, task_metrics
from probing.probe_data import feature_identity, load_probe_splits, open_stores
from probing.train import (
    ProbeData,
    TrainSettings,
    Trial,
    TrialResult,
    is_main_process,
    probe_outputs,
    train_frozen,
)

RUN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainRequest:
    task: str
    mode: str  # frozen | unfrozen
    layer: int
    out: Path
    trials: tuple[Trial, ...]
    settings: TrainSettings
    features: Path | None = None  # frozen: the stores; unfrozen: optional vision stores
    data: DataOptions | None = None  # frozen: optional (else the stores' recorded paths); unfrozen: required
    model: str | None = None  # unfrozen
    init: str = "pretrained"
    revision: str | None = None
    model_seed: int = 0  # the seed of --init random (the same random model for every probe seed)
    workers: int = 0
    label: str | None = None  # how reports name the model (default: from its family and init)

    def check(self) -> TrainRequest:
        if self.mode not in ("frozen", "unfrozen"):
            raise ProbingError(f"--mode: unknown mode '{self.mode}' (choose frozen or unfrozen)")
        if self.mode == "frozen" and self.features is None:
            raise ProbingError("--features is required for --mode frozen")
        if self.mode == "unfrozen" and (self.model is None or self.data is None):
            raise ProbingError("--mode unfrozen needs --model and the task's data options")
        if self.data is not None and self.data.task != self.task:
            raise ProbingError(f"--task {self.task}: the data options are for '{self.data.task}'")
        seeds = [t.seed for t in self.trials]
        if len(set(seeds)) != len(seeds):
            raise ProbingError("--seeds: each seed once")
        self.settings.check()
        for trial in self.trials:
            trial.check()
        return self


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation across seeds of every val and test metric."""
    summary: dict[str, Any] = {}
    for split in ("val", "test"):
        names = runs[0][split].keys()
        summary[split] = {name: {"mean": statistics.fmean(r[split][name] for r in runs),
                                 "std": _std([r[split][name] for r in runs]), "seeds": len(runs)} for name in names}
    return summary


def prediction_records(task: str, split: str, seed: int, examples: list[Example], outputs: torch.Tensor,
                       targets: torch.Tensor) -> list[dict[str, Any]]:
    """One JSON-ready record per example: id, category, target, prediction, correctness, metadata."""
    records = []
    if task == "refcocog":
        boxes = predicted_boxes(outputs.float())
        ious = box_ious(outputs, targets)
        for example, box, target, iou in zip(examples, boxes.tolist(), targets.tolist(), ious.tolist(), strict=True):
            records.append({"id": example.example_id, "split": split, "seed": seed, "category": example.category,
                            "target_xyxy": target, "predicted_xyxy": box, "iou": iou,
                            "correct": iou >= IOU_THRESHOLD, **dict(example.metadata)})
    else:
        probabilities = outputs.float().squeeze(-1).sigmoid().tolist()
        correct = binary_correct(outputs, targets).tolist()  # the metric's own rule (logit > 0), not a re-derivation
        for example, probability, label, right in zip(examples, probabilities, targets.tolist(), correct, strict=True):
            predicted = int(label) if right else 1 - int(label)
            records.append({"id": example.example_id, "split": split, "seed": seed, "category": example.category,
                            "label": int(label), "probability": probability, "predicted": predicted,
                            "correct": bool(right), **dict(example.metadata)})
    return records


def _test_metrics(task: str, outputs: torch.Tensor, targets: torch.Tensor, trial: Trial) -> dict[str, float]:
    """Test loss (with the trial's loss scales) and metrics, keyed as the val metrics are."""
    loss = task_loss(task, outputs, targets, trial.giou_scale, trial.l1_scale)
    return {"loss": float(loss), **{name: float(v) for name, v in task_metrics(task, outputs, targets).items()}}


def _run_record(result: TrialResult, test_metrics: dict[str, float]) -> dict[str, Any]:
    return {"seed": result.trial.seed, "trial": asdict(result.trial), "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
            "val": result.val_metrics, "test": test_metrics, "history": result.history}


def _identity(request: TrainRequest, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "probe-run", "format_version": RUN_FORMAT_VERSION, "mode": request.mode, "task": request.task,
            "layer": request.layer, "probe": request.settings.probe, "hidden": request.settings.hidden,
            "settings": {k: v for k, v in asdict(request.settings).items() if k not in ("device", "eval_batch_size",
                                                                                       "task", "probe", "hidden")},
            "trials": [asdict(t) for t in request.trials], "inputs": inputs}


def category_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(example.category for example in examples).items()))


def _write_run(request: TrainRequest, identity: dict[str, Any], runs: list[dict[str, Any]],
               predictions: dict[str, list[dict[str, Any]]], probes: dict[int, Any], extra: dict[str, Any],
               train_examples: list[Example]) -> dict[str, Any]:
    # Per-category training counts travel with the run: the analysis (Kendall against the number of training
    # examples of each category) then needs nothing but run folders.
    metrics = {"task": request.task, "metric": main_metric(request.task), "runs": runs, "summary": summarise(runs),
               "train_categories": category_counts(train_examples), "label": request.label}
    with staged_directory(request.out) as staging:
        (staging / "predictions").mkdir()
        for split, records in predictions.items():
            with open(staging / "predictions" / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        (staging / "probes").mkdir()
        for seed, probe in probes.items():
            save_file({k: v.contiguous() for k, v in probe.state_dict().items()},
                      str(staging / "probes" / f"seed-{seed}.safetensors"),
                      metadata={"architecture": probe.architecture, "inputs": str(probe.inputs),
                                "outputs": str(probe.outputs), "hidden": str(probe.hidden)})
        write_json(staging / "metrics.json", metrics)
        write_json(staging / "manifest.json", {**identity, "code_version": code_version(), **extra})
    return metrics


def run_training(request: TrainRequest, setup=None, trained: dict[Trial, tuple[TrialResult, Any]] | None = None,
                 splits: dict[str, ProbeData] | None = None) -> dict[str, Any]:
    """Train, evaluate on val and test, write the run folder; return metrics.json's content.

    What a caller (a search) has already loaded or trained can be passed in: frozen `splits` (the layer's
    features with targets); unfrozen `setup` (an `UnfrozenSetup` for this request) and `trained` (trials
    already trained, with their models).
    """
    request.check()
    if request.mode == "frozen":
        if not is_main_process():  # frozen training is one process's work; the others of a launch stand by
            return {"reused": False, "main_process": False}
        return _run_frozen(request, splits)
    return _run_unfrozen(request, setup, trained or {})


def _reused(request: TrainRequest, identity: dict[str, Any]) -> dict[str, Any] | None:
    if existing_output_matches(request.out, identity, "probe run"):
        return json.loads((request.out / "metrics.json").read_text()) | {"reused": True}
    return None


def _run_frozen(request: TrainRequest, splits: dict[str, ProbeData] | None) -> dict[str, Any]:
    stores = open_stores(request.features, request.task, request.layer)
    identity = _identity(request, {"features": {split: feature_identity(store) for split, store in stores.items()}})
    reused = _reused(request, identity)
    if reused is not None:
        return reused
    splits = splits or load_probe_splits(stores, request.task, request.layer, request.data)
    results = train_frozen(splits["train"], splits["val"], request.trials, request.settings)
    runs, predictions, probes = [], {"val": [], "test": []}, {}
    for result in results:
        test_metrics = {}
        for split in ("val", "test"):
            data: ProbeData = splits[split]
            outputs = probe_outputs(result.probe, data, request.settings)
            predictions[split] += prediction_records(request.task, split, result.trial.seed, data.examples, outputs,
                                                     data.targets)
            if split == "test":
                test_metrics = _test_metrics(request.task, outputs, data.targets, result.trial)
        runs.append(_run_record(result, test_metrics))
        probes[result.trial.seed] = result.probe
    extra = {"feature_paths": {split: str(store.path.resolve()) for split, store in stores.items()}}
    return _write_run(request, identity, runs, predictions, probes, extra, splits["train"].examples) | {
        "reused": False}


def _run_unfrozen(request: TrainRequest, setup, trained: dict[Trial, tuple[TrialResult, Any]]) -> dict[str, Any]:
    from probing.unfrozen import UnfrozenSetup

    setup = setup or UnfrozenSetup(request.task, request.model, request.data, request.settings, init=request.init,
                                   revision=request.revision, model_seed=request.model_seed,
                                   features=request.features, workers=request.workers)
    identity = _identity(request, {"model": setup.model_identity, "datasets": setup.fingerprints})
    reused = _reused(request, identity)
    if reused is not None:
        return reused
    runs, predictions, probes = [], {"val": [], "test": []}, {}
    main = is_main_process()  # under `accelerate launch` every process trains (DDP); the first one writes
    for trial in request.trials:
        result, model = trained[trial] if trial in trained else setup.fit(trial, request.layer)
        if not main:
            continue
        test_metrics = {}
        for split in ("val", "test"):
            outputs = setup.outputs(model, split)
            predictions[split] += prediction_records(request.task, split, trial.seed, setup.examples[split], outputs,
                                                     setup.targets[split])
            if split == "test":
                test_metrics = _test_metrics(request.task, outputs, setup.targets[split], trial)
        runs.append(_run_record(result, test_metrics))
        probes[trial.seed] = result.probe
    if not main:
        return {"reused": False, "main_process": False}
    extra = {"model_source": setup.model_source, "vision_store": request.features is not None,
             "data_options": {k: str(v) for k, v in vars(request.data).items() if v is not None}}
    return _write_run(request, identity, runs, predictions, probes, extra, setup.examples["train"]) | {
        "reused": False}
