"""One TFANet alignment unit delta_i of eq. (2): MLAM (KPS) -> fusion block (KPS) -> CFSM (KFS), independent of
the backbone: it takes one level's map and the words and returns F_i (fed back to the encoder by eq. (3)) and
F_LV_i (kept for the WFDM of the KIS)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.tfanet.cfsm import CFSM
from wimfris_jax.tfanet.fusion import FusionBlock
from wimfris_jax.tfanet.mlam import MLAM


class TFANetLevel(nn.Module):
    """Eqs. (4)-(22) on one level.

    Attributes:
      mlam, fusion, cfsm: keyword arguments of :class:`MLAM`, :class:`FusionBlock`, :class:`CFSM` (None: defaults).
      dtype: computation dtype of all three.
    """

    mlam: Any = None
    fusion: Any = None
    cfsm: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(
        self, visual: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """visual (B, h, w, C), words (B, L, Ct), pad_mask (B, L) True = padding ->
        (F_F (B, h, w, C), F_LV (B, h, w, C))."""
        f_lv, f_vl = MLAM(name="mlam", dtype=self.dtype, **(self.mlam or {}))(visual, words, pad_mask)
        block = FusionBlock(name="fusion", dtype=self.dtype, **(self.fusion or {}))(f_lv, f_vl, pad_mask)
        f_f = CFSM(name="cfsm", dtype=self.dtype, features=visual.shape[-1], **(self.cfsm or {}))(block)
        return f_f, f_lv
