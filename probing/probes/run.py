"""`probing train`: one probe configuration (one or several seeds), frozen or unfrozen, written as a run folder.

    RUN/manifest.json              what was trained on what (features / model identity, data fingerprints,
                                   layer, probe, hyper-parameters, settings, code version)
    RUN/metrics.json               per seed: best epoch, val and test metrics, the epoch history;
                                   across seeds: mean and standard deviation (`probing.core.records.MetricsRecord`)
    RUN/predictions/val.jsonl      one line per example and seed: id, category, target, prediction,
    RUN/predictions/test.jsonl     correctness and the example's metadata (for per-category analysis); a task
                                   evaluated on other splits (RefCOCO's testA, testB) has one file for each
    RUN/probes/seed-<s>.safetensors  the best epoch's probe weights

The folder appears whole (written aside, renamed when complete); a run folder made for the same request is
reused, one made for another request is refused naming the differing field.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from probing.core.artifacts import code_version, existing_output_matches, save_safetensors, staged_directory, write_json
from probing.core.locks import claim
from probing.core.records import MetricsRecord, SeedRun, StageResult
from probing.data.types import NO_CATEGORY, Example
from probing.probes.checkpoints import TrialCheckpoint
from probing.probes.settings import Mode, ProbeInputs, TrainRequest  # noqa: F401 (their home was here)
from probing.probes.train import is_main_process
from probing.probes.trainers import FittedTrial, FrozenTrainer, Trainer, TrialHooks, UnfrozenTrainer
from probing.tasks import get_task, is_task_file
from probing.tasks.controls import type_lookup

RUN_FORMAT_VERSION = 1


def make_trainer(request: TrainRequest) -> Trainer:
    """The trainer of a request's mode, prepared (stores checked, or model and data loaded)."""
    control = request.control_targets_seed
    if request.mode == "frozen":
        return FrozenTrainer(
            request.task,
            request.features,
            request.layer,
            request.settings,
            request.data,
            control,
            request.shuffled_features,
            stores=request.stores,
        )
    return UnfrozenTrainer(
        request.task,
        request.source,
        request.data,
        request.layer,
        request.settings,
        features=request.features,
        workers=request.workers,
        control_seed=control,
        text=request.text_settings,
    )


