"""The one builder of data sources, for training and evaluation: ``build_source(config.data, split)``.

``config.data.name`` picks the reader:

- ``"refcoco_tfds"``: tensorflow-datasets ``ref_coco/<config.data.tfds_config>`` (:class:`RefCocoTfdsSource`);
- ``"refer"``: the refer layout under ``config.data.data_root`` for ``config.data.dataset`` /
  ``config.data.split_by`` (:class:`ReferSource`);
- ``"synthetic"``: the offline synthetic referring set (:class:`SyntheticRefer`): ``num_train`` scenes for
  "train", ``num_val`` fresh scenes for any evaluation split, each split with its own seed.

The dataset-dependent fields are set together by the config's argument (configs/common.py ``DATASETS``), so the
tfds config and the refer names always name the same dataset. Training reads one example per object (``unit=
"object"``, the transform draws one of its sentences, as DETRIS trains); evaluation one per expression.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.refcoco import RefCocoTfdsSource
from data_pipeline.refer import ReferSource
from data_pipeline.synthetic import SyntheticRefer
from wimfris_jax.errors import UserError

NAMES = ("refcoco_tfds", "refer", "synthetic")
SYNTHETIC_SPLIT_SEEDS = {"train": 0, "val": 1, "validation": 1, "test": 2, "testA": 3, "testB": 4}


class SourceError(UserError, ValueError):
    """A data config that names no source, or a split the source does not have."""


def build_source(data_config: Any, split: str, *, unit: str | None = None) -> Any:
    """The random-access source of ``split`` ("train", "val", "testA", ...) that ``config.data`` names.

    ``unit``: "object" or "sentence"; default "object" for "train", "sentence" otherwise.
    """
    name = data_config.get("name", "synthetic")
    unit = unit or ("object" if split == "train" else "sentence")
    if name == "synthetic":
        if split not in SYNTHETIC_SPLIT_SEEDS:
            raise SourceError(f"synthetic data: unknown split {split!r}; choose from {sorted(SYNTHETIC_SPLIT_SEEDS)}")
        seed = int(data_config.get("seed", 0))
        size = int(data_config.get("num_train", 1000)) if split == "train" else int(data_config.get("num_val", 200))
        if split != "train":
            seed += 1000 * SYNTHETIC_SPLIT_SEEDS[split]  # evaluation scenes disjoint from the training seed
        return SyntheticRefer(size, image_size=int(data_config.get("raw_size", 128)), seed=seed)
    if name == "refer":
        return ReferSource(data_config.data_root, data_config.dataset, data_config.split_by, split, unit=unit)
    if name == "refcoco_tfds":
        return RefCocoTfdsSource(data_config.tfds_config, split, data_config.get("data_dir"), unit=unit)
    raise SourceError(f"config.data.name={name!r}: choose one of {NAMES}")
