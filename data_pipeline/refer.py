"""Reader of the `lichengunc/refer` layout (RefCOCO, RefCOCO+, G-Ref) as a Grain random-access source.

Source: the refer API (`REFER`, `getMask`) and DETRIS/CRIS `tools/data_process.py`, which turn each ref
into one object mask and its sentences (`sent`, the lower-cased punctuation-free form) for training.

    <data_root>/<dataset>/refs(<split_by>).p   Python-2 pickle of the ref dicts (read without `pickle.load`:
                                               a restricted unpickler admits builtin containers/scalars only,
                                               and bounds the file size, nesting depth and expansion)
    <data_root>/<dataset>/instances.json       COCO images/annotations of those images
    <image_dir>/COCO_train2014_*.jpg           default <data_root>/images/mscoco/images/train2014

The object mask is the union of the annotation's polygons (or its RLE), decoded with pycocotools.
Examples follow the refs file order, one per sentence (`unit="sentence"`) or one per object
(`unit="object"`: "sentence" is the first sentence, "sentences" all of them, as DETRIS samples).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data_pipeline.preprocess import ExampleError, load_image
from wimfris_jax.errors import UserError

VALID = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
_DOWNLOAD = (
    "download and unzip <dataset>.zip (refcoco, refcoco+, refcocog) from the lichengunc/refer data page into "
    "the data root, and COCO train2014 images into <data_root>/images/mscoco/images/train2014 (see docs/DATA.md)"
)
_SAFE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool", "complex"})
_SIZED = {"bytes": bytes, "bytearray": bytearray}  # admitted, but never from a size: bytes(10**12) is 20 bytes
# Bounds of what a refs file may hold. The refer files are tens of MB, a list of dicts of lists at most ~6 deep,
# and every value in them costs at least one byte of pickle; a file whose values, counting a shared one each time
# it is reached, outnumber EXPANSION x its bytes reuses the pickle memo to build an exponential structure.
MAX_REFS_BYTES = 512 << 20
MAX_DEPTH = 32
EXPANSION = 2


class RefsFileError(UserError, ValueError):
    """A refs file that is too large, too deep, self-amplifying, unreadable or not a list of ref dicts, or a
    dataset / split_by / split that the refer layout does not have."""


class UnsafeRefsError(RefsFileError, pickle.UnpicklingError):
    """A refs file that names a class or function beyond builtin containers and scalars."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no class except builtin containers and scalars."""

    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module in ("builtins", "__builtin__") and name in _SIZED:
            return self._unsized(_SIZED[name])
        raise UnsafeRefsError(f"{self._path}: refusing to load class {module}.{name} (only plain data allowed)")

    def _unsized(self, cls: type) -> Any:
        """``cls`` called with data (``bytes(b"..")``, ``bytes("..", "latin-1")``) but not with a size."""

        def make(*args: Any) -> Any:
            if args and isinstance(args[0], int):
                raise UnsafeRefsError(f"{self._path}: refusing {cls.__name__}({args[0]}) (a size, not data)")
            return cls(*args)

        return make


