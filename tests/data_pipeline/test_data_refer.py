"""The refer-layout reader on a tiny fake RefCOCO/RefCOCO+/G-Ref written in the real file layouts."""

import os
import pickle
import time

import cv2
import numpy as np
import pytest
from fake_refcoco import SPLITS, write_fake_refcoco
from pycocotools.coco import COCO

from data_pipeline import refer
from data_pipeline.preprocess import ExampleError, preprocess_eval, preprocess_train
from data_pipeline.refer import ReferSource, RefsFileError, UnsafeRefsError, load_refs
from wimfris_jax.errors import UserError


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refer"))
    return root, write_fake_refcoco(root, seed=0)


def _text(v):
    return bytes(v).decode() if isinstance(v, bytes) else v


@pytest.mark.parametrize("dataset, split_by", sorted(SPLITS))
def test_examples_match_refs_coco_masks_and_images(fake, dataset, split_by):
    root, info = fake
    coco = COCO(os.path.join(root, dataset, "instances.json"))  # the independent reference: COCO API
    refs = info["refs"][(dataset, split_by)]
    for split in SPLITS[(dataset, split_by)]:
        src = ReferSource(root, dataset, split_by, split)
        expected = [(r, s) for r in refs if _text(r["split"]) == split for s in r["sentences"]]  # file order
        assert len(src) == len(expected) > 0
        for i, (ref, sent) in enumerate(expected):
            ex = src[i]
            assert (ex["ref_id"], ex["ann_id"], ex["image_id"]) == (ref["ref_id"], ref["ann_id"], ref["image_id"])
            assert ex["sent_id"] == sent["sent_id"] and ex["sentence"] == sent["sent"]
            ann = coco.anns[ref["ann_id"]]
            np.testing.assert_array_equal(ex["mask"], coco.annToMask(ann))
            assert ex["mask"].dtype == np.uint8 and ex["mask"].max() == 1
            img = coco.imgs[ref["image_id"]]
            bgr = cv2.imread(os.path.join(info["image_dir"], img["file_name"]), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(ex["image"], cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            assert ex["image"].shape == (img["height"], img["width"], 3)


def test_rle_objects_grayscale_images_and_py2_strings(fake):
    root, info = fake
    kinds, gray = set(), 0
    for split in SPLITS[("refcoco+", "unc")]:
        src = ReferSource(root, "refcoco+", "unc", split, sentence_field="raw")
        anns = {a["id"]: a for a in info["anns"]}
        for i in range(len(src)):
            ex = src[i]
            seg = anns[ex["ann_id"]]["segmentation"]
            kinds.add("poly" if isinstance(seg, list) else type(seg["counts"]).__name__)
            gray += int(np.array_equal(ex["image"][..., 0], ex["image"][..., 1]))
            assert isinstance(ex["sentence"], str)
    assert kinds == {"poly", "list", "str"}  # polygons, uncompressed and compressed RLE all referred
    assert gray > 0
    refs = load_refs(os.path.join(root, "refcoco", "refs(unc).p"))
    assert all(isinstance(r["split"], str) and isinstance(r["file_name"], str) for r in refs)
    raws = {s["raw"] for r in refs for s in r["sentences"]}
    assert all(isinstance(t, str) for t in raws) and any("caf\u00e9" in t for t in raws)
    assert any(t.endswith("!") for t in raws)  # raw keeps punctuation, 'sent' does not


def test_object_unit_and_sentence_field(fake):
    root, info = fake
    refs = [r for r in info["refs"][("refcocog", "umd")] if _text(r["split"]) == "train"]
    src = ReferSource(root, "refcocog", "umd", "train", sentence_field="raw", unit="object")
    assert len(src) == len(refs)
    for i, ref in enumerate(refs):
        ex = src[i]
        assert ex["sentences"] == [_text(s["raw"]) for s in ref["sentences"]]
        assert ex["sentence"] == ex["sentences"][0] and ex["sent_id"] == ref["sentences"][0]["sent_id"]
    out = preprocess_train(src[0], image_size=64, mask_size=16, rng=np.random.default_rng(0))
    assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (16, 16)
    out = preprocess_eval(src[0], image_size=64, max_size=96)
    assert out["mask"].shape == (96, 96) and out["mask"].sum() == src[0]["mask"].sum()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(fake, tmp_path):
    path = tmp_path / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([{"ref_id": 1, "payload": _Evil()}], f, protocol=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: refusing to load class (posix|os)\.system"):
            load_refs(str(path))
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned").exists()
    with open(path, "wb") as f:
        pickle.dump({"not": "a list"}, f, protocol=2)
    with pytest.raises(RefsFileError, match="expected a list of ref dicts"):
        load_refs(str(path))


def test_missing_files_and_bad_arguments(fake, tmp_path):
    root, info = fake
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p.*refer"):
        ReferSource(str(tmp_path), "refcocog", "umd", "train", image_dir=info["image_dir"])
    with pytest.raises(FileNotFoundError, match="train2014"):
        ReferSource(str(tmp_path), "refcoco", "unc", "train")
    with pytest.raises(ValueError, match="has splits"):
        ReferSource(root, "refcoco", "unc", "test")
    with pytest.raises(ValueError, match="unknown dataset/split_by"):
        ReferSource(root, "refcoco+", "google", "train")
    src = ReferSource(root, "refcoco", "unc", "val")
    ex = src[0]
    name = src.images[ex["image_id"]]["file_name"]
    os.rename(os.path.join(info["image_dir"], name), os.path.join(info["image_dir"], name + ".bak"))
    try:
        with pytest.raises(ExampleError, match=rf"{name}.*'image_id': {ex['image_id']}"):
            src[0]
    finally:
        os.rename(os.path.join(info["image_dir"], name + ".bak"), os.path.join(info["image_dir"], name))
    assert repr(src) == repr(ReferSource(root, "refcoco", "unc", "val"))


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return str(path)


def test_memo_bomb_fails_fast_naming_the_file(tmp_path, monkeypatch):
    """A ~290-byte pickle of lists sharing their children 40 deep (2**40 paths) fails in well under 2 s."""
    x = []
    for _ in range(40):
        x = [x, x]
    path = _dump(tmp_path / "refs(unc).p", x)
    assert os.path.getsize(path) < 300
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: nested deeper than 32 levels") as e:
        load_refs(path)
    assert time.perf_counter() - t0 < 2.0
    assert isinstance(e.value, RefsFileError) and "\n" not in str(e.value)
    monkeypatch.setattr(refer, "MAX_DEPTH", 64)  # the expansion bound stops it on its own too
    t0 = time.perf_counter()
    with pytest.raises(RefsFileError, match=r"refs\(unc\)\.p: expands to more than [\d,]+ values"):
        load_refs(path)
    assert time.perf_counter() - t0 < 2.0


def test_shared_references_deep_nesting_size_and_sized_bytes_are_bounded(tmp_path):
    row = [{"ref_id": i, "ann_id": i, "image_id": 1, "split": "train", "sentences": []} for i in range(50)]
    path = _dump(tmp_path / "wide.p", [row] * 2000)  # 20 kB whose values, shared, count 1.2 million times
    with pytest.raises(RefsFileError, match=r"wide\.p: expands to more than [\d,]+ values.*pickle memo"):
        load_refs(path)
    deep = [{"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "train", "sentences": []}]
    for _ in range(33):
        deep = [deep]
    with pytest.raises(RefsFileError, match=r"deep\.p: nested deeper than 32 levels"):
        load_refs(_dump(tmp_path / "deep.p", deep))
    ok = _dump(tmp_path / "ok.p", [{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "sentences": ["a"] * 9}])
    assert load_refs(ok)[0]["sentences"] == ["a"] * 9  # a string shared through the memo is no amplification
    with pytest.raises(RefsFileError, match=rf"ok\.p: {os.path.getsize(ok):,} bytes, over the 64-byte limit"):
        load_refs(ok, max_bytes=64)
    bomb = b"\x80\x02c__builtin__\nbytes\nq\x00\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85q\x01Rq\x02."  # bytes(10**12)
    (tmp_path / "bomb.p").write_bytes(bomb)
    with pytest.raises(UnsafeRefsError, match=r"bomb\.p: refusing bytes\(1000000000000\)"):
        load_refs(str(tmp_path / "bomb.p"))
    (tmp_path / "text.p").write_bytes(b"hello")
    with pytest.raises(RefsFileError, match=r"text\.p: not a readable refs pickle"):
        load_refs(str(tmp_path / "text.p"))
