"""The settings of an extraction (`ExtractionSettings`, `ExtractionRequest`), declared apart from it (it needs
torch and transformers) so that `probing extract --help`, configs and manifests read them without either."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from probing.core.settings import setting
from probing.core.shared_settings import ImagePipeline
from probing.data.types import DataOptions
from probing.models.source import DtypeName, ModelSource
from probing.models.text import QFormerText


@dataclass(frozen=True, kw_only=True)
class ExtractionSettings(ImagePipeline, QFormerText):
    """How a split is extracted: the `extract` section of a config and the options of `probing extract`.
    Which layers and whether ViT outputs are kept, a config derives from its experiments. How texts reach the
    Q-Former (`QFormerText`: preprocessing, instruction) is part of the store's identity when not the default."""

    layers: str | tuple[int, ...] = setting(
        "all",
        config=False,
        help="all | comma-separated Q-Former layers, e.g. 1,6,12 (0 = the constant embedding output)",
    )
    shard_size: int = setting(1024, identity=True, low=1, help="Examples per shard (the unit of resumption).")
    batch_size: int = setting(64, identity=True, low=1, help="Images and texts per forward pass.")
    store_vision: bool = setting(
        False, identity=True, config=False, help="Also store per-image ViT outputs for unfrozen training."
    )
    dtype: DtypeName = setting("float16", identity=True, help="Storage dtype of the query states.")
    vision_dtype: DtypeName | None = setting(
        None, identity=True, help="ViT compute dtype (default bfloat16 on GPU, float32 on CPU)."
    )
    qformer_dtype: DtypeName = setting("float32", identity=True, help="Q-Former compute dtype.")
    compile_vision: bool = setting(
        False,
        identity="vision_compiled",
        omit_default=True,
        help="Compile the ViT with torch.compile (fused kernels; the first batches wait for the compiler).",
    )
    skip_bad_images: bool = setting(
        False,
        identity=True,
        help="Record missing or corrupt images in the manifest and leave their examples out, instead of stopping.",
    )
    write_threads: int | None = setting(
        None,
        low=1,
        help="Threads writing shards; each holds one shard in memory (default: one per 4 cores, 1..4).",
    )


@dataclass(frozen=True, kw_only=True)
class ExtractionRequest(ModelSource, ExtractionSettings):
    """One split of one task through one model into one store: a model source, extraction settings and where."""

    data: DataOptions
    split: str
    out: Path
    label: str | None = setting(
        None,
        config=False,  # a config names its models by their keys, which its runs carry
        help="How reports name the model of runs made from this store that give no --label of their own (kept in "
        "the store's manifest, not in its identity).",
    )

    @property
    def source(self) -> ModelSource:
        return ModelSource(**{f.name: getattr(self, f.name) for f in fields(ModelSource)})