def _to_str(obj: Any, path: str, budget: int) -> Any:
    """Python-2 byte strings -> str (UTF-8, else Latin-1), recursively; other values unchanged.

    Raises RefsFileError, naming ``path``, when ``obj`` nests deeper than MAX_DEPTH or holds more than ``budget``
    values (a value reached through several shared references counts each time), before doing that much work.
    """
    count = 0

    def walk(o: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > budget:
            raise RefsFileError(
                f"{path}: expands to more than {budget:,} values, {EXPANSION}x its size (shared references "
                "reused through the pickle memo); not a refs file"
            )
        if depth > MAX_DEPTH:
            raise RefsFileError(f"{path}: nested deeper than {MAX_DEPTH} levels; not a refs file")
        if isinstance(o, bytes):
            try:
                return o.decode("utf-8")
            except UnicodeDecodeError:
                return o.decode("latin-1")
        if isinstance(o, dict):
            return {walk(k, depth + 1): walk(v, depth + 1) for k, v in o.items()}
        if isinstance(o, (list, tuple, set, frozenset)):
            return type(o)(walk(v, depth + 1) for v in o)
        return o

    return walk(obj, 0)


def load_refs(path: str, max_bytes: int = MAX_REFS_BYTES) -> list[dict[str, Any]]:
    """Reads a refer `refs(<split_by>).p` file (any pickle protocol, Python 2 or 3) with no code execution.

    Returns the ref dicts, byte strings decoded. Raises FileNotFoundError when the file is missing, UnsafeRefsError
    (an UnpicklingError) when it names a class or function, and RefsFileError when it is larger than
    ``max_bytes``, nests deeper than MAX_DEPTH, expands to more than EXPANSION values per byte, or is not a list
    of ref dicts: each in one line naming the file, before the work or memory such a file would take.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refs file not found: {path}; {_DOWNLOAD}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RefsFileError(f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit of a refs file")
    with open(path, "rb") as f:
        try:
            refs = _RestrictedUnpickler(f, path).load()
        except UnsafeRefsError:
            raise
        except Exception as e:
            raise RefsFileError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e})") from e
    refs = _to_str(refs, path, EXPANSION * size + 1024)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise RefsFileError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
        missing = [r.get("ref_id", "?") for r in refs if key not in r]
        if missing:
            raise RefsFileError(f"{path}: refs {missing[:5]} lack the key {key!r}")
    return refs


def ann_to_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """uint8 {0,1} (h, w) union mask of a COCO annotation (polygons, uncompressed or compressed RLE)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        rle = {"counts": counts, "size": list(seg["size"])}
    else:
        raise ValueError(f"annotation {ann.get('id')}: unknown segmentation format {type(seg).__name__}")
    m = mask_utils.decode(rle)
    if m.shape != (h, w):
        raise ValueError(f"annotation {ann.get('id')}: mask {m.shape} does not match image size {(h, w)}")
    return (m > 0).astype(np.uint8)


def default_image_dir(data_root: str) -> str:
    """The COCO train2014 folder under `data_root` (refer layout first, then DETRIS's, then flat)."""
    candidates = [
        os.path.join(data_root, "images", "mscoco", "images", "train2014"),
        os.path.join(data_root, "images", "train2014"),
        os.path.join(data_root, "train2014"),
    ]
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise FileNotFoundError(
        f"COCO train2014 image folder not found; tried {candidates}. Pass image_dir=..., or {_DOWNLOAD}"
    )


class ReferSource:
    """Random-access source over one split of a refer-layout dataset (see module docstring).

    Example: {"image": uint8 (H, W, 3), "mask": uint8 (H, W) {0,1}, "sentence": str, "image_id", "ann_id",
    "ref_id", "sent_id": int} (+ "sentences": list[str] when unit="object"; "sent_id" is then the first's).
    """

    def __init__(
        self,
        data_root: str,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "train",
        image_dir: str | None = None,
        *,
        sentence_field: str = "sent",
        unit: str = "sentence",
    ):
        if (dataset, split_by) not in VALID:
            raise RefsFileError(f"unknown dataset/split_by {dataset!r}/{split_by!r}; valid: {sorted(VALID)}")
        if split not in VALID[(dataset, split_by)]:
            raise RefsFileError(f"{dataset}({split_by}) has splits {VALID[(dataset, split_by)]}, not {split!r}")
        if sentence_field not in ("sent", "raw"):
            raise ValueError(f"sentence_field must be 'sent' (DETRIS) or 'raw', got {sentence_field!r}")
        if unit not in ("sentence", "object"):
            raise ValueError(f"unit must be 'sentence' or 'object', got {unit!r}")
        self.data_root, self.dataset, self.split_by, self.split = data_root, dataset, split_by, split
        self.sentence_field, self.unit = sentence_field, unit
        self.image_dir = image_dir if image_dir is not None else default_image_dir(data_root)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image_dir {self.image_dir} does not exist; {_DOWNLOAD}")
        refs_path = os.path.join(data_root, dataset, f"refs({split_by}).p")
        self.refs = [r for r in load_refs(refs_path) if r["split"] == split]
        instances_path = os.path.join(data_root, dataset, "instances.json")
        if not os.path.isfile(instances_path):
            raise FileNotFoundError(f"instances file not found: {instances_path}; {_DOWNLOAD}")
        with open(instances_path) as f:
            instances = json.load(f)
        needed_anns = {r["ann_id"] for r in self.refs}
        self.anns = {a["id"]: a for a in instances["annotations"] if a["id"] in needed_anns}
        self.images = {im["id"]: im for im in instances["images"]}
        for r in self.refs:
            if r["ann_id"] not in self.anns:
                raise ValueError(f"{instances_path}: annotation {r['ann_id']} of ref {r['ref_id']} is missing")
            if r["image_id"] not in self.images:
                raise ValueError(f"{instances_path}: image {r['image_id']} of ref {r['ref_id']} is missing")
        if unit == "sentence":
            self._index = [(k, j) for k, r in enumerate(self.refs) for j in range(len(r["sentences"]))]
        else:
            self._index = [(k, 0) for k, r in enumerate(self.refs) if r["sentences"]]

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return (
            f"ReferSource(data_root={self.data_root!r}, dataset={self.dataset!r}, split_by={self.split_by!r}, "
            f"split={self.split!r}, image_dir={self.image_dir!r}, sentence_field={self.sentence_field!r}, "
            f"unit={self.unit!r})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, j = self._index[int(index)]
        ref = self.refs[k]
        info = self.images[ref["image_id"]]
        sentences = [s[self.sentence_field] for s in ref["sentences"]]
        ids = {"image_id": int(ref["image_id"]), "ann_id": int(ref["ann_id"]), "ref_id": int(ref["ref_id"])}
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            image = load_image(path)
        except ExampleError as e:
            raise ExampleError(f"{e} (example {ids})") from e
        h, w = int(info["height"]), int(info["width"])
        if image.shape[:2] != (h, w):
            raise ExampleError(f"{path}: image is {image.shape[:2]}, instances.json says {(h, w)} (example {ids})")
        out = {
            "image": image,
            "mask": ann_to_mask(self.anns[ref["ann_id"]], h, w),
            "sentence": sentences[j],
            **ids,
            "sent_id": int(ref["sentences"][j]["sent_id"]),
        }
        if self.unit == "object":
            out["sentences"] = sentences
        return out
