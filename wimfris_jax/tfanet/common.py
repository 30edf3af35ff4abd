"""Small helpers shared by the TFANet modules: bilinear resizing (PyTorch's rule) and the word validity mask."""

from __future__ import annotations

import jax.numpy as jnp

from wimfris_jax.interpolate import resize_2d, resize_matrix


def bilinear_resize(x: jnp.ndarray, size: tuple[int, int], align_corners: bool) -> jnp.ndarray:
    """``F.interpolate(mode='bilinear')`` on a channels-last map: (B, h, w, C) -> (B, H, W, C); same size: x."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    hm = resize_matrix(h, size[0], mode="bilinear", align_corners=align_corners)
    wm = resize_matrix(w, size[1], mode="bilinear", align_corners=align_corners)
    return resize_2d(x, hm, wm)


def valid_words(pad_mask: jnp.ndarray | None, batch: int, length: int) -> jnp.ndarray:
    """(B, L) float32, 1 for a real word, 0 for padding. ``pad_mask`` follows the repository (True = padding,
    ``ids == 0`` in :mod:`wimfris_jax.model`); None means no padding."""
    if pad_mask is None:
        return jnp.ones((batch, length), jnp.float32)
    if pad_mask.shape != (batch, length):
        raise ValueError(f"pad_mask must be (B, L) = {(batch, length)}, got {pad_mask.shape}")
    return 1.0 - pad_mask.astype(jnp.float32)
