"""The refer-layout reader bounds what it reads and names the file and field at fault, in one line, on a fake RefCOCO
in the real layout: an instances.json that is too large, not JSON, not an object, lacks or mistypes a field, or misses
an image / annotation a ref names; a refs file with an absurd number of sentences or a malformed ref."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
from fake_refcoco import write_fake_refcoco

from data_pipeline import refer
from data_pipeline.instances import InstancesFileError, ann_to_mask, read_instances
from data_pipeline.preprocess import ExampleError
from data_pipeline.refer import ReferSource, RefsFileError, load_refs
from wimfris_jax.errors import UserError
from wimfris_jax.io import read_json_object


@pytest.fixture
def fake(tmp_path):
    root = str(tmp_path / "refer")
    info = write_fake_refcoco(root, seed=0, num_images=2)
    with open(os.path.join(root, "refcoco", "instances.json")) as f:
        instances = json.load(f)
    return root, info, instances


def _one_line_error(root: str, error: type[Exception] = UserError) -> str:
    with pytest.raises(error) as e:
        ReferSource(root, "refcoco", "unc", "train")
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, UserError)
    return message


def _train_ref(info) -> dict:
    return next(r for r in info["refs"][("refcoco", "unc")] if bytes(r["split"]) == b"train")


def _without(items: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in item.items() if k != key} for item in items]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda inst, ref: "{not json", r"instances\.json is not valid JSON: JSONDecodeError"),
        (lambda inst, ref: b"\xff\xfe\x00garbage", r"instances\.json is not valid JSON: UnicodeDecodeError"),
        (lambda inst, ref: [inst], r"instances\.json holds a list, not a JSON object"),
        (lambda inst, ref: {"images": inst["images"]}, r"instances\.json: no 'annotations' field"),
        (lambda inst, ref: {"annotations": inst["annotations"]}, r"instances\.json: no 'images' field"),
        (lambda inst, ref: {**inst, "annotations": {}}, r"field 'annotations' holds a dict, not a list"),
        (lambda inst, ref: {**inst, "images": [3]}, r"instances\.json: images\[0\] is a int, not an object"),
        (
            lambda inst, ref: {**inst, "images": _without(inst["images"], "file_name")},
            r"instances\.json: images\[0\] \(id 9\) lacks the field\(s\) \['file_name'\]",
        ),
        (
            lambda inst, ref: {**inst, "images": [{**inst["images"][0], "height": "48"}]},
            r"instances\.json: images\[0\]\.height is '48', not int",
        ),
        (
            lambda inst, ref: {**inst, "annotations": [a for a in inst["annotations"] if a["id"] != ref["ann_id"]]},
            r"instances\.json: field 'annotations' has no id {ann_id}, which ref {ref_id} names \(ann_id\)",
        ),
        (
            lambda inst, ref: {**inst, "images": [i for i in inst["images"] if i["id"] != ref["image_id"]]},
            r"instances\.json: field 'images' has no id {image_id}, which ref {ref_id} names \(image_id\)",
        ),
    ],
)
def test_bad_instances_file_fails_in_one_line_naming_file_and_field(fake, edit, message):
    root, info, instances = fake
    ref = _train_ref(info)
    value = edit(copy.deepcopy(instances), ref)
    path = os.path.join(root, "refcoco", "instances.json")
    if isinstance(value, (str, bytes)):
        with open(path, "wb") as f:
            f.write(value.encode() if isinstance(value, str) else value)
    else:
        with open(path, "w") as f:
            json.dump(value, f)
    got = _one_line_error(root)
    assert got.startswith(path) and re.search(message.format(**ref), got), got


def test_instances_and_json_sizes_are_checked_before_parsing(fake, monkeypatch):
    root, _, _ = fake
    path = os.path.join(root, "refcoco", "instances.json")
    size = os.path.getsize(path)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("parsed a file over the limit"))
    with pytest.raises(InstancesFileError) as e:
        read_instances(path, max_bytes=1000)
    assert str(e.value) == f"{path}: {size:,} bytes, over the 1,000-byte limit of a JSON file"
    with pytest.raises(ValueError, match=rf"{size:,} bytes, over the 999-byte limit of a JSON file"):
        read_json_object(path, ValueError, max_bytes=999)  # the shared JSON reader (configs, HF configs, ...)


def test_deeply_nested_json_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match=r"deep\.json is not valid JSON: nested too deeply to parse"):
        read_json_object(path)


def _refs_path(root: str) -> str:
    return os.path.join(root, "refcoco", "refs(unc).p")


def _write_refs(root: str, refs: list[dict]) -> str:
    with open(_refs_path(root), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return _refs_path(root)


def test_ref_with_an_absurd_number_of_sentences_is_refused(fake, monkeypatch):
    """10^8 sentences in one ref (a 96 MB file) took > 6 GB: refused by count, naming the ref and the field."""
    root, info, _ = fake
    refs = load_refs(_refs_path(root))
    ref = refs[0]
    ref["sentences"] = [copy.deepcopy(ref["sentences"][0]) for _ in range(refer.MAX_SENTENCES + 1)]
    path = _write_refs(root, refs)
    want = f"{path}: ref {ref['ref_id']}, field 'sentences': 1,001 sentences, not a list of at most 1,000"
    assert _one_line_error(root, RefsFileError) == want
    # a container over MAX_ITEMS is refused before it is copied (the 10^8 case), here with the bound lowered
    monkeypatch.setattr(refer, "MAX_ITEMS", 500)
    ref["sentences"] = [None] * 600
    path = _write_refs(root, refs)
    want = f"{path}: ref {ref['ref_id']}, field 'sentences' holds a list of 600 entries, over the 500-entry limit"
    assert _one_line_error(root, RefsFileError) == want
    path = _write_refs(root, [refs[1]] * 501)
    with pytest.raises(RefsFileError, match=r"refs\(unc\)\.p: the file holds a list of 501 entries, over the 500"):
        load_refs(path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sentences", "the dog", r"field 'sentences': a str, not a list of at most 1,000"),
        ("sentences", [{"sent_id": 1}], r"sentences\[0\] is not a dict with a str 'sent' and an int 'sent_id'"),
        ("sentences", ["the dog"], r"sentences\[0\] is not a dict with a str 'sent'"),
        ("ann_id", [1, 2], r"field 'ann_id' is a list"),
    ],
)
def test_malformed_ref_names_the_refs_file_and_ref(fake, field, value, message):
    root, info, _ = fake
    refs = load_refs(_refs_path(root))
    target = next(r for r in refs if r["split"] == "train")
    target[field] = value
    path = _write_refs(root, refs)
    got = _one_line_error(root, RefsFileError)
    assert got.startswith(f"{path}: ref {target['ref_id']}") and re.search(message, got), got


def test_rle_of_another_size_is_refused_before_decoding():
    ann = {"id": 5, "segmentation": {"counts": "0", "size": [100_000, 100_000]}}  # would decode to 10 GB
    with pytest.raises(ExampleError, match=r"annotation 5: RLE size \[100000, 100000\] does not match .* \(10, 12\)"):
        ann_to_mask(ann, 10, 12)
    ok = {"id": 6, "segmentation": {"counts": [30, 90], "size": [10, 12]}}
    assert ann_to_mask(ok, 10, 12).sum() == 90 and ann_to_mask(ok, 10, 12).dtype == np.uint8
