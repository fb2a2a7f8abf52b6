"""`probing extract`: run a resampler over a split and store per-layer query outputs (FeatureStore).

Speed where it matters:
- Examples are grouped by image and the ViT runs once per unique image of a shard (RefCOCOg has ~3.7
  sentences per image); each example's text then goes through the Q-Former with its image's embeds, whose
  cross-attention keys and values are also computed once per image of a batch.
- Images are decoded and resized in DataLoader workers while the device computes; they travel as uint8 and
  are normalised on the device (bit for bit the image processor's pixels, `models/pixels.py`).
- On GPU the ViT runs in bf16 (configurable), the Q-Former in fp32 unless asked; `--compile-vision` compiles
  the ViT (torch.compile: its norms and activations fused with the matrix products).
- A shard is written by a background thread while the next one is computed; at most one shard waits,
  so memory stays flat however large the split.
- Several GPUs: `accelerate launch -m probing extract ...`; process r computes shards r, r+P, r+2P ... and
  writes them itself; nothing large is gathered; the main process writes the manifest at the end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from probing.core.artifacts import MANIFEST_NAME, code_version, relabel_json, removed_when_refused
from probing.core.device_copies import to_device, to_host
from probing.core.devices import resolve_device
from probing.core.errors import ProbingError
from probing.core.locks import claim
from probing.core.records import StageResult
from probing.core.settings import check, identity
from probing.data.images import load_rgb_image
from probing.data.types import Example, SplitData
from probing.models import DTYPES, Resampler, load_resampler
from probing.models.pixels import PixelPipeline
from probing.store.features import (
    PER_IMAGE,
    STORE_FORMAT_VERSION,
    FeatureStore,
    FeatureStoreWriter,
    finite_per_layer,
    layer_key,
    shard_name,
    verification_enabled,
)
from probing.store.settings import DtypeName, ExtractionRequest, ExtractionSettings  # noqa: F401 (their home was here)
from probing.tasks import get_task, load_split, task_reference

log = logging.getLogger(__name__)


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """`all` -> 1..num_layers; `1,6,12` -> [1, 6, 12]; 0 (the constant embedding output) only if named."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(1, num_layers + 1))
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ProbingError(f"--layers: '{spec}' is not 'all' or a comma-separated list of layers") from None
    else:
        layers = list(spec)
    if not layers:
        raise ProbingError("--layers: no layer given")
    for layer in layers:
        if not 0 <= layer <= num_layers:
            raise ProbingError(f"--layers: layer {layer} does not exist (the Q-Former has layers 1..{num_layers})")
    return sorted(set(layers))


@dataclass
class _Shard:
    index: int
    examples: list[Example]
    images: list[Path] = field(default_factory=list)  # unique, first-appearance order
    image_ids: list[int] = field(default_factory=list)
    slot_of_example: list[int] = field(default_factory=list)  # index into `images`
    owns_image: list[bool] = field(default_factory=list)  # first appearance in the whole split


def plan_shards(examples: list[Example], shard_size: int) -> list[_Shard]:
    """Store order groups examples by image id (split order within an image), then cuts it into shards of
    `shard_size` examples.

    The image id and not the resolved path: the order, hence the store, must not depend on the folder
    (train2014/ or train2017/) an image was found in.
    """
    if shard_size < 1:
        raise ProbingError("--shard-size must be at least 1")
    ordered = sorted(examples, key=lambda e: e.image_id)  # sorted() is stable: split order within an image
    seen: set[Path] = set()
    shards = []
    for index, start in enumerate(range(0, len(ordered), shard_size)):
        shard = _Shard(index=index, examples=ordered[start : start + shard_size])
        slots: dict[Path, int] = {}
        for example in shard.examples:
            if example.image_path not in slots:
                slots[example.image_path] = len(shard.images)
                shard.images.append(example.image_path)
                shard.image_ids.append(example.image_id)
                shard.owns_image.append(example.image_path not in seen)
                seen.add(example.image_path)
            shard.slot_of_example.append(slots[example.image_path])
        shards.append(shard)
    return shards


class DecodedImages(Dataset):
    """Decodes and resizes one image per item in a worker (uint8 where normalising on the device is exact,
    see `PixelPipeline`); a bad image becomes an error string. Batches are made by `collate_images`."""

    def __init__(self, paths: list[Path], pixels: PixelPipeline):
        self.paths = paths
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb_image(self.paths[index])
        except ProbingError as error:  # reported by the main process: a worker's traceback is not one line
            return index, None, str(error)
        return index, self.pixels.host_pixels(image), None


