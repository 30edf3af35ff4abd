"""Our resampling matrices reproduce torch.nn.functional.interpolate exactly (float64 -> 1e-10)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wimfris_jax.interpolate import resize_2d, resize_matrix

CASES = [
    # (in_h, in_w, kwargs for F.interpolate)
    (37, 37, dict(mode="bicubic", scale_factor=((32 + 0.1) / 37, (32 + 0.1) / 37))),  # torch-hub DINOv2 @448
    (37, 37, dict(mode="bicubic", size=(32, 32))),  # transformers Dinov2Model
    (37, 37, dict(mode="bicubic", size=(32, 32), antialias=True)),  # Dinov2WithRegistersModel
    (37, 37, dict(mode="bicubic", size=(46, 40), antialias=True)),  # upsampling with antialias
    (5, 7, dict(mode="bicubic", size=(9, 3))),
    (32, 32, dict(mode="bicubic", size=(448, 448), align_corners=True)),  # DETRIS mask upsampling
    (8, 6, dict(mode="bilinear", size=(16, 12))),  # projector x2
    (9, 9, dict(mode="bilinear", size=(4, 5), antialias=True)),
    (9, 9, dict(mode="bilinear", size=(20, 5), align_corners=True)),
]


@pytest.mark.parametrize("in_h,in_w,kw", CASES)
def test_matches_torch_interpolate(in_h, in_w, kw):
    x = np.random.default_rng(0).normal(size=(1, 3, in_h, in_w))
    ref = F.interpolate(torch.from_numpy(x), **kw).numpy()
    common = dict(mode=kw["mode"], align_corners=kw.get("align_corners", False), antialias=kw.get("antialias", False))
    if "size" in kw:
        mh = resize_matrix(in_h, kw["size"][0], **common)
        mw = resize_matrix(in_w, kw["size"][1], **common)
    else:
        mh = resize_matrix(in_h, scale_factor=kw["scale_factor"][0], **common)
        mw = resize_matrix(in_w, scale_factor=kw["scale_factor"][1], **common)
    ours = np.einsum("oh,bchw,pw->bcop", mh, x, mw)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_resize_2d_channels_last_jax():
    x = np.random.default_rng(1).normal(size=(2, 6, 5, 3)).astype(np.float32)
    mh, mw = resize_matrix(6, 12), resize_matrix(5, 10)
    ours = np.asarray(resize_2d(x, mh, mw))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(12, 10), mode="bicubic")
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        resize_matrix(4, 8, mode="nearest")
    with pytest.raises(ValueError, match="not both"):
        resize_matrix(4, 8, scale_factor=2.0)
