"""The synthetic set: every sentence singles out the right object, deterministically, and objects are visible."""

import cv2
import numpy as np
import pytest

from data_pipeline.synthetic import COLORS, SyntheticRefer, matching_objects


def test_sentences_match_exactly_the_right_object_over_1000_images():
    ds = SyntheticRefer(1000, image_size=128, seed=0)
    n_objects, words = set(), set()
    for i in range(len(ds)):
        s = ds.scene(i)
        objects = s["objects"]
        assert matching_objects(s["sentence"], objects, 128) == [s["target"]], (i, s["sentence"])
        assert matching_objects(s["distractor_sentence"], objects, 128) == [s["distractor"]], i
        assert s["distractor"] != s["target"]
        n_objects.add(len(objects))
        words.update(s["sentence"].split())
    assert n_objects == {2, 3, 4}
    # the grammar is exercised: colours, shapes, sizes and superlatives all occur
    assert {"red", "circle", "square", "triangle", "small", "large", "object", "leftmost", "bottommost"} <= words


def test_example_matches_its_scene_and_pixels():
    ds = SyntheticRefer(40, image_size=112, seed=3)
    for i in range(len(ds)):
        s, ex = ds.scene(i), ds[i]
        assert ex["image"].shape == (112, 112, 3) and ex["image"].dtype == np.uint8
        assert ex["mask"].shape == (112, 112) and ex["mask"].dtype == np.uint8 and set(np.unique(ex["mask"])) == {0, 1}
        np.testing.assert_array_equal(ex["mask"], s["object_masks"][s["target"]])
        assert ex["sentence"] == s["sentence"] and ex["distractor_sentence"] == s["distractor_sentence"]
        assert ex["ann_id"] == 16 * i + s["target"] and ex["image_id"] == ex["ref_id"] == ex["sent_id"] == i
        union = np.zeros((112, 112), int)
        for obj, m in zip(s["objects"], s["object_masks"]):
            union += m
            colour = ex["image"][m.astype(bool)].astype(float).mean(0)
            assert np.abs(colour - COLORS[obj["color"]]).max() <= 16, (i, obj["color"], colour)  # drawn colour
            ys, xs = np.nonzero(m)
            assert abs(xs.mean() - obj["cx"]) < 2 and abs(ys.mean() - obj["cy"]) < 3  # drawn where described
        assert union.max() == 1  # no overlap: every object fully visible


@pytest.mark.parametrize("size", [112, 128])
def test_objects_visible_at_one_fourteenth(size):
    ds = SyntheticRefer(60, image_size=size, seed=1)
    cells = size // 14
    for i in range(len(ds)):
        for m in ds.scene(i)["object_masks"]:
            assert m.sum() >= (size / cells) ** 2, i  # at least one 1/14 patch worth of pixels
            coverage = cv2.resize(m.astype(np.float32), (cells, cells), interpolation=cv2.INTER_AREA)
            assert coverage.max() >= 0.4, i  # and a large share of some patch


def test_deterministic_in_seed_and_index():
    a, b = SyntheticRefer(50, seed=7), SyntheticRefer(50, seed=7)
    for i in (13, 0, 49, 13):  # any access order
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
        assert x["sentence"] == y["sentence"]
    assert not np.array_equal(SyntheticRefer(50, seed=8)[13]["image"], a[13]["image"])
    assert not np.array_equal(a[12]["image"], a[13]["image"])
    assert SyntheticRefer(10, seed=7, max_objects=6)[3]["image"].shape == (128, 128, 3)
    assert repr(a) == repr(b)
    with pytest.raises(IndexError):
        a[50]


def test_checker_parses_and_rejects():
    objs = [
        dict(shape="circle", color="red", size="small", cx=10.0, cy=50.0),
        dict(shape="circle", color="blue", size="large", cx=60.0, cy=40.0),
        dict(shape="square", color="red", size="large", cx=100.0, cy=90.0),
    ]
    assert matching_objects("the red object", objs) == [0, 2]
    assert matching_objects("the small red circle", objs) == [0]
    assert matching_objects("the leftmost circle", objs, 128) == [0]
    assert matching_objects("the bottommost object", objs, 128) == [2]
    assert matching_objects("the topmost circle", objs, 128) == [0, 1]  # 10 px apart < margin: ambiguous
    assert matching_objects("the green triangle", objs) == []
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        matching_objects("a red circle", objs)
