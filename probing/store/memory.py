"""Features that never touch disk: a split's per-layer query states extracted straight into device memory.

`memory_stores(...)` answers what `probing extract` would write, one object per split that reads like a
`FeatureStore` (`.ids`, `.layers`, `.per_image`, `.manifest`, `.load(layer)`, `.load_rows(layer)`), so the
frozen trainers take it unchanged (`probing search --in-memory`, a config's `search: {in_memory: true}`).

Why it gives the same numbers as a store: it runs the same forward as extraction, with the same pieces
(`probing.store.extract`: the store order and shards of `plan_shards`, decoding in `DecodedImages`, the ViT once
per image of a shard, `Resampler.query_states` per batch of texts of a shard, the states cast to the store's dtype),
so every batch holds what extraction's batch holds and the values are bit for bit a store's. Its manifest carries
the identity a store made with the same settings would have (`store_identity`), so runs and searches on it record
the same `inputs` as runs on a store, plus `features_in_memory`.

What it saves: writing, hashing and reading back shards. What it costs: the features of every split stay in
device memory while the probes train (RefCOCOg's train split is ~4 GB per layer in fp16), and a second search
extracts again. The model is loaded when the stores are made (its weights' hash is part of their identity), a
split is extracted when first read, and the model is let go once every split is.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from probing.core.devices import resolve_device
from probing.data.types import DataOptions, SplitData
from probing.models import DTYPES, ModelSource, Resampler, load_resampler
from probing.store.extract import (
    DecodedImages,
    ExtractionRequest,
    ExtractionSettings,
    check_images_exist,
    collate_images,
    default_workers,
    encode_shard_images,
    parse_layers,
    plan_shards,
    resolved,
    store_identity,
)
from probing.tasks import get_task, load_split, task_reference

log = logging.getLogger(__name__)

MEMORY = Path("(in memory)")  # what messages name as a memory store's folder: `(in memory)/train: ...`


class MemoryStore:
    """One split's features in device memory, read like a `FeatureStore` (extracted on the first read)."""

    in_memory = True

    def __init__(self, extraction: _MemoryExtraction, split: str):
        self._extraction, self.split = extraction, split
        self.path = MEMORY / split

    @property
    def manifest(self) -> dict[str, Any]:
        """What a store's manifest would say (`request` is the store's identity), marked as in memory."""
        return self._extraction.manifest(self.split)

    @property
    def layers(self) -> list[int]:
        return list(self._extraction.layers)

    @property
    def per_image(self) -> bool:
        return not self._extraction.resampler_reads_text

    @property
    def ids(self) -> list[int]:
        return self._extraction.extracted(self.split)["ids"]

    def __len__(self) -> int:
        return len(self.ids)

    def load_rows(
        self, layer: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's rows (per image for a backend that reads no text, with the row each example reads)."""
        from probing.core.errors import ProbingError

        if layer not in self.layers:
            raise ProbingError(f"{self.path}: layer {layer} is not in the store (it has {self.layers})")
        extracted = self._extraction.extracted(self.split)
        states = extracted["states"][self.layers.index(layer)]
        return states.to(device=device or states.device, dtype=dtype or states.dtype), extracted["rows"]

    def load(
        self, layer: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        states, rows = self.load_rows(layer, dtype, device)
        return states if rows is None else states.index_select(0, rows.to(states.device))

    def sources(self) -> dict[str, Any]:
        """What a run's manifest records of where its features came from (a store's records its folder)."""
        return {"features_in_memory": True, "model_source": self._extraction.model_source}


class _MemoryExtraction:
    """The model and the splits' data, loaded once; each split extracted on demand, the model let go after."""

    def __init__(
        self,
        source: ModelSource,
        data: DataOptions,
        splits: list[str],
        layers: list[int],
        settings: ExtractionSettings,
        device: torch.device,
    ):
        request = resolved(
            ExtractionRequest(**vars(source), **_settings(settings), data=data, split=splits[0], out=MEMORY),
            device,
        )
        self.requests = {split: _for_split(request, split) for split in splits}
        self.data: dict[str, SplitData] = {split: load_split(data, split) for split in splits}
        self.resampler: Resampler | None = load_resampler(
            source,
            device=device,
            vision_dtype=DTYPES[request.vision_dtype],
            qformer_dtype=DTYPES[request.qformer_dtype],
        )
        self.resampler.set_text(request.text_settings)
        self.layers = parse_layers(layers, self.resampler.num_layers)
        self.resampler_reads_text = self.resampler.reads_text
        self.model_source = self.resampler.identity
        recorded = {key: str(Path(value).resolve()) for key, value in data.given().items()}
        if data.limit is not None:
            recorded["limit"] = data.limit
        self._manifests = {
            split: {
                "kind": "features",
                "complete": True,
                "features_in_memory": True,
                "request": store_identity(self.resampler, self.data[split], self.requests[split]),
                "layers": list(self.layers),  # as a store's manifest lists the layers it holds
                "model_source": self.model_source,
                "data_options": {"task": task_reference(data.task), **recorded},
            }
            for split in splits
        }
        self._extracted: dict[str, dict[str, Any]] = {}

    def manifest(self, split: str) -> dict[str, Any]:
        return self._manifests[split]

    def extracted(self, split: str) -> dict[str, Any]:
        if split not in self._extracted:
            assert self.resampler is not None  # let go only once every split is extracted
            self._extracted[split] = _extract_split(self.resampler, self.data[split], self.requests[split], self.layers)
            self._manifests[split]["examples"] = len(self._extracted[split]["ids"])
            if len(self._extracted) == len(self.requests):  # every split is in memory: the model is no longer needed
                device = self.resampler.device
                self.resampler = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return self._extracted[split]


def _settings(settings: ExtractionSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(ExtractionSettings)}


def _for_split(request: ExtractionRequest, split: str) -> ExtractionRequest:
    from dataclasses import replace

    return replace(request, split=split, out=MEMORY / split)


def memory_stores(
    source: ModelSource | str | Path,
    data: DataOptions,
    layers: list[int] | str,
    settings: ExtractionSettings | None = None,
    device: str | torch.device | None = None,
) -> dict[str, MemoryStore]:
    """Per split of the data's task, its `layers` extracted in memory on `device` (None: the first GPU, else the
    CPU) with extraction `settings` (default: `probing extract`'s), as `probing extract` would store them."""
    settings = settings or ExtractionSettings(progress=False)
    if not isinstance(source, ModelSource):  # a model string, as `load_resampler` takes it
        source = ModelSource(model=str(source))
    # only the model's own fields (a request that carries them, e.g. a search's, has many more)
    source = ModelSource(**{f.name: getattr(source, f.name) for f in fields(ModelSource)})
    place = resolve_device(str(device)) if device is not None else resolve_device(settings.device)
    splits = list(get_task(data.task).splits)
    extraction = _MemoryExtraction(source, data, splits, layers, settings, place)
    return {split: MemoryStore(extraction, split) for split in splits}


def _extract_split(
    resampler: Resampler, data: SplitData, request: ExtractionRequest, layers: list[int]
) -> dict[str, Any]:
    """`{"ids", "states" [L, rows, Q, H] on the device in the store's dtype, "rows"}` for one split, computed in
    the batches `probing extract` computes them in (its shards, its image and text batches)."""
    from tqdm.auto import tqdm

    check_images_exist(data.examples, request.skip_bad_images)
    shards = plan_shards(data.examples, request.shard_size)
    device, storage_dtype = resampler.device, DTYPES[request.dtype]
    paths = [path for shard in shards for path in shard.images]
    batches, offset = [], 0
    for shard in shards:  # image batches never straddle shards, as in extraction
        batches += [
            list(range(offset + start, offset + min(start + request.batch_size, len(shard.images))))
            for start in range(0, len(shard.images), request.batch_size)
        ]
        offset += len(shard.images)
    loader = DataLoader(
        DecodedImages(paths, resampler.pixels),
        batch_sampler=batches,
        num_workers=default_workers() if request.workers is None else request.workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    per_image = not resampler.reads_text
    # Filled in place, one row per example (or per image of a shard): no second copy of a split on the device.
    capacity = len(paths) if per_image else len(data.examples)
    states = torch.empty(
        (len(layers), capacity, resampler.num_query_tokens, resampler.hidden_size), dtype=storage_dtype, device=device
    )
    ids: list[int] = []
    example_rows: list[int] = []
    filled = 0
    batch_iterator = iter(loader)
    progress = tqdm(
        total=len(data.examples),
        unit="ex",
        desc=f"extract {data.split} in memory",
        disable=None if request.progress else True,
    )
    with torch.inference_mode():
        offset = 0
        for shard in shards:
            embeds, bad_slots, _ = encode_shard_images(shard, offset, batch_iterator, resampler, request)
            offset += len(shard.images)
            kept = [i for i, slot in enumerate(shard.slot_of_example) if slot not in bad_slots]
            ids += [shard.examples[i].example_id for i in kept]
            if per_image:  # queries that read no text: one row per image, each example reads its image's
                good = [slot for slot in range(len(shard.images)) if slot not in bad_slots]
                row_of_slot = {slot: filled + row for row, slot in enumerate(good)}
                example_rows += [row_of_slot[shard.slot_of_example[i]] for i in kept]
                row_slots = torch.tensor(good, dtype=torch.long)
                texts: list[list[str] | None] = [None] * -(-len(good) // request.batch_size)
            else:
                row_slots = torch.tensor([shard.slot_of_example[i] for i in kept], dtype=torch.long)
                texts = [
                    [shard.examples[i].text for i in kept[start : start + request.batch_size]]
                    for start in range(0, len(kept), request.batch_size)
                ]
            for batch, batch_texts in enumerate(texts):
                start = batch * request.batch_size
                slots = row_slots[start : start + request.batch_size]
                tokens = resampler.tokenize(batch_texts) if batch_texts is not None else None
                computed = resampler.query_states(embeds, tokens, layers, image_slots=slots)
                states[:, filled + start : filled + start + len(slots)] = computed.transpose(0, 1).to(storage_dtype)
            filled += len(row_slots)
            progress.update(len(shard.examples))
    progress.close()
    rows = torch.tensor(example_rows, dtype=torch.int64) if per_image else None  # on the host, as a store's
    log.debug("%s: %d examples extracted in memory on %s", data.split, len(ids), device)
    return {"ids": ids, "states": states[:, :filled], "rows": rows}


__all__ = ["MEMORY", "MemoryStore", "memory_stores"]
