"""VIPA's training objective: BCE + Dice on the mask logits (Sec. III-C) and a supervision of the [CLS] relevance map
(Table VIII), each map bilinearly upsampled to the mask as CrossVLT's ``AlignLoss`` does (align_corners=True):

- "contrastive" (default): eq. (4)'s pixel-contrastive BCE on the scaled map ("global_logits");
- "threshold": the paper's "direct thresholding loss", which it does not write; our reading (docs/VIPA.md "Loss"):
  a hinge on the raw cosines s ("relevance") around the retrieval threshold t of the [CLS] row, midway between its
  k-th and (k+1)-th largest (k = ceil(r N), as the retrieval; stop-gradient), mean over the mask's pixels of
  y relu(m - (s - t)) + (1 - y) relu(m + (s - t)), margin m = THRESHOLD_MARGIN;
- "none": no supervision ("w/o supervision"), as a zero third weight.

Weights (1, 1, 1): the paper gives none (docs/VIPA.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from wimfris_jax.families.vipa.veg import retrieved_count
from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.losses import bce_loss, dice_loss

RELEVANCE_LOSSES = ("contrastive", "threshold", "none")
RELEVANCE_PARTS = {"contrastive": "loss_pixel_contrast", "threshold": "loss_relevance_threshold"}
THRESHOLD_MARGIN = 0.1  # in cosine units (S_c lies in [-1, 1])


def to_mask_size(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """(B, h, w) -> (B, Hm, Wm) bilinear, align_corners=True (unchanged at the mask's size)."""
    return bilinear_resize(logits.astype(jnp.float32)[..., None], mask.shape[1:], align_corners=True)[..., 0]


def threshold_loss(
    relevance: jnp.ndarray, mask: jnp.ndarray, ratio: float, margin: float = THRESHOLD_MARGIN
) -> jnp.ndarray:
    """relevance (B, h, w) cosines, mask (B, Hm, Wm) in [0, 1] -> scalar: target pixels above the retrieval threshold
    t by ``margin``, the others below it by as much; t (stop-gradient) lies midway between the k-th and (k+1)-th
    largest relevance, k = ceil(ratio h w) (the k-th itself when k = h w), so a map whose top k are the target, by a
    gap of 2 margins, costs 0."""
    flat = relevance.astype(jnp.float32).reshape(relevance.shape[0], -1)
    k = retrieved_count(flat.shape[1], ratio)
    t = jax.lax.stop_gradient(jax.lax.top_k(flat, min(k + 1, flat.shape[1]))[0][:, k - 1 :].mean(-1))
    d = to_mask_size(relevance, mask) - t[:, None, None]
    y = mask.astype(jnp.float32)
    return jnp.mean(y * jax.nn.relu(margin - d) + (1.0 - y) * jax.nn.relu(margin + d))


def vipa_loss(
    outputs: Mapping[str, jnp.ndarray],
    mask: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    relevance_loss: str = "contrastive",
    ratio: float = 0.3,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """outputs: "logits" (B, h, w), "global_logits" and "relevance" (B, h4, w4); mask (B, Hm, Wm) in [0, 1];
    ``relevance_loss`` one of RELEVANCE_LOSSES, ``ratio`` the VEG's r (for "threshold") -> (scalar, parts); the
    relevance term's part is named RELEVANCE_PARTS[relevance_loss], absent for "none" or a zero third weight."""
    if relevance_loss not in RELEVANCE_LOSSES:
        raise ValueError(f"relevance_loss={relevance_loss!r}: choose one of {list(RELEVANCE_LOSSES)}")
    w_bce, w_dice, w_rel = (float(w) for w in weights)
    fg = to_mask_size(outputs["logits"], mask)
    parts = {"loss_bce": bce_loss(fg, mask), "loss_dice": dice_loss(fg, mask)}
    loss = w_bce * parts["loss_bce"] + w_dice * parts["loss_dice"]
    if w_rel and relevance_loss != "none":
        name = RELEVANCE_PARTS[relevance_loss]
        if relevance_loss == "contrastive":
            parts[name] = bce_loss(to_mask_size(outputs["global_logits"], mask), mask)
        else:
            parts[name] = threshold_loss(outputs["relevance"], mask, ratio)
        loss = loss + w_rel * parts[name]
    return loss, parts
