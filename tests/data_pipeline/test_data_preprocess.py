"""Preprocessing equals DETRIS's RefDataset (cv2 letterbox + torch normalisation + nearest mask resize)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.preprocess import (
    MEAN,
    STD,
    ExampleError,
    letterbox_matrix,
    load_image,
    normalize,
    preprocess_eval,
    preprocess_train,
)
from data_pipeline.tokenizer import tokenize

SIZES = [(480, 640), (640, 427), (333, 500), (448, 448), (37, 100), (120, 41)]


def _example(h, w, seed=0, sentence="the man on the left"):
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 3), (max(w // 4, 2), max(h // 5, 2)), 20, 0, 360, 1, -1)
    return {"image": image, "mask": mask, "sentence": sentence, "image_id": 7, "ann_id": 8, "ref_id": 9, "sent_id": 10}


def _detris(img, mask, size=448):
    """DETRIS utils/dataset.py RefDataset (train branch + val's inverse), restated with cv2 and torch."""
    ori_h, ori_w = img.shape[:2]
    scale = min(size / ori_h, size / ori_w)
    new_h, new_w = ori_h * scale, ori_w * scale
    bx, by = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [ori_w, 0], [0, ori_h]], np.float32)
    dst = np.array([[bx, by], [new_w + bx, by], [bx, new_h + by]], np.float32)
    mat, mat_inv = cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)
    border = [0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255]
    img = cv2.warpAffine(img, mat, (size, size), flags=cv2.INTER_CUBIC, borderValue=border)
    m = cv2.warpAffine(mask * 255, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0) / 255.0
    t = torch.from_numpy(img.transpose((2, 0, 1))).float()
    t.div_(255.0).sub_(torch.tensor(MEAN.tolist()).reshape(3, 1, 1)).div_(torch.tensor(STD.tolist()).reshape(3, 1, 1))
    m = torch.from_numpy(m).float()
    m128 = F.interpolate(m[None, None], size=(128, 128), mode="nearest")[0, 0]  # segmenter.py's mask resize
    return t.permute(1, 2, 0).numpy(), m128.numpy(), mat_inv


@pytest.mark.parametrize("hw", SIZES)
def test_train_equals_detris(hw):
    ex = _example(*hw)
    out = preprocess_train(ex)
    ref_img, ref_mask, _ = _detris(ex["image"], ex["mask"])
    assert out["image"].dtype == np.float32 and out["image"].shape == (448, 448, 3)
    assert out["mask"].dtype == np.float32 and out["mask"].shape == (128, 128)
    np.testing.assert_array_equal(out["image"], ref_img)
    np.testing.assert_array_equal(out["mask"], ref_mask)
    np.testing.assert_array_equal(out["ids"], tokenize(ex["sentence"], 17)[0])
    soft_pixels = ((out["mask"] > 0) & (out["mask"] < 1)).sum()
    assert out["mask"].sum() > 0 and (soft_pixels > 0) == (hw != (448, 448))  # resampled => soft edges


def test_train_small_sizes_and_soft_mask_range():
    ex = _example(90, 60)
    out = preprocess_train(ex, image_size=112, word_len=22, mask_size=28)
    assert out["image"].shape == (112, 112, 3) and out["mask"].shape == (28, 28) and out["ids"].shape == (22,)
    assert out["mask"].min() >= 0 and out["mask"].max() <= 1
    # the padding band (left/right for a portrait image) is the mean colour, i.e. ~0 after normalisation
    assert np.abs(out["image"][:, :5]).max() < 0.01


def test_sentence_drawn_with_rng_for_object_examples():
    ex = _example(50, 60)
    ex["sentences"] = ["the red car", "a blue bus", "green tree"]
    drawn = {tuple(preprocess_train(ex, rng=np.random.default_rng(s))["ids"]) for s in range(30)}
    assert drawn == {tuple(tokenize(t, 17)[0]) for t in ex["sentences"]}
    assert tuple(preprocess_train(ex)["ids"]) == tuple(tokenize(ex["sentence"], 17)[0])  # no rng: "sentence"


