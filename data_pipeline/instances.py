"""COCO ``instances.json`` files (the refer layout's, or COCO's own ``instances_train2014.json``), read and checked.

One reader for :class:`data_pipeline.refer.ReferSource` and :func:`data_pipeline.build_tfds.make_manual_dir`: the file
is size-checked before it is parsed (:data:`MAX_INSTANCES_BYTES`), and a file that is not a JSON object, lacks
``images`` or ``annotations``, or holds an entry without the fields the readers use, fails in one line naming the
file and the field, as does a ref that names an image or annotation the file does not have
(:func:`find_ref_entries`). :func:`ann_to_mask` draws an annotation's mask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data_pipeline.images import ExampleError
from wimfris_jax.errors import UserError
from wimfris_jax.io import MAX_JSON_BYTES, read_json_object

MAX_INSTANCES_BYTES = MAX_JSON_BYTES
# Fields each entry must have, and their JSON types (a COCO file has more; these are the ones the readers use).
IMAGE_FIELDS: dict[str, type | tuple[type, ...]] = {"id": int, "file_name": str, "height": int, "width": int}
ANNOTATION_FIELDS: dict[str, type | tuple[type, ...]] = {"id": int, "image_id": int, "segmentation": (list, dict)}


class InstancesFileError(UserError, ValueError):
    """An instances file that is too large, not a JSON object, lacks a field the readers use, or misses an image or
    annotation that a ref names; the message names the file and the field."""


def _entries(
    path: str, instances: Mapping[str, Any], field: str, needs: Mapping[str, type | tuple[type, ...]]
) -> list[dict[str, Any]]:
    """``instances[field]``, checked: a list of objects, each with the keys ``needs`` holding values of their types."""
    if field not in instances:
        raise InstancesFileError(f"{path}: no {field!r} field (a COCO instances file has 'images' and 'annotations')")
    entries = instances[field]
    if not isinstance(entries, list):
        raise InstancesFileError(f"{path}: field {field!r} holds a {type(entries).__name__}, not a list")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InstancesFileError(f"{path}: {field}[{k}] is a {type(entry).__name__}, not an object")
        missing = [n for n in needs if n not in entry]
        if missing:
            raise InstancesFileError(f"{path}: {field}[{k}] (id {entry.get('id', '?')!r}) lacks the field(s) {missing}")
        for name, kind in needs.items():
            if not isinstance(entry[name], kind) or isinstance(entry[name], bool):
                raise InstancesFileError(f"{path}: {field}[{k}].{name} is {_short(entry[name])}, not {_names(kind)}")
    return entries


def _short(value: Any) -> str:
    """A value for an error message, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(kind: type | tuple[type, ...]) -> str:
    """'int' or 'list or dict'."""
    return " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))


def read_instances(
    path: str, max_bytes: int = MAX_INSTANCES_BYTES
) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    """``({image id: image entry}, {annotation id: annotation entry})`` of the COCO instances file ``path``.

    Raises FileNotFoundError when it is missing and :class:`InstancesFileError` (one line naming the file, and the
    field at fault) when it is larger than ``max_bytes`` (before parsing), not a JSON object, or lacks ``images`` /
    ``annotations`` lists of objects with :data:`IMAGE_FIELDS` / :data:`ANNOTATION_FIELDS` (of those types).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instances file not found: {path}")
    instances = read_json_object(path, InstancesFileError, max_bytes)
    images = {im["id"]: im for im in _entries(path, instances, "images", IMAGE_FIELDS)}
    anns = {a["id"]: a for a in _entries(path, instances, "annotations", ANNOTATION_FIELDS)}
    return images, anns


def find_ref_entries(
    path: str, ref: Mapping[str, Any], images: Mapping[Any, Any], anns: Mapping[Any, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(image entry, annotation entry)`` of the refer ``ref``; :class:`InstancesFileError` naming the instances
    file ``path``, the field and the ref's id when the file has no such image or annotation."""
    for field, key, table in (("images", "image_id", images), ("annotations", "ann_id", anns)):
        if ref[key] not in table:
            raise InstancesFileError(
                f"{path}: field {field!r} has no id {ref[key]!r}, which ref {ref.get('ref_id', '?')} names ({key})"
            )
    return images[ref["image_id"]], anns[ref["ann_id"]]


def ann_to_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """uint8 {0,1} (h, w) union mask of a COCO annotation (polygons, uncompressed or compressed RLE).

    ExampleError naming the annotation when the segmentation has another format, or an RLE of another size than
    (h, w) (checked before decoding: the RLE's own size would decide the memory taken)."""
    seg = ann["segmentation"]
    if isinstance(seg, dict) and list(seg.get("size", ())) != [h, w]:
        raise ExampleError(f"annotation {ann.get('id')}: RLE size {seg.get('size')} does not match image size {(h, w)}")
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        rle = {"counts": counts, "size": list(seg["size"])}
    else:
        raise ExampleError(f"annotation {ann.get('id')}: unknown segmentation format {type(seg).__name__}")
    m = mask_utils.decode(rle)
    if m.shape != (h, w):
        raise ExampleError(f"annotation {ann.get('id')}: mask {m.shape} does not match image size {(h, w)}")
    return (m > 0).astype(np.uint8)
