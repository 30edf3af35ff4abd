"""WIMFRIS training objective, eqs. (5)-(10): text-to-pixel contrastive BCE, Dice, window alignment BCE.

- ``contrastive_loss``: eqs. (5)-(6). The logits are the projector's text-pixel scores Z_t . Z_c^i; every pixel
  is labelled, so eq. (6) is the mean per-pixel sigmoid BCE (DETRIS's ``binary_cross_entropy_with_logits``);
  soft targets (DETRIS's bilinear-warped masks) are allowed.
- ``dice_loss``: eqs. (7)-(8), on sigmoid probabilities, per sample, then 1 - mean.
- ``window_targets`` / ``window_alignment_loss``: eq. (9). The mask is taken to the feature grid (h, w) by
  PyTorch's nearest rule (source index floor(i * in / out), DETRIS's ``F.interpolate(mode='nearest')``), binarised
  (>= 0.5) and max-pooled over non-overlapping (wh, ww) windows taken by the Window Mamba Fuser's own
  ``window_partition`` (row-major: window j = (r // wh) * (w // ww) + (c // ww)), so the orders cannot drift.
- ``wimfris_loss``: eq. (10) with (lambda_con, lambda_dice, lambda_align) = (0.5, 0.3, 0.2).

All reductions run in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wimfris_jax.neck.wmf import window_partition


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


def contrastive_loss(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Eqs. (5)-(6): mean over all pixels of BCE(sigmoid(logits), mask). logits, mask: (B, h, w) -> scalar."""
    _check_same(logits, mask, "contrastive_loss")
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), mask.astype(jnp.float32)).mean()


def dice_loss(logits: jnp.ndarray, mask: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Eqs. (7)-(8): 1 - mean_b 2 sum(p g) / (sum p + sum g + eps), p = sigmoid(logits). (B, h, w) -> scalar."""
    _check_same(logits, mask, "dice_loss")
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    g = mask.astype(jnp.float32).reshape(mask.shape[0], -1)
    dice = 2.0 * (p * g).sum(-1) / (p.sum(-1) + g.sum(-1) + eps)
    return 1.0 - dice.mean()


def window_targets(mask: jnp.ndarray, grid: Sequence[int], window: Sequence[int]) -> jnp.ndarray:
    """Per-window presence of the referred object (eq. 9's m).

    Args:
      mask: (B, Hm, Wm) ground truth in [0, 1] (soft values allowed).
      grid: (h, w) feature grid of the neck (32, 32).
      window: (wh, ww) window size (4, 4); must divide the grid.

    Returns:
      (B, n_win) float32 in {0, 1}, n_win = (h // wh) * (w // ww), row-major window order.
    """
    (h, w), (wh, ww) = grid, window
    if h % wh or w % ww:
        raise ValueError(f"window {tuple(window)} does not tile the grid {tuple(grid)}")
    m = nearest_resize(mask, (h, w)).astype(jnp.float32) >= 0.5  # (B, h, w)
    return window_partition(m[..., None], (wh, ww)).max(axis=(2, 3)).astype(jnp.float32)  # the WMF's window order


def window_alignment_loss(window_logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Eq. (9): mean over batch and windows of BCE(sigmoid(l_j), m_j). (B, n_win), (B, n_win) -> scalar."""
    if window_logits.shape != targets.shape:
        raise ValueError(f"window_alignment_loss: logits {window_logits.shape} and targets {targets.shape} differ")
    return optax.sigmoid_binary_cross_entropy(window_logits.astype(jnp.float32), targets.astype(jnp.float32)).mean()


def wimfris_loss(
    outputs: Mapping[str, jnp.ndarray],
    mask: jnp.ndarray,
    *,
    grid: Sequence[int],
    window: Sequence[int],
    weights: Sequence[float] = (0.5, 0.3, 0.2),
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Eq. (10): lambda_con L_con + lambda_dice L_dice + lambda_align L_align.

    Args:
      outputs: ``"logits"`` (B, h_l, w_l) mask logits and, optionally, ``"window_logits"`` (B, n_win) = <c_j, s>.
      mask: (B, Hm, Wm) ground truth in [0, 1]; when its size differs from the logits' it is taken to the logit
        size with PyTorch's nearest rule, as DETRIS does (448 -> 128).
      grid, window: the neck's feature grid and window size, for the alignment targets.
      weights: (lambda_con, lambda_dice, lambda_align).

    Returns:
      (total, {"loss_con", "loss_dice", "loss_align"}). Without ``"window_logits"`` (no-window and DETRIS-neck
      ablations) the alignment term is dropped and the two other weights are kept as given (no renormalisation:
      Adam is invariant to the overall scale); ``loss_align`` is then reported as 0 so the logged keys stay fixed.
    """
    w_con, w_dice, w_align = weights
    logits = outputs["logits"]
    target = nearest_resize(mask, logits.shape[-2:])
    parts = {"loss_con": contrastive_loss(logits, target), "loss_dice": dice_loss(logits, target)}
    total = w_con * parts["loss_con"] + w_dice * parts["loss_dice"]
    window_logits = outputs.get("window_logits")
    if window_logits is None:
        parts["loss_align"] = jnp.zeros((), jnp.float32)
    else:
        targets = window_targets(mask, grid, window)
        if window_logits.shape != targets.shape:
            raise ValueError(
                f"window_logits {window_logits.shape} do not fit grid {tuple(grid)} / window {tuple(window)} "
                f"(expected {targets.shape})"
            )
        parts["loss_align"] = window_alignment_loss(window_logits, targets)
        total = total + w_align * parts["loss_align"]
    return total, parts
