"""The tfds `ref_coco` reader: built by the real builder (through the `python -m data_pipeline.build_tfds` command)
from the fake refer files, it yields the refer reader's examples; our raw-record parsing agrees with tfds's own
decoding."""

import importlib.util
import os

import numpy as np
import pytest
from fake_refcoco import write_fake_refcoco

from data_pipeline import build_tfds
from data_pipeline.build_tfds import build
from data_pipeline.refcoco import RefCocoTfdsSource, parse_record
from data_pipeline.refer import ReferSource

SPLITS = [("train", "train"), ("val", "validation"), ("testA", "testA"), ("testB", "testB")]
HAS_TF = importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refcoco"))
    refer, manual, tfds = (os.path.join(root, d) for d in ("refer", "manual", "tfds"))
    write_fake_refcoco(refer, seed=1)
    build_tfds.main(["manual", "--refer-root", refer, "--out", manual])
    build_tfds.main(
        ["build", "--config", "refcoco_unc", "--data-dir", tfds, "--manual-dir", manual, "--without-tensorflow"]
    )
    return root


def _by_sent_id(src):
    return {ex["sent_id"]: ex for ex in (src[i] for i in range(len(src)))}


def _assert_same_examples(a, b, same_ref_id=False):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        x, y = a[k], b[k]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
        for key in ("sentence", "image_id", "ann_id") + (("ref_id",) if same_ref_id else ()):
            assert x[key] == y[key], (k, key)


@pytest.mark.parametrize("refer_split, tfds_split", SPLITS)
def test_tfds_equals_refer_reader(fake, refer_split, tfds_split):
    refer = ReferSource(os.path.join(fake, "refer"), "refcoco", "unc", refer_split, sentence_field="raw")
    tfds_src = RefCocoTfdsSource("refcoco_unc", tfds_split, os.path.join(fake, "tfds"))
    assert len(tfds_src) == len(refer)
    ex = tfds_src[0]
    assert ex["ref_id"] == -1 and ex["mask"].dtype == np.uint8 and ex["image"].dtype == np.uint8
    expected = _by_sent_id(refer)
    for e in expected.values():
        e["ref_id"] = -1
    _assert_same_examples(_by_sent_id(tfds_src), expected, same_ref_id=True)


def test_raw_parsing_agrees_with_tfds_decoding(fake):
    import tensorflow_datasets as tfds

    decoded = tfds.data_source("ref_coco/refcoco_unc", split="train", data_dir=os.path.join(fake, "tfds"))
    ours = RefCocoTfdsSource("refcoco_unc", "train", os.path.join(fake, "tfds"), unit="object")
    objects = [(rec, o) for rec in (decoded[i] for i in range(len(decoded))) for o in range(len(rec["objects"]["id"]))]
    assert len(objects) == len(ours)
    for k, (rec, o) in enumerate(objects):
        ex = ours[k]
        np.testing.assert_array_equal(ex["image"], rec["image"])
        np.testing.assert_array_equal(ex["mask"], rec["objects"]["mask"][o][..., 0] > 0)
        assert ex["image_id"] == rec["image/id"] and ex["ann_id"] == rec["objects"]["id"][o]
        assert ex["sentences"] == [t.decode() for t in rec["objects"]["refexp"]["raw"][o]]
        assert ex["sent_id"] == rec["objects"]["refexp"]["refexp_id"][o][0]


def test_errors(fake, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown ref_coco config"):
        RefCocoTfdsSource("refcoco_umd", "train", os.path.join(fake, "tfds"))
    with pytest.raises(ValueError, match="has splits"):
        RefCocoTfdsSource("refcoco_unc", "test", os.path.join(fake, "tfds"))
    with pytest.raises(FileNotFoundError) as e:  # the folder looked in, the split, the build command, the docs
        RefCocoTfdsSource("refcocog_umd", "train", str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"ref_coco/refcocog_umd split 'train' is not prepared in {tmp_path} (") and "\n" not in msg
    assert f"python -m data_pipeline.build_tfds build --config refcocog_umd --data-dir {tmp_path}" in msg
    assert "docs/DATA.md, section 2b" in msg
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))  # config.data.data_dir unset: tfds's default
    monkeypatch.setattr("tensorflow_datasets.core.constants.DATA_DIR", str(tmp_path / "default"))
    with pytest.raises(FileNotFoundError, match=f"is not prepared in {tmp_path / 'default'} \\(tfds's default"):
        RefCocoTfdsSource("refcocog_umd", "validation", None)
    with pytest.raises(FileNotFoundError, match="refcoco.json missing"):
        build("refcoco_unc", str(tmp_path / "out"), str(tmp_path))


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed")
def test_build_without_tensorflow_names_the_install(fake, tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'wimfris_jax\[tf\]'"):
        build("refcoco_unc", str(tmp_path), os.path.join(fake, "manual"))


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow not installed: the official TF build is not cross-checked")
def test_official_tensorflow_build_gives_the_same_examples(fake, tmp_path):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.decode import DeserializeMethod

    RAW = DeserializeMethod.RAW_BYTES
    build("refcoco_unc", str(tmp_path), os.path.join(fake, "manual"))
    for _, split in SPLITS:  # the TF-free build writes the very same records, in the same order
        a, b = (
            tfds.data_source("ref_coco/refcoco_unc", split=split, data_dir=d, deserialize_method=RAW)
            for d in (str(tmp_path), os.path.join(fake, "tfds"))
        )
        assert len(a) == len(b) > 0 and all(parse_record(a[i]) == parse_record(b[i]) for i in range(len(a)))
    for _, split in SPLITS:
        a = RefCocoTfdsSource("refcoco_unc", split, str(tmp_path))
        b = RefCocoTfdsSource("refcoco_unc", split, os.path.join(fake, "tfds"))
        _assert_same_examples(_by_sent_id(a), _by_sent_id(b), same_ref_id=True)
