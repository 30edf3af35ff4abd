"""Construction of the fusion feature block, TFANet Section 3.3, eqs. (16)-(19), channels last::

    F_f     = (F_LV W_L) (F_VL W_V)^T / sqrt(dim)      (B, H, W, L)   eq. (16), transposed to pixels x words
    F_c     = Conv_kxk(F_f)                            (B, H, W, C)   "a single convolutional layer"
    F~_VL   = E(F_VL) = broadcast(W_E masked_mean(F_VL)) (B, H, W, C) eq. (17): the words pooled to a sentence
    F~_LV   = E(F_LV) = F_LV                           (B, H, W, C)   eq. (18): already image-sized
    F_Block = [F~_VL, F~_LV, F_c]                      (B, H, W, 3C)  eq. (19)

F_LV lives on the pixels and F_VL on the words (see :mod:`wimfris_jax.families.tfanet.mlam`). This is ReMamber's
image-text correlation (a per-pixel word-similarity volume turned into C channels by a 3x3 convolution), fed with
MLAM's outputs instead of the raw features; the block's three parts play the roles of the overview's
[F_T, F_V, F_f] (Section 3.1) and of ReMamber's [sentence guidance, image, local text]. The word count L must be
static (the convolution reads L channels); padded words contribute zero columns to F_f and nothing to the mean.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.families.tfanet.common import valid_words
from wimfris_jax.layers import torch_default_kernel


class FusionBlock(nn.Module):
    """Eqs. (16)-(19).

    Attributes:
      dim: width of the projections W_L, W_V of eq. (16).
      kernel_size: the F_f -> F_c convolution (3, ReMamber's; the paper does not say).
      dtype, param_dtype: computation / parameter dtypes.
    """

    dim: int = 256
    kernel_size: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f_lv: jnp.ndarray, f_vl: jnp.ndarray, pad_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """f_lv (B, H, W, C) pixel side, f_vl (B, L, Ct) word side, pad_mask (B, L) True = padding ->
        F_Block (B, H, W, 3C) = [E(F_VL), E(F_LV), F_c]."""
        b, h, w, c = f_lv.shape
        valid = valid_words(pad_mask, b, f_vl.shape[1])[..., None]  # (B, L, 1)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_default_kernel)
        pix = nn.Dense(self.dim, use_bias=False, name="w_l", **common)(f_lv)  # F_LV W_L (B, H, W, dim)
        wrd = nn.Dense(self.dim, use_bias=False, name="w_v", **common)(f_vl) * valid.astype(f_vl.dtype)
        f_f = jnp.einsum("bhwd,bld->bhwl", pix, wrd) / math.sqrt(self.dim)  # eq. (16)
        k = self.kernel_size
        f_c = nn.Conv(c, (k, k), padding="SAME", name="conv", **common)(f_f)  # F_c (B, H, W, C)
        sentence = (f_vl * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)  # masked mean over words (B, Ct)
        e_vl = nn.Dense(c, name="expand_vl", **common)(sentence)  # eq. (17)
        e_vl = jnp.broadcast_to(e_vl[:, None, None, :], (b, h, w, c)).astype(f_c.dtype)
        return jnp.concatenate([e_vl, f_lv.astype(f_c.dtype), f_c], axis=-1)  # eqs. (18), (19)
