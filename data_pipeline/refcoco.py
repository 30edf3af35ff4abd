"""RefCOCO / RefCOCO+ / G-Ref through the tensorflow-datasets `ref_coco` builder (array_record, no TF to read).

Source: `tensorflow_datasets/datasets/ref_coco` (v1.1.0). The builder stores one record per image:
"image" (JPEG bytes), "image/id", "objects" (one per ref: COCO ann "id", "mask" PNG, "refexp" sequence
of {"raw", "refexp_id" = refer's sent_id}). Here records are read as raw bytes through
`tfds.data_source(..., deserialize_method=RAW_BYTES)`, parsed with tfds's own `tf_example_pb2`, and
flattened to one raw example per expression (or per object, `unit="object"`), decoding only the image
and the one mask needed. The builder keeps no ref_id: examples carry ref_id = -1. Sentences are refer's
'raw' strings (DETRIS trains on refer's normalised 'sent'; the CLIP tokenizer lower-cases both).

Building needs the refer files converted to the builder's manual `refcoco.json` (`make_manual_dir`, our
equivalent of tfds's `manual_download_process.py`) and TensorFlow (`pip install 'wimfris_jax[tf]'`);
`build(..., without_tensorflow=True)` instead patches the one TF call of tfds 4.9's serializer.
CLI: `python -m data_pipeline.refcoco manual|build ...` (docs/DATA.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import json
import os
import sys
from typing import Any
from unittest import mock

import cv2
import numpy as np

from data_pipeline.preprocess import ExampleError, decode_image
from data_pipeline.refer import VALID, load_refs

CONFIGS = {  # tfds config -> (refer dataset, split_by, tfds splits)
    "refcoco_unc": ("refcoco", "unc", ("train", "validation", "testA", "testB")),
    "refcoco_google": ("refcoco", "google", ("train", "validation", "test")),
    "refcocoplus_unc": ("refcoco+", "unc", ("train", "validation", "testA", "testB")),
    "refcocog_umd": ("refcocog", "umd", ("train", "validation", "test")),
    "refcocog_google": ("refcocog", "google", ("train", "validation")),
}
_TF_FIX = "pip install 'wimfris_jax[tf]'  (tensorflow-cpu; only building needs it, reading does not)"
_KEYS = ("image", "image/id", "objects/id", "objects/mask", "objects/refexp/raw/ragged_flat_values")


def _parse(raw: bytes) -> dict[str, list]:
    from tensorflow_datasets.proto import tf_example_pb2

    feats = tf_example_pb2.Example.FromString(raw).features.feature
    return {k: list(getattr(f, f.WhichOneof("kind")).value) if f.WhichOneof("kind") else [] for k, f in feats.items()}


class RefCocoTfdsSource:
    """Random-access source over one split of a prepared tfds `ref_coco/<config>` (see module docstring).

    Example: {"image": uint8 (H, W, 3), "mask": uint8 (H, W) {0,1}, "sentence": str, "image_id", "ann_id",
    "ref_id" (= -1), "sent_id": int} (+ "sentences" when unit="object").
    """

    def __init__(self, config: str, split: str, data_dir: str, *, unit: str = "sentence"):
        import tensorflow_datasets as tfds
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
            raise FileNotFoundError(
                f"ref_coco/{config} is not prepared under {data_dir} ({type(e).__name__}: {e}); build it first: "
                "python -m data_pipeline.refcoco build ... (docs/DATA.md)"
            ) from e
        self._index: list[tuple[int, int, int]] = []
        for r in range(len(self._ds)):
            rec = _parse(self._ds[r])
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
        rec = _parse(self._ds[r])
        lengths = rec["objects/refexp/raw/ragged_row_lengths_0"]
        start = int(sum(lengths[:o]))
        texts = [t.decode("utf-8") for t in rec["objects/refexp/raw/ragged_flat_values"][start : start + lengths[o]]]
        sent_ids = rec["objects/refexp/refexp_id/ragged_flat_values"][start : start + lengths[o]]
        ids = {"image_id": int(rec["image/id"][0]), "ann_id": int(rec["objects/id"][o]), "ref_id": -1}
        image = decode_image(rec["image"][0], f"ref_coco/{self.config}/{self.split} record {r} (example {ids})")
        mask = cv2.imdecode(np.frombuffer(rec["objects/mask"][o], np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != image.shape[:2]:
            got = None if mask is None else mask.shape
            raise ExampleError(f"ref_coco/{self.config} record {r}: bad mask {got} for image {image.shape} ({ids})")
        out = {"image": image, "mask": (mask > 0).astype(np.uint8), "sentence": texts[s], **ids}
        out["sent_id"] = int(sent_ids[s])
        if self.unit == "object":
            out["sentences"] = texts
        return out


def make_manual_dir(
    refer_root: str, out_dir: str, image_dir: str | None = None, coco_instances: str | None = None
) -> str:
    """Writes `<out_dir>/refcoco.json` (+ a `coco_train2014` link) for the tfds builder; returns out_dir.

    Reads every refs file present under `refer_root` (refer layout). The per-image COCO annotation lists
    come from `coco_instances` (e.g. instances_train2014.json) or else from the datasets' instances.json.
    """
    refs, instance_files = [], []
    for dataset, split_by in VALID:
        path = os.path.join(refer_root, dataset, f"refs({split_by}).p")
        if not os.path.isfile(path):
            continue
        anns_path = os.path.join(refer_root, dataset, "instances.json")
        instance_files.append(anns_path)
        with open(anns_path) as f:
            anns = {a["id"]: a for a in json.load(f)["annotations"]}
        for ref in load_refs(path):
            if ref["ann_id"] not in anns:
                raise ValueError(f"{anns_path}: annotation {ref['ann_id']} of ref {ref['ref_id']} is missing")
            refs.append({**ref, "ann": anns[ref["ann_id"]], "dataset": dataset, "dataset_partition": split_by})
    if not refs:
        raise FileNotFoundError(f"no refs(<split_by>).p files under {refer_root}/<refcoco|refcoco+|refcocog>/")
    images, by_image = {}, {}
    for path in [coco_instances] if coco_instances else instance_files:
        with open(path) as f:
            inst = json.load(f)
        images.update({im["id"]: im for im in inst["images"]})
        for a in inst["annotations"]:
            by_image.setdefault(a["image_id"], {})[a["id"]] = a
    needed = sorted({r["image_id"] for r in refs})
    coco_anns = {str(i): {"info": images[i], "anns": list(by_image.get(i, {}).values())} for i in needed}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "refcoco.json"), "w") as f:
        json.dump({"ref": refs, "coco_anns": coco_anns}, f)
    link = os.path.join(out_dir, "coco_train2014")
    if not os.path.exists(link):
        from data_pipeline.refer import default_image_dir

        os.symlink(os.path.abspath(image_dir or default_image_dir(refer_root)), link)
    return out_dir


def build(config: str, data_dir: str, manual_dir: str, *, without_tensorflow: bool = False) -> None:
    """Prepares `ref_coco/<config>` as array_record under `data_dir` from a manual dir (see make_manual_dir)."""
    import tensorflow_datasets as tfds

    if config not in CONFIGS:
        raise ValueError(f"unknown ref_coco config {config!r}; valid: {sorted(CONFIGS)}")
    if not os.path.isfile(os.path.join(manual_dir, "refcoco.json")):
        raise FileNotFoundError(f"{manual_dir}/refcoco.json missing: run `python -m data_pipeline.refcoco manual`")
    if not without_tensorflow:
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"building tfds ref_coco needs TensorFlow: {_TF_FIX}; or pass without_tensorflow=True "
                "(--without-tensorflow)"
            ) from e
    builder = tfds.builder(f"ref_coco/{config}", data_dir=data_dir, file_format="array_record")
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("importlib_resources") is None:
            # tfds 4.9 imports the `importlib_resources` backport unconditionally but declares it only for
            # Python < 3.9; the standard library's importlib.resources serves the same purpose here.
            stack.enter_context(mock.patch.dict(sys.modules, {"importlib_resources": importlib.resources}))
        if without_tensorflow:
            from tensorflow_datasets.core.features import feature as feature_lib

            # tfds 4.9's ragged serializer asks TensorInfo.dtype (a tf.DType) where the NumPy dtype suffices.
            stack.enter_context(
                mock.patch.object(feature_lib.TensorInfo, "dtype", property(lambda self: self.np_dtype))
            )
        builder.download_and_prepare(download_config=dl_config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.refcoco", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manual", help="refer layout -> tfds manual dir (refcoco.json + coco_train2014 link)")
    m.add_argument("--refer-root", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--image-dir")
    m.add_argument("--coco-instances", help="instances_train2014.json (optional)")
    b = sub.add_parser("build", help="prepare ref_coco/<config> (array_record)")
    b.add_argument("--config", required=True, choices=sorted(CONFIGS))
    b.add_argument("--data-dir", required=True)
    b.add_argument("--manual-dir", required=True)
    b.add_argument("--without-tensorflow", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "manual":
        print(make_manual_dir(a.refer_root, a.out, a.image_dir, a.coco_instances))
    else:
        build(a.config, a.data_dir, a.manual_dir, without_tensorflow=a.without_tensorflow)


if __name__ == "__main__":
    main()