def run_identity(request: TrainRequest, inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that define a run."""
    settings = request.settings.identity()
    top = {name: settings.pop(name) for name in ("probe", "hidden")}
    return {
        "kind": "probe-run",
        "format_version": RUN_FORMAT_VERSION,
        "mode": request.mode,
        "task": get_task(request.task).name,
        "layer": request.layer,
        **top,
        **request.control_identity(),
        "settings": settings,
        "trials": [trial.identity() for trial in request.trials],
        "inputs": inputs,
    }


def category_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.category for e in examples if e.category != NO_CATEGORY).items()))


def run_training(request: TrainRequest) -> StageResult[MetricsRecord]:
    """Train, evaluate on val and the task's evaluated splits, write the run folder."""
    request.check()
    if request.mode == "frozen" and not is_main_process():
        # frozen training is one process's work; the others of a launch stand by
        return StageResult(None, request.out, "elsewhere")
    trainer = make_trainer(request)
    identity = run_identity(request, trainer.inputs)
    # One writer per run folder, claimed by the main process before anything is written: another `probing train`
    # of the same request is waited for and its run reused; one of another request is refused at once.
    lock = claim(request.out, identity, "probe run") if is_main_process() else None
    try:
        if existing_output_matches(request.out, identity, "probe run"):
            return StageResult(MetricsRecord.relabel(request.out, request.label), request.out, "reused")
        checkpoints = request.out.with_name(f".{request.out.name}.checkpoints")  # beside the run: it appears whole
        hooks = None
        if trainer.keeps_models:  # a killed unfrozen run resumes each seed at its last epoch
            hooks = [
                TrialHooks(checkpoint=TrialCheckpoint(checkpoints / f"seed-{trial.seed}")) for trial in request.trials
            ]
        result = write_run(request, trainer, trainer.fit(list(request.trials), hooks), identity)
        if result.status == "built":  # the process that wrote the run (the others of a launch leave them be)
            shutil.rmtree(checkpoints, ignore_errors=True)
        return result
    finally:
        if lock is not None:
            lock.release()


def _type_lookups(spec: Any, trainer: Trainer) -> dict[str, list[bool]]:
    """Binary controls: per evaluated split and example, whether the train-type lookup (the control's ceiling,
    `probing.tasks.controls.type_lookup`) answers its control label."""
    if spec.head.kind != "binary" or spec.control_type is None:
        return {}
    train_types = [spec.control_type(example) for example in trainer.examples("train")]
    train_labels = trainer.targets("train").tolist()
    lookups = {}
    for split in spec.evaluated_splits:
        answers = type_lookup(train_types, train_labels, [spec.control_type(e) for e in trainer.examples(split)])
        lookups[split] = [
            answer == int(label) for answer, label in zip(answers, trainer.targets(split).tolist(), strict=True)
        ]
    return lookups


def write_run(
    request: TrainRequest,
    trainer: Trainer,
    fitted: list[FittedTrial],
    identity: dict[str, Any] | None = None,
    out: Path | None = None,
) -> StageResult[MetricsRecord]:
    """Evaluate fitted trials on every evaluated split and write the run folder (`out`, default the request's).

    Under `accelerate launch` every process trained (DDP); the first alone evaluates and writes.
    """
    out = Path(out or request.out)
    if not is_main_process():
        return StageResult(None, out, "elsewhere")
    spec = trainer.spec
    identity = identity or run_identity(request, trainer.inputs)
    predictions: dict[str, list[dict[str, Any]]] = {split: [] for split in spec.evaluated_splits}
    lookups = _type_lookups(spec, trainer) if request.control else {}
    runs = [_evaluate_fit(trainer, fit, lookups, predictions) for fit in fitted]
    # Per-category training counts travel with the run: the analysis (Kendall against the number of training
    # examples of each category) then needs nothing but run folders.
    record = MetricsRecord(
        task=spec.name,
        metric=spec.head.main_metric,
        runs=runs,
        train_categories=category_counts(trainer.examples("train")),
        label=request.label,
    )
    extra = trainer.sources()
    if is_task_file(request.task):  # a task defined by a file: the report finds its definition here
        extra["task_file"] = str(Path(spec.source).resolve())
    manifest = {**identity, "code_version": code_version(), **extra}
    _write_run_folder(out, request, fitted, predictions, record, manifest)
    return StageResult(record, out, "built")


def _evaluate_fit(
    trainer: Trainer,
    fit: FittedTrial,
    lookups: dict[str, list[bool]],
    predictions: dict[str, list[dict[str, Any]]],
) -> SeedRun:
    """One seed's metrics on every evaluated split; its prediction records are appended to `predictions`."""
    spec, head = trainer.spec, trainer.spec.head
    splits = {"val": fit.result.val_metrics}
    weights = {name: getattr(fit.trial, name) for name in head.loss_weights}
    for split in spec.evaluated_splits:
        outputs, targets = trainer.outputs(fit, split), trainer.targets(split)
        records = head.records(split, fit.trial.seed, trainer.examples(split), outputs, targets)
        for record, right in zip(records, lookups.get(split, ()), strict=False):
            record["lookup_correct"] = right
        predictions[split] += records
        if split != "val":
            splits[split] = {
                "loss": float(head.loss(outputs, targets, weights)),
                **{name: float(v) for name, v in head.metrics(outputs, targets).items()},
            }
    return SeedRun(
        seed=fit.trial.seed,
        trial=fit.trial.identity(),
        best_epoch=fit.result.best_epoch,
        epochs_run=fit.result.epochs_run,
        stopped_early=fit.result.stopped_early,
        splits=splits,
        history=fit.result.history,
    )


def _write_run_folder(
    out: Path,
    request: TrainRequest,
    fitted: list[FittedTrial],
    predictions: dict[str, list[dict[str, Any]]],
    record: MetricsRecord,
    manifest: dict[str, Any],
) -> None:
    """Write predictions, probe weights, metrics and manifest aside and rename the folder into place whole."""
    with staged_directory(out) as staging:
        (staging / "predictions").mkdir()
        for split, records in predictions.items():
            with open(staging / "predictions" / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for line in records:
                    handle.write(json.dumps(line) + "\n")
        (staging / "probes").mkdir()
        for fit in fitted:
            probe = fit.result.probe
            save_safetensors(
                staging / "probes" / f"seed-{fit.trial.seed}.safetensors",
                {k: v.detach().cpu() for k, v in probe.state_dict().items()},
                metadata={
                    "architecture": getattr(probe, "architecture", request.settings.probe),
                    **{
                        name: str(getattr(probe, name))
                        for name in ("inputs", "outputs", "hidden")
                        if hasattr(probe, name)
                    },
                },
            )
        write_json(staging / "metrics.json", record.to_json())
        write_json(staging / "manifest.json", manifest)
