"""TFANet's training objective. The paper names none; ReMamber, its ancestor, trains with Dice + per-pixel BCE
(its ``sigmoid_focal_loss`` with alpha = -1, gamma = 0 is plain BCE) on the logits upsampled to the mask. So::

    loss = bce_weight * mean BCE(fg, mask) + dice_weight * Dice(sigmoid(fg), mask)

with fg the foreground logit: the one channel of a 1-channel score map, or s_1 - s_0 of a 2-channel one (then
sigmoid(fg) is the softmax's foreground probability, so both heads are trained by the same objective). The
BCE and Dice are :mod:`wimfris_jax.losses`' (Dice with eps 1e-6 instead of ReMamber's +1 smoothing; ReMamber's
epoch-dependent masking of confident pixels is left out).
"""

from __future__ import annotations

import jax.numpy as jnp

from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.losses import bce_loss, dice_loss


def foreground_logits(scores: jnp.ndarray) -> jnp.ndarray:
    """(B, h, w, 1) -> scores[..., 0]; (B, h, w, 2) background/foreground -> scores[..., 1] - scores[..., 0]."""
    if scores.ndim != 4 or scores.shape[-1] not in (1, 2):
        raise ValueError(f"score maps must be (B, h, w, 1) or (B, h, w, 2), got {scores.shape}")
    scores = scores.astype(jnp.float32)
    return scores[..., 0] if scores.shape[-1] == 1 else scores[..., 1] - scores[..., 0]


def tfanet_loss(
    scores: jnp.ndarray, mask: jnp.ndarray, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> jnp.ndarray:
    """scores (B, h, w, 1 or 2) from :class:`WFDM`, mask (B, Hm, Wm) in [0, 1] -> scalar. The foreground logits are
    bilinearly upsampled (align_corners=True, as ReMamber) to the mask's size when the sizes differ."""
    fg = foreground_logits(scores)
    if fg.shape[1:] != mask.shape[1:]:
        fg = bilinear_resize(fg[..., None], mask.shape[1:], align_corners=True)[..., 0]
    return bce_weight * bce_loss(fg, mask) + dice_weight * dice_loss(fg, mask)
