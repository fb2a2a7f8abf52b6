"""Features and targets of train / val / test, checked against each other before any training.

A frozen run reads `--features DIR` holding one feature store per split (`DIR/train`, `DIR/val`,
`DIR/test`, as written by `probing extract --out DIR/<split>`) and the task's data for the targets: the
data options given, or else the paths each store's manifest recorded. Refused, with one line each: a store
made for another task or split, a layer the store lacks, stores from different models, a store made from
other data than the targets (dataset fingerprint), an example id without a target.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probing.data import SPLITS, DataOptions, Example, load_split
from probing.errors import ProbingError
from probing.features import FeatureStore
from probing.train import ProbeData


def data_options_from(store: FeatureStore, task: str) -> DataOptions:
    """The data options a store was extracted from (its manifest records them)."""
    recorded = store.manifest.get("data_options")
    if not recorded:
        raise ProbingError(f"{store.path}: the manifest does not say where its data is; pass the data options")
    return DataOptions(**{k: (v if k == "task" else Path(v)) for k, v in recorded.items()} | {"task": task})


def targets_for(task: str, examples: list[Example], where: str) -> torch.Tensor:
    if task == "refcocog":
        missing = next((e for e in examples if e.box is None), None)
        if missing is not None:
            raise ProbingError(f"{where}: example {missing.example_id} has no target box")
        return torch.tensor([e.box for e in examples], dtype=torch.float32)
    missing = next((e for e in examples if e.label is None), None)
    if missing is not None:
        raise ProbingError(f"{where}: example {missing.example_id} has no label")
    return torch.tensor([e.label for e in examples], dtype=torch.float32)


def open_store(path: Path, task: str, split: str, layer: int) -> FeatureStore:
    if not path.is_dir():
        raise ProbingError(f"{path}: no feature store for split '{split}' (expected --features DIR/{split})")
    store = FeatureStore(path)
    request = store.manifest["request"]
    if request["task"] != task:
        raise ProbingError(f"{path}: features of task '{request['task']}', not '{task}'")
    if request["split"] != split:
        raise ProbingError(f"{path}: features of split '{request['split']}', not '{split}'")
    if layer not in store.layers:
        raise ProbingError(f"{path}: layer {layer} is not in the store (it has {store.layers})")
    return store


def align(store: FeatureStore, task: str, split: str, layer: int, data_options: DataOptions | None) -> ProbeData:
    """Features of `layer` with their targets, in store order."""
    options = data_options or data_options_from(store, task)
    data = load_split(options, split)
    if data.fingerprint != store.manifest["request"]["dataset_fingerprint"]:
        raise ProbingError(f"{store.path}: features were made from other data than the {split} split given "
                           "(dataset fingerprint differs)")
    by_id = {example.example_id: example for example in data.examples}
    missing = next((i for i in store.ids if i not in by_id), None)
    if missing is not None:
        raise ProbingError(f"{store.path}: example id {missing} has no entry in the {split} data (labels missing)")
    examples = [by_id[i] for i in store.ids]
    features = store.load(layer).flatten(1)
    return ProbeData(task=task, split=split, features=features, targets=targets_for(task, examples, str(store.path)),
                     ids=list(store.ids), examples=examples)


# The fields of a store's request that decide the stored values. Which layers a store holds, whether it also
# keeps ViT outputs, its shard size and batch size do not change a layer's values, so runs on the same layer
# of two such stores are the same run (configs sharing a workspace reuse each other's runs).
VALUE_FIELDS = ("format_version", "model", "task", "split", "dataset_fingerprint", "dtype", "vision_dtype",
                "qformer_dtype", "preprocessing", "text", "skip_bad_images", "vision_compiled")


def feature_identity(store: FeatureStore) -> dict:
    request = store.manifest["request"]
    return {key: request[key] for key in VALUE_FIELDS if key in request}


def open_stores(features_dir: Path, task: str, layer: int) -> dict[str, FeatureStore]:
    """The train / val / test stores of `features_dir`, checked (manifests only: no features read yet)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise ProbingError(f"--features: {features_dir}: not a directory")
    stores = {split: open_store(features_dir / split, task, split, layer) for split in SPLITS}
    models = {split: store.manifest["request"]["model"] for split, store in stores.items()}
    if len({str(sorted(m.items())) for m in models.values()}) != 1:
        raise ProbingError(f"{features_dir}: the train, val and test stores come from different models")
    return stores


def load_probe_splits(stores: dict[str, FeatureStore], task: str, layer: int,
                      data_options: DataOptions | None = None) -> dict[str, ProbeData]:
    """ProbeData for train / val / test: the layer's features aligned with their targets."""
    return {split: align(stores[split], task, split, layer, data_options) for split in SPLITS}
