"""One TFANet alignment unit delta_i of eq. (2): MLAM (KPS) -> fusion block (KPS) -> CFSM (KFS), independent of
the backbone: it takes one level's map and the words and returns F_i (fed back to the encoder by eq. (3)) and
F_LV_i (kept for the WFDM of the KIS). ``attention`` and ``mixer`` swap MLAM and CFSM for the ablation stand-ins of
:mod:`wimfris_jax.tfanet.ablations` (Table 3); the defaults are the paper's unit."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.tfanet.ablations import ATTENTIONS, MIXERS, ConvFusion, TransformerCrossAttention
from wimfris_jax.tfanet.cfsm import CFSM
from wimfris_jax.tfanet.fusion import FusionBlock
from wimfris_jax.tfanet.mlam import MLAM


class TFANetLevel(nn.Module):
    """Eqs. (4)-(22) on one level.

    Attributes:
      mlam, fusion, cfsm: keyword arguments of :class:`MLAM`, :class:`FusionBlock`, :class:`CFSM` (None: defaults).
      attention: "mlam" | "transformer" (:class:`TransformerCrossAttention`, kwargs ``transformer``) | "none"
        (F_LV = F_V, F_VL = F_W).
      mixer: "cfsm" | "conv" (:class:`ConvFusion`, kwargs ``conv``).
      transformer, conv: keyword arguments of the stand-ins (None: defaults).
      dtype: computation dtype of all three.
    """

    mlam: Any = None
    fusion: Any = None
    cfsm: Any = None
    attention: str = "mlam"
    mixer: str = "cfsm"
    transformer: Any = None
    conv: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(
        self, visual: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """visual (B, h, w, C), words (B, L, Ct), pad_mask (B, L) True = padding ->
        (F_F (B, h, w, C), F_LV (B, h, w, C))."""
        if self.attention not in ATTENTIONS or self.mixer not in MIXERS:
            raise ValueError(
                f"TFANetLevel: attention {self.attention!r} (of {ATTENTIONS}), mixer {self.mixer!r} (of {MIXERS})"
            )
        if self.attention == "mlam":
            f_lv, f_vl = MLAM(name="mlam", dtype=self.dtype, **(self.mlam or {}))(visual, words, pad_mask)
        elif self.attention == "transformer":
            attend = TransformerCrossAttention(name="transformer", dtype=self.dtype, **(self.transformer or {}))
            f_lv, f_vl = attend(visual, words, pad_mask)
        else:  # "none": the features go to the fusion block as they are
            f_lv, f_vl = visual, words
        block = FusionBlock(name="fusion", dtype=self.dtype, **(self.fusion or {}))(f_lv, f_vl, pad_mask)
        if self.mixer == "cfsm":
            f_f = CFSM(name="cfsm", dtype=self.dtype, features=visual.shape[-1], **(self.cfsm or {}))(block)
        else:
            f_f = ConvFusion(name="conv", dtype=self.dtype, **(self.conv or {}))(block)
        return f_f, f_lv