def collate_images(items):
    """(indices, indices of the decoded images, their stacked pixels or None, [(index, error)])."""
    indices = [index for index, _, _ in items]
    pixels = [p for _, p, _ in items if p is not None]
    errors = [(index, error) for index, _, error in items if error is not None]
    good = [index for index, p, _ in items if p is not None]
    return indices, good, torch.stack(pixels) if pixels else None, errors


def _preprocessing(resampler: Resampler) -> dict[str, Any]:
    """The image processor's settings that change pixels (its own JSON form: `to_dict()`)."""
    settings = resampler.image_processor.to_dict()
    keys = (
        "size",
        "resample",
        "image_mean",
        "image_std",
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "do_convert_rgb",
        "do_center_crop",
        "crop_size",
    )
    return {
        "image_processor": type(resampler.image_processor).__name__,
        **{key: settings[key] for key in keys if settings.get(key) is not None},
    }


def _distributed_state(device: str | None):
    from accelerate import PartialState

    # Without a GPU accelerate only sees the processes of `accelerate launch` when told to use the CPU.
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def resolved(request: ExtractionRequest, device: torch.device) -> ExtractionRequest:
    """The request with its defaults decided: the ViT in bf16 on GPU, fp32 on CPU."""
    check(request).check_text()
    return replace(request, vision_dtype=request.vision_dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def extract(request: ExtractionRequest) -> StageResult[FeatureStore]:
    """Extract per-layer query states for one split into `request.out`; resume or refuse as the manifest says."""
    check(request)  # the device, ranges and choices before any work
    state = _distributed_state(request.device)
    device = resolve_device(request.device) if request.device not in (None, "cpu") else state.device
    request = resolved(request, device)
    data = load_split(request.data, request.split)
    resampler = load_resampler(
        request.source,
        device=device,
        vision_dtype=DTYPES[request.vision_dtype],
        qformer_dtype=DTYPES[request.qformer_dtype],
    )
    return extract_loaded(resampler, data, request, state)


def store_identity(resampler: Resampler, data: SplitData, request: ExtractionRequest) -> dict[str, Any]:
    """What defines a store: the weights, the data, the settings that change its values or layout. Not the layers:
    a store grows by the layers a later request adds (`probing.store.features`), and the manifest lists them."""
    settings = identity(request, only=[f.name for f in fields(ExtractionSettings)])
    text = (
        {"max_tokens": resampler.max_text_tokens, "truncation_side": resampler.truncation_side, "padding": "longest"}
        if resampler.reads_text
        else None
    )
    result = {
        "kind": "features",
        "format_version": STORE_FORMAT_VERSION,
        "model": resampler.weights_identity(),
        "task": data.task,
        "split": data.split,
        "dataset_fingerprint": data.fingerprint,
        "dtype": settings.pop("dtype"),
        # the dtypes the resampler really runs in (a caller may hand over a loaded one)
        "vision_dtype": str(resampler.vision_dtype).removeprefix("torch."),
        "qformer_dtype": str(resampler.qformer_dtype).removeprefix("torch."),
        "preprocessing": _preprocessing(resampler),
        "text": text,
        "order": "grouped by image id",
    }
    settings.pop("vision_dtype"), settings.pop("qformer_dtype")
    if not resampler.reads_text:
        result["rows"] = PER_IMAGE  # only then: stores of text families keep the identity they always had
    return result | settings


def extract_loaded(
    resampler: Resampler, data: SplitData, request: ExtractionRequest, state=None
) -> StageResult[FeatureStore]:
    """The extraction proper, for a loaded resampler and split (what `benchmarks/extract.py` times)."""
    state = state or _distributed_state(request.device)
    device = resampler.device
    request = resolved(request, device)
    resampler.set_text(request.text_settings)
    storage_dtype = DTYPES[request.dtype]
    layers = parse_layers(request.layers, resampler.num_layers)
    shards = plan_shards(data.examples, request.shard_size)
    if request.compile_vision:
        resampler.compile_vision()
    identity = store_identity(resampler, data, request)
    # One writer per store, claimed before anything is read or written: another worker (another job on the shared
    # disk) extracting the same request is waited for, then reused; one with another request is refused at once.
    # A refusal on the way (a bad image, a full disk is not one) removes the store and folders this run created.
    with removed_when_refused(request.out, remove=state.is_main_process):
        lock = claim(request.out, identity, "feature store") if state.is_main_process else None
        state.wait_for_everyone()
        try:
            return _extract_claimed(resampler, data, request, state, layers, shards, storage_dtype, identity)
        finally:
            if lock is not None:
                lock.release()


def _extract_claimed(
    resampler: Resampler,
    data: SplitData,
    request: ExtractionRequest,
    state,
    layers: list[int],
    shards: list,
    storage_dtype: torch.dtype,
    identity: dict[str, Any],
) -> StageResult[FeatureStore]:
    """The extraction proper once the store is claimed: finish or repair what the folder holds, then add the
    requested layers it lacks. Each pass runs the model once over the shards that need it; every process decides
    from the manifest the main process wrote before the last barrier."""
    built = False
    while True:
        writer = FeatureStoreWriter(request.out, identity)  # every process checks
        if writer.complete:
            damaged = writer.damaged_shards() if verification_enabled() else []
            if damaged and built:  # written by this call and damaged already: recomputing again would not end
                index, group = damaged[0]
                raise ProbingError(
                    f"{request.out / shard_name(index, group)}: damaged right after it was written; check the disk"
                )
            if damaged:
                log.warning("%s: %d damaged file(s) %s; computing them again", request.out, len(damaged), damaged)
                state.wait_for_everyone()
                if state.is_main_process:
                    writer.reopen(damaged)
                state.wait_for_everyone()
                continue
            missing = [layer for layer in layers if layer not in writer.present_layers]
            if not missing:
                if not built:
                    log.info("%s: holds layers %s; nothing to do", request.out, writer.present_layers)
                if state.is_main_process:
                    relabel_json(request.out / MANIFEST_NAME, request.label)
                state.wait_for_everyone()
                return StageResult(FeatureStore(request.out), request.out, "built" if built else "reused")
            check_images_exist(data.examples, request.skip_bad_images)
            state.wait_for_everyone()
            if state.is_main_process:
                writer.begin_growth(missing)
            state.wait_for_everyone()
            writer = FeatureStoreWriter(request.out, identity)  # the growth as the main process recorded it
            log.info("%s: holds layers %s; adding %s", request.out, writer.present_layers, writer.growing)
            group = len(writer.groups)
            _extract_groups(resampler, request, state, shards, storage_dtype, writer, {group: writer.growing})
            if state.is_main_process:
                writer.finish_growth(len(shards), {"code_version": code_version()})
        else:
            check_images_exist(data.examples, request.skip_bad_images)
            state.wait_for_everyone()  # all checks passed everywhere before the main process creates the store
            if state.is_main_process:
                writer.prepare(layers)
            state.wait_for_everyone()
            writer = FeatureStoreWriter(request.out, identity)  # its layer groups, as recorded
            groups = dict(enumerate(writer.groups))
            _extract_groups(resampler, request, state, shards, storage_dtype, writer, groups)
            if state.is_main_process:
                writer.finish(len(shards), _summary(resampler, data, request))
        built = True
        state.wait_for_everyone()


def _summary(resampler: Resampler, data: SplitData, request: ExtractionRequest) -> dict[str, Any]:
    """What a new store's manifest says beside its identity: where the data came from, counts, the code."""
    recorded = {key: str(Path(value).resolve()) for key, value in request.data.given().items()}
    if request.data.limit is not None:  # the targets of a limited store are the same first examples
        recorded["limit"] = request.data.limit
    return {
        **text_truncation(resampler, data, request.out),
        "model_source": resampler.identity,
        "data_sources": data.sources,
        # where the data was read from, so that `probing train` can find the targets by itself
        "data_options": {"task": task_reference(request.data.task), **recorded},
        "images": len({e.image_path for e in data.examples}),
        "code_version": code_version(),
        **({"label": request.label} if request.label is not None else {}),
    }


def _extract_groups(
    resampler: Resampler,
    request: ExtractionRequest,
    state,
    shards: list,
    storage_dtype: torch.dtype,
    writer: FeatureStoreWriter,
    groups: dict[int, list[int]],
) -> None:
    """Compute the (shard, layer group) files of `groups` that are not on disk yet, this process's shards only."""
    device = resampler.device
    mine = []
    for shard in shards:
        if shard.index % state.num_processes != state.process_index:
            continue
        pending = {
            group: group_layers for group, group_layers in groups.items() if not writer.shard_done(shard.index, group)
        }
        if pending:
            mine.append((shard, pending))
    started = time.perf_counter()
    done_examples = _run_shards(
        mine,
        resampler,
        storage_dtype,
        writer,
        request,
        device,
        show_progress=request.progress and state.is_main_process,
    )
    elapsed = time.perf_counter() - started
    if done_examples:  # a progress bar showed the rate already: then a line for --verbose only
        log.log(
            logging.DEBUG if request.progress else logging.INFO,
            "extracted %d examples in %.1f s (%.1f examples/s on this process)",
            done_examples,
            elapsed,
            done_examples / max(elapsed, 1e-9),
        )
    state.wait_for_everyone()


def text_truncation(resampler: Resampler, data: SplitData, out: Path) -> dict[str, Any]:
    """For the manifest: how many of the split's texts the tokenizer cuts at the model's token limit and,
    for a task whose labels hang on some words of the text (RCM's claimed cell), how many lose those words
    (their examples are unanswerable from the text: a warning says how many)."""
    if not resampler.reads_text:
        return {}
    texts = [example.text for example in data.examples]
    counts: dict[str, Any] = {"truncated_texts": resampler.count_truncated(texts)}
    key_words = get_task(data.task).key_words
    if key_words is not None:
        cut = resampler.count_words_cut(texts, [key_words(example) for example in data.examples])
        counts["key_words_cut"] = cut
        if cut:
            log.warning(
                "%s: %d of %d texts lose the words their label depends on to the %d-token truncation",
                out,
                cut,
                len(texts),
                resampler.max_text_tokens,
            )
    return counts


def check_images_exist(examples: list[Example], skip_bad_images: bool) -> None:
    """Fail before any work when images are missing (cheap existence checks), unless told to skip them."""
    paths = sorted({e.image_path for e in examples})
    missing = [p for p in paths if not p.is_file()]
    if missing and not skip_bad_images:
        raise ProbingError(
            f"{missing[0]}: image not found ({len(missing)} of {len(paths)} images missing; "
            "--skip-bad-images records them in the manifest and leaves their examples out)"
        )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Image decoding processes: all cores but two (the main process and its copy and writer threads), at most
    16, at least one where there are two cores. One core decodes and resizes ~130 COCO-sized (640 x 480) JPEGs
    a second, and a GPU's ViT-g takes ~900 a second."""
    cores = _cores()
    return 0 if cores < 2 else min(16, max(1, cores - 2))


def default_write_threads() -> int:
    """Shard-writing threads: one per 4 cores, 1 to 4. One thread serialises, hashes and writes (with fsync)
    about 300 real-size examples a second (13 layers of 32 x 768 in fp16, 0.64 MB each), far below what one GPU
    extracts; most of that work runs outside the GIL, so threads add up. Each holds one shard in memory."""
    return max(1, min(4, _cores() // 4))


def _run_shards(
    jobs: list[tuple[_Shard, dict[int, list[int]]]],
    resampler: Resampler,
    storage_dtype: torch.dtype,
    writer: FeatureStoreWriter,
    request: ExtractionRequest,
    device: torch.device,
    show_progress: bool,
) -> int:
    """Run the model over each job's shard once, for the layers of all the layer groups it lacks, and hand each
    group's file to the writing threads."""
    from tqdm.auto import tqdm

    if not jobs:
        return 0
    shards = [shard for shard, _ in jobs]
    paths = [path for shard in shards for path in shard.images]
    batches, offset = [], 0
    for shard in shards:  # image batches never straddle shards
        batches.extend(
            [
                list(range(offset + s, offset + min(s + request.batch_size, len(shard.images))))
                for s in range(0, len(shard.images), request.batch_size)
            ]
        )
        offset += len(shard.images)
    workers = default_workers() if request.workers is None else request.workers
    loader = DataLoader(
        DecodedImages(paths, resampler.pixels),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    batch_iterator = iter(loader)
    # disable=None: a bar only on a terminal, so logs and one-line errors stay clean
    progress = tqdm(
        total=sum(len(s.examples) for s in shards), unit="ex", desc="extract", disable=None if show_progress else True
    )
    done = 0
    with ShardWriters(writer, request.write_threads or default_write_threads()) as writers, torch.inference_mode():
        offset = 0
        for shard, groups in jobs:
            embeds, bad_slots, errors = encode_shard_images(shard, offset, batch_iterator, resampler, request)
            offset += len(shard.images)
            layers = sorted({layer for group_layers in groups.values() for layer in group_layers})
            tensors, vision, metadata, finite = _query_shard(
                shard, embeds, bad_slots, resampler, layers, storage_dtype, request, errors
            )
            ready = None
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))  # after the shard's copies to the host
            for group, group_layers in sorted(groups.items()):
                part = {key: tensors[key] for key in ("ids", "image_ids", "example_rows") if key in tensors}
                if group > 0:  # a growth's file: the ids to align it with the shard's first file, and its layers
                    part, part_metadata = (
                        {"ids": tensors["ids"]},
                        {"examples": metadata["examples"], "layers": group_layers},
                    )
                else:
                    part_metadata = metadata
                part |= {layer_key(layer): tensors[layer_key(layer)] for layer in group_layers}
                checked = (
                    None if finite is None else {layer_key(layer): finite[layer_key(layer)] for layer in group_layers}
                )
                writers.submit(shard.index, part, part_metadata, vision if group == 0 else None, ready, group, checked)
            done += len(shard.examples)
            progress.update(len(shard.examples))
    progress.close()
    return done


def encode_shard_images(
    shard: _Shard, offset: int, batch_iterator, resampler: Resampler, request: ExtractionRequest
) -> tuple[torch.Tensor | None, set[int], dict[int, str]]:
    """ViT outputs for the shard's unique images: `[U, V, D]` on the device, plus bad image slots."""
    embeds: torch.Tensor | None = None
    bad_slots: set[int] = set()
    errors: dict[int, str] = {}
    remaining = len(shard.images)
    while remaining:
        indices, good, pixels, failures = next(batch_iterator)
        remaining -= len(indices)
        for index, message in failures:
            if not request.skip_bad_images:
                raise ProbingError(message)
            bad_slots.add(index - offset)
            errors[index - offset] = message
        if pixels is None:
            continue
        output = resampler.encode_images(pixels)
        if embeds is None:
            embeds = torch.empty((len(shard.images), *output.shape[1:]), dtype=output.dtype, device=output.device)
        embeds[to_device(torch.tensor(good) - offset, output.device)] = output
    return embeds, bad_slots, errors


class ShardWriters:
    """Threads that write computed shards while the next ones are computed, with back-pressure: `submit` waits
    while one shard per thread is already waiting, so memory holds at most `threads` shards beside the one
    being computed. A write's error surfaces at a later `submit` or at the end of the `with` block."""

    def __init__(self, writer: FeatureStoreWriter, threads: int):
        self.writer, self.threads = writer, threads
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._pending: deque[Future] = deque()  # oldest first

    def submit(
        self,
        index: int,
        tensors,
        metadata,
        vision=None,
        ready: torch.cuda.Event | None = None,
        group: int = 0,
        finite: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Queue the file of (shard `index`, layer group `group`); `ready` is a CUDA event recorded after its copies
        to the host, waited for in the writing thread (not here, so that the caller goes on to queue the next
        shard's GPU work). `finite`: per tensor name, a one-element flag computed on the device (host copy)."""
        if len(self._pending) == self.threads:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, index, tensors, metadata, vision, ready, group, finite))

    def _write(self, index: int, tensors, metadata, vision, ready, group, finite) -> None:
        if ready is not None:
            ready.synchronize()
        flags = None if finite is None else {name: bool(flag) for name, flag in finite.items()}
        self.writer.write_shard(index, tensors, metadata, vision, group=group, finite=flags)

    def __enter__(self) -> ShardWriters:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self._pending:
                future = self._pending.popleft()
                if exc_info[0] is None:
                    future.result()
                else:  # already failing: finish the writes under way, keep the first error
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)


def checks_on_device(device: torch.device) -> bool:
    """Whether the states are cast and checked for NaN and inf where they are computed (a GPU, where the check is
    free beside the cast), rather than by the writing threads on the host (`all_finite`)."""
    return device.type == "cuda"


def _query_shard(
    shard: _Shard,
    embeds: torch.Tensor | None,
    bad_slots: set[int],
    resampler: Resampler,
    layers: list[int],
    storage_dtype: torch.dtype,
    request: ExtractionRequest,
    errors: dict[int, str],
):
    """The shard's query states of `layers` on the host, its metadata and vision tensors, and (on a GPU) per layer
    whether its states are finite.

    On a GPU each batch is cast to the storage dtype on the device, checked for NaN and inf there (the elementwise
    check is free beside the cast; on the host it was the writer's largest cost), and copied into page-locked host
    memory asynchronously (queued on the stream, so the copy overlaps the next batch's computation); the writer
    waits for the shard's event before reading. On the CPU the states are written into the host tensor directly
    and the writer checks them (`all_finite`)."""
    rows = [i for i, slot in enumerate(shard.slot_of_example) if slot not in bad_slots]
    queries, hidden = resampler.num_query_tokens, resampler.hidden_size
    tensors = {"ids": torch.tensor([shard.examples[i].example_id for i in rows], dtype=torch.int64)}
    truncated = 0
    if resampler.reads_text:
        # one row per example: the shard's image table and each text's row in it (keys and values of the
        # cross-attention are projected once per image)
        row_slots = torch.tensor([shard.slot_of_example[i] for i in rows], dtype=torch.long)
        inputs = [
            [shard.examples[i].text for i in rows[start : start + request.batch_size]]
            for start in range(0, len(rows), request.batch_size)
        ]
    else:
        # one row per image: queries that read no text are the same for every example of the image
        good = [slot for slot in range(len(shard.images)) if slot not in bad_slots]
        row_of_slot = {slot: row for row, slot in enumerate(good)}
        row_slots = torch.tensor(good, dtype=torch.long)
        tensors["image_ids"] = torch.tensor([shard.image_ids[slot] for slot in good], dtype=torch.int64)
        tensors["example_rows"] = torch.tensor([row_of_slot[shard.slot_of_example[i]] for i in rows], dtype=torch.int64)
        inputs = [None] * math.ceil(len(good) / request.batch_size)
    on_gpu = checks_on_device(resampler.device)
    shape = (len(layers), len(row_slots), queries, hidden)
    # the host tensor the writer reads; page-locked on a GPU machine (torch's host cache reuses its blocks)
    per_layer = torch.empty(shape, dtype=storage_dtype, pin_memory=resampler.device.type == "cuda")
    finite = torch.ones(len(layers), dtype=torch.bool, device=resampler.device) if on_gpu else None
    for batch, texts in enumerate(inputs):
        start = batch * request.batch_size
        slots = row_slots[start : start + request.batch_size]
        tokens = resampler.tokenize(texts) if texts is not None else None
        if tokens and tokens["input_ids"].shape[1] == resampler.max_text_tokens:  # only then can a text be cut
            truncated += resampler.count_truncated(texts)
        states = resampler.query_states(embeds, tokens, layers, image_slots=slots)
        if not on_gpu:
            per_layer[:, start : start + len(slots)] = states.transpose(0, 1).to(storage_dtype)
            continue
        cast = torch.empty((len(layers), len(slots), queries, hidden), dtype=storage_dtype, device=states.device)
        cast.copy_(states.transpose(0, 1))  # [L, B, Q, H], contiguous: one host copy per layer below
        finite &= finite_per_layer(cast)
        for j in range(len(layers)):  # both sides contiguous: a true asynchronous copy
            per_layer[j, start : start + len(slots)].copy_(cast[j], non_blocking=True)
    flags = None
    if finite is not None:
        host_flags = to_host(finite)  # queued behind the shard's copies; read after the shard's event
        flags = {layer_key(layer): host_flags[j] for j, layer in enumerate(layers)}
    tensors |= {layer_key(layer): per_layer[j] for j, layer in enumerate(layers)}
    # No batch size here: it is in the store's request, which a resumed run must match, so all shards share it.
    metadata = {
        "examples": len(rows),
        "truncated_texts": truncated,
        "bad_images": [errors[slot] for slot in sorted(errors)],
    }
    vision = None
    if request.store_vision:
        owned = [slot for slot, owns in enumerate(shard.owns_image) if owns and slot not in bad_slots]
        index = torch.tensor(owned, dtype=torch.long)
        vision = {
            "ids": torch.tensor([shard.image_ids[s] for s in owned], dtype=torch.int64),
            "image_embeds": to_host(embeds[to_device(index, embeds.device)])
            if embeds is not None
            else torch.empty((0, 0, 0)),
        }
    return tensors, vision, metadata, flags