@pytest.mark.parametrize("hw", SIZES[:4] + [(37, 100)])
def test_eval_record(hw):
    ex = _example(*hw)
    out = preprocess_eval(ex)
    ref_img, _, ref_inv = _detris(ex["image"], ex["mask"])
    np.testing.assert_array_equal(out["image"], ref_img)
    assert out["inv_matrix"].dtype == np.float32 and out["inv_matrix"].shape == (2, 3)
    np.testing.assert_allclose(out["inv_matrix"], ref_inv, rtol=1e-6, atol=1e-5)
    fwd = letterbox_matrix(*hw, 448)
    np.testing.assert_allclose(out["inv_matrix"], cv2.invertAffineTransform(fwd), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["orig_size"], np.array(hw, np.int32))
    h, w = hw
    assert out["mask"].dtype == np.uint8 and out["mask"].shape == (640, 640)
    np.testing.assert_array_equal(out["mask"][:h, :w], ex["mask"])
    assert out["mask"][h:].sum() == 0 and out["mask"][:, w:].sum() == 0
    # forward warp then inverse warp gives back the original mask (the metric's path)
    soft = cv2.warpAffine(ex["mask"].astype(np.float32), fwd, (448, 448), flags=cv2.INTER_LINEAR)
    back = cv2.warpAffine(soft, out["inv_matrix"].astype(np.float64), (w, h), flags=cv2.INTER_CUBIC) > 0.5
    inter, union = (back & (ex["mask"] > 0)).sum(), (back | (ex["mask"] > 0)).sum()
    assert inter / union > 0.9


def test_letterbox_matrix_maps_corners():
    m = letterbox_matrix(300, 600, 448)  # landscape: full width, centred vertically
    corners = np.array([[0, 0, 1], [600, 300, 1]], np.float64) @ m.T
    np.testing.assert_allclose(corners, [[0, 112], [448, 336]], atol=1e-4)


def test_normalize_constants():
    x = normalize(np.full((2, 2, 3), 255, np.uint8))
    np.testing.assert_allclose(x[0, 0], (1 - MEAN) / STD, rtol=1e-6)
    np.testing.assert_allclose(MEAN, [0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(STD, [0.26862954, 0.26130258, 0.27577711])


def test_errors_name_the_example():
    with pytest.raises(ExampleError, match=r"image_id=7, ann_id=8, ref_id=9, sent_id=10"):
        preprocess_train(_example(40, 40, sentence="  \t "))
    with pytest.raises(ExampleError, match=r"700x500 exceeds max_size=640.*image_id=7"):
        preprocess_eval(_example(700, 500))
    bad = _example(40, 40)
    bad["mask"] = bad["mask"][:30]
    with pytest.raises(ExampleError, match=r"mask shape .* image_id=7"):
        preprocess_train(bad)


def _save(tmp_path, name, pil_image, fmt, **kw):
    path = tmp_path / name
    pil_image.save(path, format=fmt, **kw)
    return str(path)


def test_load_image_formats(tmp_path):
    rng = np.random.default_rng(1)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (24, 31, 3), dtype=np.uint8), (5, 5), 0)
    gray = rgb[..., 0].copy()

    out = load_image(_save(tmp_path, "g.png", Image.fromarray(gray), "PNG"))
    assert out.shape == (24, 31, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    rgba = np.concatenate([rgb, rng.integers(0, 256, (24, 31, 1), dtype=np.uint8)], -1)
    np.testing.assert_array_equal(load_image(_save(tmp_path, "a.png", Image.fromarray(rgba), "PNG")), rgb)

    pal = Image.fromarray(rgb).quantize(16)
    np.testing.assert_array_equal(load_image(_save(tmp_path, "p.png", pal, "PNG")), np.asarray(pal.convert("RGB")))

    cmyk_path = _save(tmp_path, "c.jpg", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    out = load_image(cmyk_path)
    assert out.shape == (24, 31, 3) and np.abs(out.astype(int) - rgb).mean() < 4  # not inverted / not garbage

    g16 = rng.integers(0, 65536, (24, 31)).astype(np.uint16)
    out = load_image(_save(tmp_path, "16.png", Image.fromarray(g16), "PNG"))
    assert out.shape == (24, 31, 3) and np.abs(out[..., 0].astype(int) - g16 / 257.0).max() <= 1.0

    f32 = rng.uniform(0, 255, (24, 31)).astype(np.float32)  # OpenCV cannot read this: PIL fallback
    out = load_image(_save(tmp_path, "f.tif", Image.fromarray(f32), "TIFF"))
    np.testing.assert_array_equal(out[..., 2], np.round(f32).astype(np.uint8))


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ExampleError, match="broken.jpg"):
        load_image(str(bad))
    with pytest.raises(ExampleError, match="missing.jpg"):
        load_image(str(tmp_path / "missing.jpg"))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ExampleError, match="empty.png"):
        load_image(str(empty))
