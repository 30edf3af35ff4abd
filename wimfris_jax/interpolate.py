"""PyTorch's ``F.interpolate`` (bilinear / bicubic, with and without antialias) as exact resampling matrices.

Checkpoints from PyTorch bake in how PyTorch resamples: DINOv2 interpolates its position table with
bicubic (Keys a = -0.75) and, depending on the source, a ``scale_factor`` with an offset or a ``size``, with
antialias on or off; DETRIS upsamples its mask probabilities with ``align_corners=True``. ``jax.image.resize``
implements none of these (its cubic is Keys a = -0.5), so features would drift by up to ~1e-2.

Sizes are static, so the 1-D weights are built in numpy once per trace and applied with an einsum: exact
(to float rounding), differentiable, and free of gathers. Separable 2-D resizing applies one matrix per axis,
as PyTorch does; :func:`bilinear_resize` is the channels-last shorthand the TFANet and VIPA decoders and losses use.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

_A_TORCH = -0.75  # PyTorch's non-antialiased bicubic (OpenCV's value too)
_A_PIL = -0.5  # PyTorch's antialiased bicubic follows PIL


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
    )


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


@functools.lru_cache(maxsize=256)
def resize_matrix(
    in_size: int,
    out_size: int | None = None,
    *,
    mode: str = "bicubic",
    align_corners: bool = False,
    scale_factor: float | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """The (out, in) float64 matrix ``W`` such that ``W @ x`` equals ``F.interpolate`` along one axis.

    Args:
      in_size: input length.
      out_size: output length; with ``scale_factor`` it may be None and is then ``floor(in * scale)``.
      mode: "bicubic" or "bilinear".
      align_corners: PyTorch's flag.
      scale_factor: when given (and ``out_size`` None), PyTorch maps coordinates with ``1 / scale_factor``
        rather than ``in / out`` — the torch-hub DINOv2 offset trick relies on this.
      antialias: PyTorch's antialiased kernels (PIL-style support scaling and, for bicubic, a = -0.5).
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    if out_size is None:
        if scale_factor is None:
            raise ValueError("give out_size or scale_factor")
        out_size = int(math.floor(in_size * scale_factor))
    elif scale_factor is not None:
        raise ValueError("give out_size or scale_factor, not both")
    # PyTorch's area_pixel_compute_scale.
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
        scale = 1.0 / scale_factor if scale_factor else in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if antialias:
        return _antialias_matrix(in_size, out_size, scale, mode, align_corners)
    src = rows * scale if align_corners else (rows + 0.5) * scale - 0.5
    if mode == "bilinear":
        if not align_corners:
            src = np.maximum(src, 0.0)
        x0 = np.floor(src).astype(int)
        lam = src - x0
        x0 = np.minimum(x0, in_size - 1)
        x1 = np.minimum(x0 + 1, in_size - 1)
        np.add.at(w, (rows, x0), 1.0 - lam)
        np.add.at(w, (rows, x1), lam)
        return w
    x0 = np.floor(src).astype(int)
    t = src - x0
    for k in range(-1, 3):
        idx = np.clip(x0 + k, 0, in_size - 1)
        np.add.at(w, (rows, idx), _cubic(t - k, _A_TORCH))
    return w


def _antialias_matrix(in_size: int, out_size: int, scale: float, mode: str, align_corners: bool) -> np.ndarray:
    # PyTorch's _upsample_*_aa (aten/src/ATen/native/cpu/UpSampleKernel.cpp, PIL's algorithm).
    support = (2.0 if mode == "bicubic" else 1.0) * max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5 if not align_corners else i)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        x = (j - center + 0.5) * invscale
        k = _cubic(x, _A_PIL) if mode == "bicubic" else _triangle(x)
        total = k.sum()
        w[i, xmin:xmax] = k / total if total != 0 else k
    return w


def resize_2d(x: jnp.ndarray, h_matrix: np.ndarray, w_matrix: np.ndarray, axes: tuple[int, int] = (-3, -2)):
    """Applies (out_h, in_h) and (out_w, in_w) matrices to the two spatial ``axes`` of ``x``.

    Default axes fit channels-last (..., H, W, C). The contraction runs in ``x``'s dtype at full precision.
    """
    ax_h, ax_w = (a % x.ndim for a in axes)
    x = jnp.moveaxis(x, (ax_h, ax_w), (-2, -1))
    hm = jnp.asarray(h_matrix, x.dtype)
    wm = jnp.asarray(w_matrix, x.dtype)
    x = jnp.einsum("oh,...hw,pw->...op", hm, x, wm, precision="highest")
    return jnp.moveaxis(x, (-2, -1), (ax_h, ax_w))


def bilinear_resize(x: jnp.ndarray, size: tuple[int, int], align_corners: bool) -> jnp.ndarray:
    """``F.interpolate(mode='bilinear')`` on a channels-last map: (B, h, w, C) -> (B, H, W, C); same size: x."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    hm = resize_matrix(h, size[0], mode="bilinear", align_corners=align_corners)
    wm = resize_matrix(w, size[1], mode="bilinear", align_corners=align_corners)
    return resize_2d(x, hm, wm)
