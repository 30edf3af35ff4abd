"""The mask losses every family shares: per-pixel BCE and Dice on mask logits, and PyTorch's nearest resize that
takes a mask to the logit grid. Each family's own objective (WIMFRIS eq. (10) with its window alignment, TFANet's and
VIPA's sums) lives in its package.

- ``bce_loss``: the mean per-pixel sigmoid BCE (DETRIS's ``binary_cross_entropy_with_logits``; WIMFRIS's
  text-to-pixel contrastive loss, eqs. (5)-(6), where the logits are the projector's text-pixel scores); soft targets
  (DETRIS's bilinear-warped masks) are allowed.
- ``dice_loss``: WIMFRIS eqs. (7)-(8), on sigmoid probabilities, per sample, then 1 - mean.
- ``nearest_resize``: PyTorch's nearest rule (source index floor(i * in / out), ``F.interpolate(mode='nearest')``).

All reductions run in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch ``F.interpolate(mode='nearest', size=out_size)`` source indices: min(floor(i * in/out), in-1),
    computed in float32 as PyTorch's kernel does (448 -> 128 reads rows floor(3.5 i))."""
    scale = np.float32(in_size / out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(mask: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
    """(B, Hm, Wm) -> (B, h, w) with PyTorch's legacy nearest rule (not ``jax.image.resize``'s half-pixel one)."""
    b, hm, wm = mask.shape
    h, w = size
    if (hm, wm) == (h, w):
        return mask
    return mask[:, nearest_indices(hm, h)][:, :, nearest_indices(wm, w)]


def _check_same(logits: jnp.ndarray, mask: jnp.ndarray, name: str) -> None:
    if logits.shape != mask.shape:
        raise ValueError(f"{name}: logits {logits.shape} and mask {mask.shape} differ (resize the mask first)")


def bce_loss(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean over all pixels of BCE(sigmoid(logits), mask) (WIMFRIS eqs. (5)-(6)). logits, mask: (B, h, w) -> scalar."""
    _check_same(logits, mask, "bce_loss")
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), mask.astype(jnp.float32)).mean()


def dice_loss(logits: jnp.ndarray, mask: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Eqs. (7)-(8): 1 - mean_b 2 sum(p g) / (sum p + sum g + eps), p = sigmoid(logits). (B, h, w) -> scalar."""
    _check_same(logits, mask, "dice_loss")
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    g = mask.astype(jnp.float32).reshape(mask.shape[0], -1)
    dice = 2.0 * (p * g).sum(-1) / (p.sum(-1) + g.sum(-1) + eps)
    return 1.0 - dice.mean()
