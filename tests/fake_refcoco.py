"""Writes a tiny fake RefCOCO / RefCOCO+ / G-Ref in the real file layouts, for the tests (``from fake_refcoco import
write_fake_refcoco``: pytest puts tests/ on the path, as for tests/toy_model.py).

Layout (the `lichengunc/refer` one, read by `data_pipeline.refer.ReferSource`):

    <root>/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg ...
    <root>/refcoco/instances.json, refs(unc).p, refs(google).p
    <root>/refcoco+/instances.json, refs(unc).p
    <root>/refcocog/instances.json, refs(umd).p, refs(google).p

`instances.json` has COCO fields (images, annotations with polygon, multi-polygon, uncompressed-RLE crowd
and compressed-RLE segmentations, categories); `refs(...).p` are protocol-2 pickles of the refer ref dicts
(ref_id, ann_id, image_id, split, category_id, file_name, sent_ids, sentences[{raw, sent, tokens, sent_id}])
with Python-2 byte strings in places, as in the released files. Referred objects of refcoco and refcocog
are polygons (as in the real data, and the tfds builder cannot merge RLE); refcoco+ also refers to RLE
objects. Images include grayscale and portrait JPEGs. Everything is a function of `seed`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from data_pipeline.instances import ann_to_mask

# (dataset, split_by) -> splits, as in the released refer files
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
_WORDS = ("man", "woman", "dog", "Cat", "left", "RIGHT", "red", "shirt", "big", "tiny", "caf\u00e9", "pizza")


class _Py2Str(bytes):
    """Pickled as a Python-2 `str` (SHORT_BINSTRING), as the released refs files store ASCII strings."""

    def __reduce_ex__(self, protocol):  # pragma: no cover - only the pickler calls this
        raise TypeError("handled by _Py2Pickler")


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit Python-2 string opcodes
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def dump_py2_pickle(obj: Any, path: str) -> None:
    """Pickles `obj` with protocol 2, writing `_Py2Str` values as Python-2 byte strings."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _uncompressed_rle(m: np.ndarray) -> dict[str, Any]:
    flat = m.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(m.shape[0]), int(m.shape[1])]}


def _polygon(rng: np.random.Generator, h: int, w: int) -> list[float]:
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    n = int(rng.integers(3, 7))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.1, 0.3, n) * min(h, w)
    xs, ys = np.clip(cx + rad * np.cos(ang), 0, w - 1), np.clip(cy + rad * np.sin(ang), 0, h - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _sentence(rng: np.random.Generator) -> tuple[str, str]:
    words = [_WORDS[int(i)] for i in rng.integers(len(_WORDS), size=int(rng.integers(1, 5)))]
    raw = " ".join(words) + ("!" if rng.random() < 0.3 else "")
    sent = " ".join(w.lower() for w in words)  # refer's 'sent': lower-cased, punctuation stripped
    return raw, sent


def _images(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    sizes = [(48, 64), (64, 48), (40, 40), (56, 72), (50, 66), (36, 60), (60, 44), (44, 52)]
    return [{"id": 9 + 7 * k, "height": sizes[k % len(sizes)][0], "width": sizes[k % len(sizes)][1]} for k in range(n)]


def write_fake_refcoco(root: str, *, seed: int = 0, num_images: int = 8) -> dict[str, Any]:
    """Writes the fake set under `root` (see module docstring).

    Returns {"image_dir", "images", "anns", "refs": {(dataset, split_by): list of ref dicts as pickled}}.
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    os.makedirs(image_dir, exist_ok=True)
    images, anns = [], []
    for k, info in enumerate(_images(rng, num_images)):
        h, w = info["height"], info["width"]
        info["file_name"] = f"COCO_train2014_{info['id']:012d}.jpg"
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels = cv2.GaussianBlur(pixels, (5, 5), 0)
        if k == 2:  # a grayscale JPEG, as a few COCO images are
            ok, enc = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY))
        else:
            ok, enc = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        assert ok
        with open(os.path.join(image_dir, info["file_name"]), "wb") as f:
            f.write(enc.tobytes())
        images.append(info)
        for j in range(3):
            ann_id = 1000 * info["id"] + j
            if j == 0:
                seg: Any = [_polygon(rng, h, w)]
            elif j == 1:
                seg = [_polygon(rng, h, w), _polygon(rng, h, w)]  # two parts, possibly overlapping
            else:
                m = np.zeros((h, w), np.uint8)
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                m[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
                if k % 2:
                    seg = _uncompressed_rle(m)
                else:
                    seg = mask_utils.encode(np.asfortranarray(m))
                    seg = {"counts": seg["counts"].decode("ascii"), "size": [h, w]}
            rle = mask_utils.encode(np.asfortranarray(ann_to_mask({"id": ann_id, "segmentation": seg}, h, w)))
            area = int(mask_utils.area(rle))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": info["id"],
                    "category_id": int(1 + (k + j) % 3),
                    "segmentation": seg,
                    "area": area,
                    "bbox": [x, y, bw, bh],
                    "iscrowd": int(j == 2),
                }
            )
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in ((1, "person"), (2, "dog"), (3, "cat"))]
    instances = {"images": images, "annotations": anns, "categories": categories}
    all_refs = {}
    for (dataset, split_by), splits in SPLITS.items():
        os.makedirs(os.path.join(root, dataset), exist_ok=True)
        with open(os.path.join(root, dataset, "instances.json"), "w") as f:
            json.dump(instances, f)
        refs = _refs(rng, dataset, split_by, splits, images, anns)
        dump_py2_pickle(refs, os.path.join(root, dataset, f"refs({split_by}).p"))
        all_refs[(dataset, split_by)] = refs
    return {"image_dir": image_dir, "images": images, "anns": anns, "refs": all_refs}


def _refs(rng, dataset, split_by, splits, images, anns) -> list[dict[str, Any]]:
    refs, sent_id = [], 100 * (1 + list(SPLITS).index((dataset, split_by)))
    by_image = {img["id"]: [a for a in anns if a["image_id"] == img["id"]] for img in images}
    for k, img in enumerate(images):
        split = splits[k % len(splits)]
        for ann in by_image[img["id"]]:
            is_rle = isinstance(ann["segmentation"], dict)
            if is_rle and dataset != "refcoco+":
                continue  # real referred objects are polygons
            sentences = []
            for _ in range(int(rng.integers(1, 4))):
                raw, sent = _sentence(rng)
                sentences.append(
                    {
                        "tokens": [_Py2Str(t.encode()) if t.isascii() else t for t in sent.split()],
                        "raw": raw if not raw.isascii() else _Py2Str(raw.encode()),
                        "sent_id": sent_id,
                        "sent": sent,
                    }
                )
                sent_id += 1
            refs.append(
                {
                    "ref_id": len(refs) + 5,
                    "ann_id": ann["id"],
                    "image_id": img["id"],
                    "split": _Py2Str(split.encode()),
                    "category_id": ann["category_id"],
                    "file_name": _Py2Str(img["file_name"][:-4].encode() + f"_{ann['id']}.jpg".encode()),
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                }
            )
    order = rng.permutation(len(refs))  # released files are not sorted by image
    return [refs[i] for i in order]
