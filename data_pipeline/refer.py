"""Reader of the `lichengunc/refer` layout (RefCOCO, RefCOCO+, G-Ref) as a Grain random-access source.

Source: the refer API (`REFER`, `getMask`) and DETRIS/CRIS `tools/data_process.py`, which turn each ref
into one object mask and its sentences (`sent`, the lower-cased punctuation-free form) for training.

    <data_root>/<dataset>/refs(<split_by>).p   Python-2 pickle of the ref dicts (read without `pickle.load`:
                                               a restricted unpickler admits builtin containers/scalars only,
                                               and bounds the file size, nesting depth and expansion)
    <data_root>/<dataset>/instances.json       COCO images/annotations of those images, size-checked before it is
                                               parsed and checked field by field (:mod:`data_pipeline.instances`)
    <image_dir>/COCO_train2014_*.jpg           default <data_root>/images/mscoco/images/train2014

The object mask is the union of the annotation's polygons (or its RLE), decoded with pycocotools
(:func:`data_pipeline.instances.ann_to_mask`).
Examples follow the refs file order, one per sentence (`unit="sentence"`) or one per object
(`unit="object"`: "sentence" is the first sentence, "sentences" all of them, as DETRIS samples).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
from typing import Any

from data_pipeline.images import ExampleError, load_image
from data_pipeline.instances import ann_to_mask as ann_to_mask  # re-exported: its old home
from data_pipeline.instances import find_ref_entries, read_instances
from wimfris_jax.errors import UserError
from wimfris_jax.io import check_file_size

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
# it is reached, outnumber EXPANSION x its bytes reuses the pickle memo to build an exponential structure. The
# released files hold ~50k refs of at most a few tens of sentences each: a list or dict of more than MAX_ITEMS entries
# is refused before it is copied, a ref of more than MAX_SENTENCES sentences before the examples are indexed.
MAX_REFS_BYTES = 512 << 20
MAX_DEPTH = 32
EXPANSION = 2
MAX_ITEMS = 1_000_000
MAX_SENTENCES = 1000


class RefsFileError(UserError, ValueError):
    """A refs file that is too large, too deep, self-amplifying, unreadable, not a list of ref dicts or holding a ref
    with too many or malformed sentences, or a dataset / split_by / split that the refer layout does not have."""


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

    Raises RefsFileError, naming ``path``, when ``obj`` nests deeper than MAX_DEPTH, holds more than ``budget``
    values (a value reached through several shared references counts each time) or a container of more than
    MAX_ITEMS entries (naming the ref and its field), before doing that much work.
    """
    count, ref, field = 0, "?", "?"

    def walk(o: Any, depth: int) -> Any:
        nonlocal count, ref, field
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
        if isinstance(o, (dict, list, tuple, set, frozenset)) and len(o) > MAX_ITEMS:
            where = "the file" if depth == 0 else f"ref {ref!r:.40}" + (f", field {field!r:.40}" if depth > 1 else "")
            raise RefsFileError(
                f"{path}: {where} holds a {type(o).__name__} of {len(o):,} entries, over the {MAX_ITEMS:,}-entry limit"
            )
        if isinstance(o, dict):
            if depth == 1:
                ref = o.get(b"ref_id", o.get("ref_id", "?"))
            out = {}
            for k, v in o.items():
                key = walk(k, depth + 1)
                field = key if depth == 1 else field
                out[key] = walk(v, depth + 1)
            return out
        if isinstance(o, (list, tuple, set, frozenset)):
            return type(o)(walk(v, depth + 1) for v in o)
        return o

    return walk(obj, 0)


def load_refs(path: str, max_bytes: int = MAX_REFS_BYTES) -> list[dict[str, Any]]:
    """Reads a refer `refs(<split_by>).p` file (any pickle protocol, Python 2 or 3) with no code execution.

    Returns the ref dicts, byte strings decoded. Raises FileNotFoundError when the file is missing, UnsafeRefsError
    (an UnpicklingError) when it names a class or function, and RefsFileError when it is larger than
    ``max_bytes``, nests deeper than MAX_DEPTH, expands to more than EXPANSION values per byte, holds a container of
    more than MAX_ITEMS entries, is not a list of ref dicts, or holds a ref whose "sentences" is not a list of at most
    MAX_SENTENCES: each in one line naming the file (and the ref), before the work or memory such a file would take.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refs file not found: {path}; {_DOWNLOAD}")
    size = check_file_size(path, max_bytes, "a refs file", RefsFileError)
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
    for r in refs:
        bad = [k for k in ("ref_id", "ann_id", "image_id") if not isinstance(r[k], int)]
        if bad or not isinstance(r["split"], str):
            field = bad[0] if bad else "split"
            raise RefsFileError(f"{path}: ref {r['ref_id']!r:.40}, field {field!r} is a {type(r[field]).__name__}")
        sentences = r["sentences"]
        if not isinstance(sentences, list) or len(sentences) > MAX_SENTENCES:
            what = f"{len(sentences):,} sentences" if isinstance(sentences, list) else f"a {type(sentences).__name__}"
            raise RefsFileError(
                f"{path}: ref {r['ref_id']}, field 'sentences': {what}, not a list of at most {MAX_SENTENCES:,}"
            )
    return refs


def _check_sentences(path: str, ref: dict[str, Any], field: str) -> None:
    """RefsFileError naming the refs file ``path`` and the ref when one of its sentences is not a dict holding the
    text ``field`` (a str) and an integer ``sent_id``."""
    for k, s in enumerate(ref["sentences"]):
        if not isinstance(s, dict) or not isinstance(s.get(field), str) or not isinstance(s.get("sent_id"), int):
            raise RefsFileError(
                f"{path}: ref {ref['ref_id']}, sentences[{k}] is not a dict with a str {field!r} and an int 'sent_id'"
            )


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
        images, anns = read_instances(instances_path)
        self.images, self.anns = {}, {}  # those the split's refs name
        for r in self.refs:
            self.images[r["image_id"]], self.anns[r["ann_id"]] = find_ref_entries(instances_path, r, images, anns)
            _check_sentences(refs_path, r, sentence_field)
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
