"""WIMFRIS's training objective, eqs. (5)-(10): text-to-pixel contrastive BCE, Dice (shared,
:mod:`wimfris_jax.losses`), window alignment BCE.

- ``window_targets`` / ``window_alignment_loss``: eq. (9). The mask is taken to the feature grid (h, w) by
  PyTorch's nearest rule, binarised (>= 0.5) and max-pooled over non-overlapping (wh, ww) windows taken by the Window
  Mamba Fuser's own ``window_partition`` (row-major: window j = (r // wh) * (w // ww) + (c // ww)), so the orders
  cannot drift.
- ``wimfris_loss``: eq. (10) with (lambda_con, lambda_dice, lambda_align) = (0.5, 0.3, 0.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import optax

from wimfris_jax.families.wimfris.neck.wmf import window_partition
from wimfris_jax.losses import bce_loss, dice_loss, nearest_resize


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
    parts = {"loss_con": bce_loss(logits, target), "loss_dice": dice_loss(logits, target)}
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
