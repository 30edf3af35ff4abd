"""DETRIS's scoring: IoU bookkeeping on hand-made masks, post-processing geometry and parity."""

import cv2
import numpy as np
import pytest

from wimfris_jax.metrics import RefMetrics, format_table, intersection_union, postprocess


def _letterbox(orig_hw, size):
    """DETRIS's letterbox matrices (utils/dataset.py getTransformMat, restated): (forward, inverse)."""
    h, w = orig_hw
    s = min(size / h, size / w)
    bx, by = (size - w * s) / 2, (size - h * s) / 2
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [w * s + bx, by], [bx, h * s + by]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def test_intersection_union_by_hand():
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True  # 4 pixels
    gt = np.zeros((4, 4), np.uint8)
    gt[1:3, 1:3] = 255  # 4 pixels, overlap 1 (non-zero = object)
    assert intersection_union(pred, gt) == (1, 7)
    assert intersection_union(np.zeros((4, 4)), gt) == (0, 4)  # empty prediction
    assert intersection_union(pred, np.zeros((4, 4))) == (0, 4)  # empty ground truth
    assert intersection_union(np.zeros((4, 4)), np.zeros((4, 4))) == (0, 0)
    with pytest.raises(ValueError, match=r"\(4, 4\) and ground truth \(4, 5\)"):
        intersection_union(pred, np.zeros((4, 5)))


def test_ref_metrics_by_hand():
    m = RefMetrics()
    assert m.update_iu(3, 4) == pytest.approx(0.75)
    m.update_iu(0, 5)  # empty prediction
    m.update_iu(9, 10)  # IoU = 9 / (10 + 1e-6) = 0.8999999 -> not > 0.9
    m.update_iu(0, 0)  # empty prediction of an empty mask scores 0, as in DETRIS
    r = m.compute()
    assert r["n"] == 4
    assert r["mIoU"] == pytest.approx((0.75 + 0 + 0.9 + 0) / 4, abs=1e-6)
    assert r["oIoU"] == pytest.approx(12 / 19)
    assert (r["Prec@0.5"], r["Prec@0.6"], r["Prec@0.7"], r["Prec@0.8"], r["Prec@0.9"]) == (0.5, 0.5, 0.5, 0.25, 0.0)
    with pytest.raises(ValueError, match="I <= U"):
        m.update_iu(5, 4)
    with pytest.raises(ValueError, match="no expression"):
        RefMetrics().compute()


def test_precision_is_strict_at_detris_float32_thresholds():
    m = RefMetrics()
    m.update_iu(8, 10)  # 0.79999992: not > float32(0.8) = 0.80000001
    m.update_iu(700_000, 1_000_000)  # 0.6999999999993 > float32(0.7) = 0.69999999 (DETRIS counts it)
    m.update_iu(7, 10)  # 0.69999993 < 0.69999999: not counted
    r = m.compute()
    assert r["Prec@0.8"] == 0.0 and r["Prec@0.7"] == pytest.approx(2 / 3) and r["Prec@0.6"] == 1.0


def test_update_from_masks_and_merge():
    a, b = RefMetrics(), RefMetrics()
    gt = np.zeros((5, 5), np.float32)
    gt[:2] = 1.0
    assert a.update(gt > 0, gt) == pytest.approx(1.0, abs=1e-6)
    b.update(np.zeros_like(gt, bool), gt)
    r = a.merge(b).compute()
    assert r["n"] == 2 and r["mIoU"] == pytest.approx(0.5, abs=1e-6) and r["oIoU"] == pytest.approx(0.5)


def test_format_table():
    r = {"mIoU": 0.7512, "oIoU": 0.7, "Prec@0.5": 1, "Prec@0.6": 0.5, "Prec@0.7": 0, "Prec@0.8": 0, "Prec@0.9": 0}
    t = format_table({"val": {**r, "n": 10834}, "testA": {**r, "n": 5657}})
    lines = t.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["split", "mIoU", "oIoU"]
    assert lines[1].split() == ["val", "75.12", "70.00", "100.00", "50.00", "0.00", "0.00", "0.00", "10834"]
    assert lines[2].startswith("testA")


def test_postprocess_letterbox_rectangle_lands_on_original_rectangle():
    orig, size = (60, 100), 40  # scale 0.4, content rows 8..31 of the 40 x 40 letterbox
    _, inv = _letterbox(orig, size)
    logits = np.full((size, size), -10.0, np.float32)
    logits[12:20, 10:30] = 10.0  # rectangle in letterbox space (rows 12..19, cols 10..29)
    pred = postprocess(logits, inv, orig, image_size=size)
    assert pred.shape == orig and pred.dtype == bool
    # Original pixel (y, x) reads letterbox (0.4 y + 8, 0.4 x): well inside the rectangle <=> y in [10, 27.5],
    # x in [25, 72.5]. Allow one letterbox pixel (2.5 original pixels) of interpolation blur at the edges.
    ys, xs = np.mgrid[0:60, 0:100]
    ly, lx = 0.4 * ys + 8, 0.4 * xs
    inside = (ly >= 12 + 1) & (ly <= 19 - 1) & (lx >= 10 + 1) & (lx <= 29 - 1)
    outside = (ly <= 12 - 1) | (ly >= 19 + 1) | (lx <= 10 - 1) | (lx >= 29 + 1)
    assert pred[inside].all() and not pred[outside].any()
    assert abs(int(pred.sum()) - 20 * 50) <= 150  # 8 x 20 letterbox pixels = 20 x 50 original pixels


def test_postprocess_matches_detris_pipeline():
    import torch

    rng = np.random.default_rng(0)
    orig, size = (37, 53), 32
    _, inv = _letterbox(orig, size)
    logits = (rng.normal(size=(8, 8)) * 3).astype(np.float32)
    prob = torch.sigmoid(torch.from_numpy(logits))[None, None]
    up = torch.nn.functional.interpolate(prob, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
    warped = cv2.warpAffine(up, inv, (orig[1], orig[0]), flags=cv2.INTER_CUBIC, borderValue=0.0)
    want = warped > 0.35
    got = postprocess(logits, inv, orig, image_size=size)
    near = np.abs(warped - 0.35) < 1e-5  # float rounding may flip pixels right at the threshold
    np.testing.assert_array_equal(got[~near], want[~near])
    assert 0.1 < want.mean() < 0.9
