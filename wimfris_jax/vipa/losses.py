"""VIPA's training objective: BCE + Dice on the mask logits (Sec. III-C) and the pixel-contrastive loss of eq. (4)
on the [CLS] relevance map (Table VIII's default), each logit map bilinearly upsampled to the mask as CrossVLT's
``AlignLoss`` does (align_corners=True). Weights (1, 1, 1): the paper gives none (docs/VIPA.md)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.losses import bce_loss, dice_loss


def to_mask_size(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """(B, h, w) -> (B, Hm, Wm) bilinear, align_corners=True (unchanged at the mask's size)."""
    return bilinear_resize(logits.astype(jnp.float32)[..., None], mask.shape[1:], align_corners=True)[..., 0]


def vipa_loss(
    logits: jnp.ndarray, global_logits: jnp.ndarray, mask: jnp.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """logits (B, h, w), global_logits (B, h4, w4), mask (B, Hm, Wm) in [0, 1] -> (scalar, parts)."""
    w_bce, w_dice, w_con = (float(w) for w in weights)
    fg = to_mask_size(logits, mask)
    parts = {"loss_bce": bce_loss(fg, mask), "loss_dice": dice_loss(fg, mask)}
    loss = w_bce * parts["loss_bce"] + w_dice * parts["loss_dice"]
    if w_con:
        parts["loss_pixel_contrast"] = bce_loss(to_mask_size(global_logits, mask), mask)
        loss = loss + w_con * parts["loss_pixel_contrast"]
    return loss, parts
