"""One TFANet alignment unit delta_i of eq. (2): MLAM (KPS) -> fusion block (KPS) -> CFSM (KFS), independent of
the backbone: it takes one level's map and the words and returns F_i (fed back to the encoder by eq. (3)) and
F_LV_i (kept for the WFDM of the KIS). ``attention`` and ``mixer`` swap MLAM and CFSM for the ablation stand-ins of
:mod:`wimfris_jax.families.tfanet.ablations` (Table 3); the defaults are the paper's unit.

``cfsm_depth`` n > 1 stacks CFSMs as ReMamber stacks its two Twister blocks per level (docs/TFANET.md "Parameters")::

    F_F^1 = CFSM_1(F_Block)                                     F_Block = [E(F_VL), F_LV, F_c]   (B, h, w, 3C)
    F_F^k = CFSM_k([E(F_VL), F_LV + F_F^1 + ... + F_F^(k-1), F_c])     k = 2..n: the visual part updated
    F_i   = F_F^1 + ... + F_F^n                                 the unit's increment to F_V (eq. 3)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.families.tfanet.ablations import ATTENTIONS, MIXERS, ConvFusion, TransformerCrossAttention
from wimfris_jax.families.tfanet.cfsm import CFSM
from wimfris_jax.families.tfanet.fusion import FusionBlock
from wimfris_jax.families.tfanet.mlam import MLAM


class TFANetLevel(nn.Module):
    """Eqs. (4)-(22) on one level.

    Attributes:
      mlam, fusion, cfsm: keyword arguments of :class:`MLAM`, :class:`FusionBlock`, :class:`CFSM` (None: defaults).
      attention: "mlam" | "transformer" (:class:`TransformerCrossAttention`, kwargs ``transformer``) | "none"
        (F_LV = F_V, F_VL = F_W).
      mixer: "cfsm" | "conv" (:class:`ConvFusion`, kwargs ``conv``).
      cfsm_depth: CFSMs per level (1: the paper's eqs. 20-22; module docstring); "cfsm", then "cfsm_1", ...; the
        "conv" mixer takes 1 only.
      transformer, conv: keyword arguments of the stand-ins (None: defaults).
      dtype: computation dtype of all three.
    """

    mlam: Any = None
    fusion: Any = None
    cfsm: Any = None
    attention: str = "mlam"
    mixer: str = "cfsm"
    cfsm_depth: int = 1
    transformer: Any = None
    conv: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(
        self, visual: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """visual (B, h, w, C), words (B, L, Ct), pad_mask (B, L) True = padding ->
        (F_F (B, h, w, C), F_LV (B, h, w, C))."""
        depth_ok = self.cfsm_depth >= 1 and (self.mixer == "cfsm" or self.cfsm_depth == 1)
        if self.attention not in ATTENTIONS or self.mixer not in MIXERS or not depth_ok:
            raise ValueError(
                f"TFANetLevel: attention {self.attention!r} (of {ATTENTIONS}), mixer {self.mixer!r} (of {MIXERS}), "
                f"cfsm_depth {self.cfsm_depth} (>= 1; 1 with the conv mixer)"
            )
        if self.attention == "mlam":
            f_lv, f_vl = MLAM(name="mlam", dtype=self.dtype, **(self.mlam or {}))(visual, words, pad_mask)
        elif self.attention == "transformer":
            attend = TransformerCrossAttention(name="transformer", dtype=self.dtype, **(self.transformer or {}))
            f_lv, f_vl = attend(visual, words, pad_mask)
        else:  # "none": the features go to the fusion block as they are
            f_lv, f_vl = visual, words
        block = FusionBlock(name="fusion", dtype=self.dtype, **(self.fusion or {}))(f_lv, f_vl, pad_mask)
        if self.mixer == "conv":
            return ConvFusion(name="conv", dtype=self.dtype, **(self.conv or {}))(block), f_lv
        sentence, vis, word_level = jnp.split(block, 3, axis=-1)  # eq. (19)'s parts, each (B, h, w, C)
        outputs = []
        for k in range(self.cfsm_depth):
            if outputs:  # as ReMamber's next Twister block: the image updated by the previous ones, the same guidance
                block = jnp.concatenate([sentence, vis + sum(outputs).astype(vis.dtype), word_level], axis=-1)
            cfsm = CFSM(name=f"cfsm_{k}" if k else "cfsm", dtype=self.dtype, features=visual.shape[-1],
                        **(self.cfsm or {}))  # fmt: skip
            outputs.append(cfsm(block))
        return sum(outputs[1:], outputs[0]), f_lv
