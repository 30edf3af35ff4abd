"""RefCOCO / RefCOCO+ / G-Ref through the tensorflow-datasets `ref_coco` builder (array_record, no TF to read).

Source: `tensorflow_datasets/datasets/ref_coco` (v1.1.0). The builder stores one record per image:
"image" (JPEG bytes), "image/id", "objects" (one per ref: COCO ann "id", "mask" PNG, "refexp" sequence
of {"raw", "refexp_id" = refer's sent_id}). Here records are read as raw bytes through
`tfds.data_source(..., deserialize_method=RAW_BYTES)`, parsed with tfds's own `tf_example_pb2`, and
flattened to one raw example per expression (or per object, `unit="object"`), decoding only the image
and the one mask needed. The builder keeps no ref_id: examples carry ref_id = -1. Sentences are refer's
'raw' strings (DETRIS trains on refer's normalised 'sent'; the CLIP tokenizer lower-cases both).

Building the dataset is :mod:`data_pipeline.build_tfds` (``python -m data_pipeline.build_tfds manual|build ...``,
docs/DATA.md). tensorflow_datasets is imported on first use (it is heavy and only this source needs it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.images import ExampleError, decode_image, decode_mask
from wimfris_jax.errors import UserError, one_line

CONFIGS = {  # tfds config -> (refer dataset, split_by, tfds splits)
    "refcoco_unc": ("refcoco", "unc", ("train", "validation", "testA", "testB")),
    "refcoco_google": ("refcoco", "google", ("train", "validation", "test")),
    "refcocoplus_unc": ("refcoco+", "unc", ("train", "validation", "testA", "testB")),
    "refcocog_umd": ("refcocog", "umd", ("train", "validation", "test")),
    "refcocog_google": ("refcocog", "google", ("train", "validation")),
}
_KEYS = ("image", "image/id", "objects/id", "objects/mask", "objects/refexp/raw/ragged_flat_values")


def parse_record(raw: bytes) -> dict[str, list]:
    """One serialized ``tf.train.Example`` record -> {feature key: list of values} (tfds's own protobuf, no TF)."""
    from tensorflow_datasets.proto import tf_example_pb2  # heavy (tensorflow_datasets): only for this source

    feats = tf_example_pb2.Example.FromString(raw).features.feature
    return {k: list(getattr(f, f.WhichOneof("kind")).value) if f.WhichOneof("kind") else [] for k, f in feats.items()}


class DatasetNotPrepared(UserError, FileNotFoundError):
    """A tfds dataset that is not built in the data directory looked in; the message says where and how to build it."""


def not_prepared(config: str, split: str, data_dir: str | None, error: BaseException) -> str:
    """The one line for a ``ref_coco/<config>`` split that cannot be opened: the folder looked in (tfds's default,
    ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets, when ``config.data.data_dir`` is unset), the build command and the
    docs section."""
    from tensorflow_datasets.core import constants

    where = data_dir or f"{constants.DATA_DIR} (tfds's default: config.data.data_dir is unset)"
    folder = data_dir or constants.DATA_DIR
    return (
        f"ref_coco/{config} split {split!r} is not prepared in {where} ({one_line(error, 120)}); build it with "
        f"`python -m data_pipeline.build_tfds build --config {config} --data-dir {folder} --manual-dir MANUAL_DIR` "
        "(docs/DATA.md, section 2b), or read the refer layout directly (--set data.name=refer, section 2a)"
    )


class RefCocoTfdsSource:
    """Random-access source over one split of a prepared tfds `ref_coco/<config>` (see module docstring).

    Example: {"image": uint8 (H, W, 3), "mask": uint8 (H, W) {0,1}, "sentence": str, "image_id", "ann_id",
    "ref_id" (= -1), "sent_id": int} (+ "sentences" when unit="object").
    """

    def __init__(self, config: str, split: str, data_dir: str, *, unit: str = "sentence"):
        import tensorflow_datasets as tfds  # heavy: only for this source (module docstring)
        from tensorflow_datasets.core import decode

        if config not in CONFIGS:
            raise ValueError(f"unknown ref_coco config {config!r}; valid: {sorted(CONFIGS)}")
        split = "validation" if split == "val" else split
        if split not in CONFIGS[config][2]:
            raise ValueError(f"ref_coco/{config} has splits {CONFIGS[config][2]}, not {split!r}")
        if unit not in ("sentence", "object"):
            raise ValueError(f"unit must be 'sentence' or 'object', got {unit!r}")
        self.config, self.split, self.data_dir, self.unit = config, split, data_dir, unit
        try:
            self._ds = tfds.data_source(
                f"ref_coco/{config}",
                split=split,
                data_dir=data_dir,
                download=False,
                deserialize_method=decode.DeserializeMethod.RAW_BYTES,
            )
        except Exception as e:
            raise DatasetNotPrepared(not_prepared(config, split, data_dir, e)) from e
        self._index: list[tuple[int, int, int]] = []
        for r in range(len(self._ds)):
            rec = parse_record(self._ds[r])
            if r == 0 and not all(k in rec for k in _KEYS):
                raise ValueError(f"ref_coco/{config} in {data_dir}: records lack {_KEYS} (unsupported tfds layout)")
            counts = rec.get("objects/refexp/raw/ragged_row_lengths_0", [])
            for o, n in enumerate(counts):
                self._index.extend((r, o, s) for s in range(n if unit == "sentence" else min(n, 1)))

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return (
            f"RefCocoTfdsSource(config={self.config!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"unit={self.unit!r})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        r, o, s = self._index[int(index)]
        rec = parse_record(self._ds[r])
        lengths = rec["objects/refexp/raw/ragged_row_lengths_0"]
        start = int(sum(lengths[:o]))
        texts = [t.decode("utf-8") for t in rec["objects/refexp/raw/ragged_flat_values"][start : start + lengths[o]]]
        sent_ids = rec["objects/refexp/refexp_id/ragged_flat_values"][start : start + lengths[o]]
        ids = {"image_id": int(rec["image/id"][0]), "ann_id": int(rec["objects/id"][o]), "ref_id": -1}
        name = f"ref_coco/{self.config}/{self.split} record {r}"
        image = decode_image(rec["image"][0], f"{name} (example {ids})")
        mask = decode_mask(rec["objects/mask"][o], f"{name} mask {o} (example {ids})")
        if mask is None or mask.shape != image.shape[:2]:
            got = None if mask is None else mask.shape
            raise ExampleError(f"ref_coco/{self.config} record {r}: bad mask {got} for image {image.shape} ({ids})")
        out = {"image": image, "mask": (mask > 0).astype(np.uint8), "sentence": texts[s], **ids}
        out["sent_id"] = int(sent_ids[s])
        if self.unit == "object":
            out["sentences"] = texts
        return out
