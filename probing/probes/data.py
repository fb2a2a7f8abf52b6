"""Features and targets of a task's splits, checked against each other before any training.

A frozen run reads `--features DIR` holding one feature store per split of the task (`DIR/train`,
`DIR/val`, `DIR/test`, or `DIR/testA` ... as written by `probing extract --out DIR/<split>`) and the task's
data for the targets: the data options given, or else the paths each store's manifest recorded. Refused,
with one line each: a store made for another task or split, a layer the store lacks, stores from different
models, a store made from other data than the targets (dataset fingerprint), an example id without a target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probing.core.errors import ProbingError
from probing.data.types import DataOptions
from probing.probes.train import ProbeData, probe_inputs
from probing.store.features import FeatureStore
from probing.tasks import TaskSpec, load_split
from probing.tasks.controls import shuffled_rows
from probing.tasks.spec import TRAIN


def data_options_from(store: FeatureStore) -> DataOptions:
    """The data options a store was extracted from (its manifest records them)."""
    recorded = store.manifest.get("data_options")
    if not recorded:
        raise ProbingError(f"{store.path}: the manifest does not say where its data is; pass the data options")
    return DataOptions(**{k: (v if k in ("task", "limit") else Path(v)) for k, v in recorded.items()})


def open_store(path: Path, spec: TaskSpec, split: str, layer: int) -> FeatureStore:
    if not path.is_dir():
        raise ProbingError(f"{path}: no feature store for split '{split}' (expected --features DIR/{split})")
    return checked_store(FeatureStore(path), spec, split, layer)


def checked_store(store: Any, spec: TaskSpec, split: str, layer: int) -> Any:
    """A store (on disk, or in memory: `probing.store.memory`) refused unless it holds the task's split and layer."""
    request = store.manifest["request"]
    if request["task"] != spec.examples_name:
        raise ProbingError(f"{store.path}: features of task '{request['task']}', not '{spec.examples_name}'")
    if request["split"] != split:
        raise ProbingError(f"{store.path}: features of split '{request['split']}', not '{split}'")
    if layer not in store.layers:
        raise ProbingError(f"{store.path}: layer {layer} is not in the store (it has {store.layers})")
    return store


def align(
    store: FeatureStore,
    spec: TaskSpec,
    split: str,
    layer: int,
    data_options: DataOptions | None,
    latents: str = "flatten",
) -> ProbeData:
    """Features of `layer` with their targets, in store order, the latents read as `latents` says
    (`probing.probes.train.LATENT_READINGS`)."""
    options = data_options or data_options_from(store)
    data = load_split(DataOptions(**{**vars(options), "task": options.task or spec.name}), split)
    if data.fingerprint != store.manifest["request"]["dataset_fingerprint"]:
        raise ProbingError(
            f"{store.path}: features were made from other data than the {split} split given "
            "(dataset fingerprint differs)"
        )
    by_id = {example.example_id: example for example in data.examples}
    missing = next((i for i in store.ids if i not in by_id), None)
    if missing is not None:
        raise ProbingError(f"{store.path}: example id {missing} has no entry in the {split} data (labels missing)")
    examples = [by_id[i] for i in store.ids]
    states, rows = store.load_rows(layer)
    return ProbeData(
        task=spec.name,
        split=split,
        features=probe_inputs(states, latents),
        targets=spec.head.targets(examples, str(store.path)),
        ids=list(store.ids),
        examples=examples,
        rows=rows,
    )


# The fields of a store's request that decide the stored values. Which layers a store holds, whether it also
# keeps ViT outputs, its shard size and batch size do not change a layer's values, so runs on the same layer
# of two such stores are the same run (configs sharing a workspace reuse each other's runs).
VALUE_FIELDS = (
    "format_version",
    "model",
    "task",
    "split",
    "dataset_fingerprint",
    "dtype",
    "vision_dtype",
    "qformer_dtype",
    "preprocessing",
    "text",
    "skip_bad_images",
    "vision_compiled",
    "rows",
)


def feature_identity(store: FeatureStore) -> dict[str, Any]:
    request = store.manifest["request"]
    return {key: request[key] for key in VALUE_FIELDS if key in request}


def open_stores(features_dir: Path, spec: TaskSpec, layer: int) -> dict[str, FeatureStore]:
    """The stores of every split of the task in `features_dir`, checked (manifests only: no features read)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise ProbingError(f"--features: {features_dir}: not a directory")
    stores = {split: open_store(features_dir / split, spec, split, layer) for split in spec.splits}
    return _one_model(stores, spec, str(features_dir))


def checked_stores(stores: dict[str, Any], spec: TaskSpec, layer: int) -> dict[str, Any]:
    """Stores handed over already open (features in memory, `probing.store.memory`), checked as `open_stores`
    checks those it opens."""
    missing = next((split for split in spec.splits if split not in stores), None)
    if missing is not None:
        raise ProbingError(f"no features for split '{missing}' of task '{spec.name}'")
    checked = {split: checked_store(stores[split], spec, split, layer) for split in spec.splits}
    return _one_model(checked, spec, "the features")


def _one_model(stores: dict[str, Any], spec: TaskSpec, where: str) -> dict[str, Any]:
    models = {split: store.manifest["request"]["model"] for split, store in stores.items()}
    if len({str(sorted(m.items())) for m in models.values()}) != 1:
        raise ProbingError(f"{where}: the stores of {', '.join(spec.splits)} come from different models")
    return stores


def load_probe_splits(
    stores: dict[str, FeatureStore],
    spec: TaskSpec,
    layer: int,
    data_options: DataOptions | None = None,
    control_seed: int | None = None,
    shuffled_features: bool = False,
    latents: str = "flatten",
) -> dict[str, ProbeData]:
    """ProbeData for every split: the layer's features aligned with their targets (with `control_seed`, the
    targets of the task's control, drawn from the train split's targets: `probing.tasks.controls`; with
    `shuffled_features`, the train and val examples reading a permutation of their rows: the floor)."""
    splits = {split: align(stores[split], spec, split, layer, data_options, latents) for split in spec.splits}
    if control_seed is not None:
        train = splits[TRAIN].examples
        for split, data in splits.items():
            data.targets = spec.control_targets(train, data.examples, control_seed, str(stores[split].path))
    if shuffled_features:
        for split in (TRAIN, "val"):
            data = splits[split]
            data.rows = shuffled_rows(len(data), data.rows)
    return splits
