"""`probing zeroshot`: the paper's zero-shot baselines on a binary task, written as a run folder.

The model answers by itself, no probe is trained: InstructBLIP asked through its language model (the
paper's Appendix C; mode "zero-shot prompt"), or BLIP-2's image-text matching head (mode "ITM head"). The
backend family decides which (`probing.models.answering`). The output is shaped like `probing train`'s, so
`probing analyze`, `probing report` (Table 1 shows each mode as its own row), the per-category tables and
ROC-AUC take it as it is:

    RUN/manifest.json              what answered what: mode, task, the model's weight files (hashed), the
                                   prompt and answers (and their tokens), dtype, threshold, data fingerprints
    RUN/metrics.json               per scored split: loss (BCE of the log-odds) and accuracy
                                   (`probing.core.records.MetricsRecord`, one "seed" 0, no epochs)
    RUN/predictions/<split>.jsonl  one line per example: id, category, label, probability, predicted, correct,
                                   the raw scores (each answer's log-probability, or the match probability) and
                                   the example's metadata

Each example's answer is one log-odds of "true": log P(positive answer) - log P(negative answer), or
logit(match) - logit(no match); "true" when it is above 0 (the positive answer more likely than the
negative, the match probability above 0.5), or, with `--threshold-from val`, above the threshold that is most
accurate on val (recorded). Images are decoded in DataLoader workers and each batch's distinct images go
through the ViT once; examples are grouped by image so that a batch holds an image's examples together.
Scores are kept (one float per example) and nothing else, so memory stays flat as the split grows. The
folder appears whole; a folder made for the same request is reused without loading the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from probing.baselines.settings import ZeroShotRequest, ZeroShotSettings  # noqa: F401 (their home was here)
from probing.core.artifacts import code_version, existing_output_matches, staged_directory, write_json
from probing.core.devices import resolve_device
from probing.core.errors import ProbingError
from probing.core.records import NO_PROBE, MetricsRecord, SeedRun, StageResult
from probing.core.settings import check, identity
from probing.data.types import Example, SplitData
from probing.models.answering import (
    ZeroShotScorer,
    checkpoint_identity,
    zero_shot_scorer,
)
from probing.models.checkpoint import CheckpointSource
from probing.models.loading import is_lavis_file, load_config
from probing.models.registry import family_for_config, resolve_alias
from probing.store.extract import DecodedImages, check_images_exist, collate_images, default_workers
from probing.tasks import get_task, is_task_file, load_split, task_reference
from probing.tasks.heads import BinaryHead

log = logging.getLogger(__name__)

ZEROSHOT_FORMAT_VERSION = 1
SEED = 0  # a zero-shot run is deterministic: its one "seed" in the run folder's records


@dataclass
class _Plan:
    """A request resolved: its device, checkpoint, method (tokenizers read, not yet the weights), data and the
    identity of the run it makes."""

    request: ZeroShotRequest
    device: torch.device
    checkpoint: CheckpointSource
    scorer: ZeroShotScorer
    data: dict[str, SplitData]
    identity: dict[str, Any]


def _binary_task(reference: str):
    spec = get_task(reference)
    if not isinstance(spec.head, BinaryHead):
        raise ProbingError(
            f"--task {spec.name}: zero-shot scoring asks whether a caption is true of its image (binary tasks); "
            f"{spec.name} is a {spec.head.kind} task"
        )
    return spec


def _splits(request: ZeroShotRequest, spec) -> tuple[str, ...]:
    """The splits to score: as given (VSR's `dev` is `val`), else val and the evaluated ones; val first when
    the threshold is chosen on it."""
    given = request.splits or spec.evaluated_splits
    splits = list(dict.fromkeys(spec.check_split(split) for split in given))
    if request.threshold_from is not None and request.threshold_from not in splits:
        splits.insert(0, request.threshold_from)
    return tuple(splits)


def plan(request: ZeroShotRequest) -> _Plan:
    """Everything but the weights: the task, the method, the settings resolved and checked, the data and the
    identity of the run (the weight files hashed). Cheap next to loading the model."""
    check(request)
    spec = _binary_task(request.data.task)
    source = request.source.required()
    if source.init != "pretrained":
        raise ProbingError("--init random: zero-shot scoring needs the pretrained weights")
    if source.base is not None or is_lavis_file(source.model):
        raise ProbingError(f"--model {source.model}: zero-shot scoring needs a checkpoint in the Hugging Face format")
    aliased, spec_name = resolve_alias(source.model)
    checkpoint = CheckpointSource(spec_name, source.revision)
    config = load_config(checkpoint)
    requested = source.family or (aliased.name if aliased is not None else None)
    family = family_for_config(config, checkpoint.name_or_path, requested)
    scorer_class = zero_shot_scorer(family, source.model)
    device = resolve_device(request.device)
    settings = scorer_class.resolved(
        {"prompt": request.prompt, "answers": request.answers, "llm_dtype": request.llm_dtype}, device
    )
    request = replace(request, **settings, splits=_splits(request, spec))
    scorer = scorer_class(checkpoint, config, family, settings, source, device)
    data = {split: load_split(request.data, split) for split in request.splits}
    identity_ = {
        "kind": "zeroshot-run",
        "format_version": ZEROSHOT_FORMAT_VERSION,
        "mode": scorer.mode,
        "task": spec.name,
        "layer": family.resampler.layers_in(config),  # what the answer builds on: the last Q-Former layer
        "probe": NO_PROBE,
        "settings": identity(request, only=[f.name for f in fields(ZeroShotSettings)]) | scorer.identity(),
        "inputs": {
            "model": checkpoint_identity(checkpoint, family),
            "datasets": {split: split_data.fingerprint for split, split_data in data.items()},
        },
    }
    return _Plan(request, device, checkpoint, scorer, data, identity_)


def run_zeroshot(request: ZeroShotRequest) -> StageResult[MetricsRecord]:
    """Score the splits, decide, write the run folder (or reuse the one made for this request)."""
    planned = plan(request)
    request = planned.request
    if existing_output_matches(request.out, planned.identity, "zero-shot run"):
        return StageResult(MetricsRecord.relabel(request.out, request.label), request.out, "reused")
    check_images_exist([e for split in planned.data.values() for e in split.examples], skip_bad_images=False)
    scorer = planned.scorer
    scorer.load()
    scored = {split: score_split(scorer, data.examples, request) for split, data in planned.data.items()}
    threshold = choose_threshold(scored[request.threshold_from]) if request.threshold_from else 0.0
    return write_run(planned, scored, threshold)


def plan_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Example indices per batch, grouped by image id (split order within an image): an image's examples go
    into one batch where they fit, so that its ViT output is computed once."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].image_id)  # stable: split order within
    groups: list[list[int]] = []
    for index in order:
        if groups and examples[groups[-1][0]].image_path == examples[index].image_path:
            groups[-1].append(index)
        else:
            groups.append([index])
    batches: list[list[int]] = []
    for group in groups:
        for start in range(0, len(group), batch_size):  # an image with more examples than a batch: several
            part = group[start : start + batch_size]
            if batches and len(batches[-1]) + len(part) <= batch_size:
                batches[-1].extend(part)
            else:
                batches.append(list(part))
    return batches


@dataclass
class SplitScores:
    examples: list[Example]
    logits: torch.Tensor  # [N] float32, in split order
    fields: list[dict[str, Any]]
    seconds: float


def score_split(scorer: ZeroShotScorer, examples: list[Example], request: ZeroShotRequest) -> SplitScores:
    """Every example's log-odds of "true", in split order (`scorer` loaded)."""
    from tqdm.auto import tqdm

    batches = plan_batches(examples, request.batch_size)
    images_of_batch = [list(dict.fromkeys(examples[i].image_path for i in batch)) for batch in batches]
    paths = [path for images in images_of_batch for path in images]
    offsets, offset = [], 0
    for images in images_of_batch:  # the DataLoader's batches: each batch's distinct images
        offsets.append(list(range(offset, offset + len(images))))
        offset += len(images)
    workers = default_workers() if request.workers is None else request.workers
    device = resolve_device(request.device)
    loader = DataLoader(
        DecodedImages(paths, scorer.pixels),
        batch_sampler=offsets,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    logits = torch.empty(len(examples), dtype=torch.float32)
    fields_: list[dict[str, Any]] = [{} for _ in examples]
    progress = tqdm(total=len(examples), unit="ex", desc="zeroshot", disable=None if request.progress else True)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch, images, (_, _, pixels, errors) in zip(batches, images_of_batch, loader, strict=True):
            if errors:
                raise ProbingError(errors[0][1])
            embeds = scorer.encode_images(pixels)
            slot = {path: position for position, path in enumerate(images)}
            slots = torch.tensor([slot[examples[i].image_path] for i in batch], dtype=torch.long)
            scores = scorer.score(embeds, slots, request.preprocess([examples[i].text for i in batch]))
            logits[batch] = scores.logits.float()
            for i, extra in zip(batch, scores.fields, strict=True):
                fields_[i] = extra
            progress.update(len(batch))
    progress.close()
    seconds = time.perf_counter() - started
    log.log(  # a progress bar showed the rate already: then a line for --verbose only
        logging.DEBUG if request.progress else logging.INFO,
        "scored %d examples in %.1f s (%.1f examples/s)",
        len(examples),
        seconds,
        len(examples) / max(seconds, 1e-9),
    )
    return SplitScores(list(examples), logits, fields_, seconds)


def choose_threshold(scores: SplitScores) -> float:
    """The log-odds threshold most accurate on these scores (scikit-learn's ROC curve lists every distinct
    score as a threshold; accuracy at each follows from its true and false positive rates). Returned as the
    midpoint below the chosen score, so that "true above the threshold" decides these examples as chosen."""
    import numpy as np
    from sklearn.metrics import roc_curve

    labels = np.array([example.label for example in scores.examples])
    values = scores.logits.double().numpy()
    if len(set(labels.tolist())) < 2:
        raise ProbingError("--threshold-from: the split has examples of one label only; no threshold to choose")
    false_rate, true_rate, thresholds = roc_curve(labels, values, drop_intermediate=False)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    accuracy = (true_rate * positives + (1 - false_rate) * negatives) / len(labels)
    best = int(np.argmax(accuracy))  # the first (highest threshold) among equals
    if not np.isfinite(thresholds[best]):  # "nothing is true": above the highest score
        return float(values.max()) + 1.0
    below = values[values < thresholds[best]]
    lower = below.max() if below.size else thresholds[best] - 2.0
    return float((thresholds[best] + lower) / 2)


def write_run(planned: _Plan, scored: dict[str, SplitScores], threshold: float) -> StageResult[MetricsRecord]:
    request = planned.request
    spec = get_task(request.data.task)
    head = spec.head
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for split, scores in scored.items():
        outputs = (scores.logits - threshold).unsqueeze(-1)  # the head's rule: "true" when above 0
        targets = head.targets(scores.examples, f"{split} split")
        metrics[split] = {
            "loss": float(head.loss(outputs, targets)),
            **{name: float(value) for name, value in head.metrics(outputs, targets).items()},
        }
        records = head.records(split, SEED, scores.examples, outputs, targets)
        predictions[split] = [{**record, **extra} for record, extra in zip(records, scores.fields, strict=True)]
    decision = {"threshold": threshold, "threshold_from": request.threshold_from}
    record = MetricsRecord(
        task=spec.name,
        metric=head.main_metric,
        runs=[SeedRun(seed=SEED, trial=decision, best_epoch=0, epochs_run=0, stopped_early=False, splits=metrics)],
        train_categories={},  # nothing was trained
        label=request.label,
    )
    extra: dict[str, Any] = {
        "decision": decision,
        "data_options": {
            "task": task_reference(request.data.task),
            **{key: str(Path(value).resolve()) for key, value in request.data.given().items()},
        },
        "data_sources": {split: data.sources for split, data in planned.data.items()},
        "seconds": {split: round(scores.seconds, 3) for split, scores in scored.items()},
        "code_version": code_version(),
    }
    if is_task_file(request.data.task):
        extra["task_file"] = str(Path(spec.source).resolve())
    with staged_directory(request.out) as staging:
        (staging / "predictions").mkdir()
        for split, lines in predictions.items():
            with open(staging / "predictions" / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for line in lines:
                    handle.write(json.dumps(line) + "\n")
        write_json(staging / "metrics.json", record.to_json())
        write_json(staging / "manifest.json", {**planned.identity, **extra})
    return StageResult(record, request.out, "built")
