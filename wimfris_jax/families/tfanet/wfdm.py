"""Word-level Linguistic Feature-guided Semantic Deepening Module (WFDM), TFANet Section 3.5, eqs. (23)-(26)::

    K_i    = omega(delta_i(F_LV_i))                   (B, h_i, w_i, C_i)   eq. (23): 1-D 1x1 conv, bilinear resize
    F_Mi   = P_i(K_i * F_Fi)                          (B, h_i, w_i, D)     eq. (24), P_i: 1x1 conv C_i -> D
    M_1    = F_M1                                                          eq. (25)
    M_i+1  = a_i Up(M_i) + (1 - a_i) F_M(i+1)         a_i = sigmoid(t_i)   eq. (26)
    logits = Conv_1x1(M_n)                            (B, h_n, w_n, out_channels)

Levels run coarse to fine (M_1 is the coarsest map: Up(M_i) must be able to reach the next level).
F_LV_i is MLAM's pixel-side output of level i (:mod:`wimfris_jax.families.tfanet.mlam`): every pixel holds a mixture of
word values, the "word-level linguistic features derived from the first stage"; delta_i is a 1x1 convolution over
its flattened (B, N = h'_i w'_i, C'_i) sequence, and omega resizes the kernel map to F_Fi's grid (the identity
when MLAM and CFSM ran on the same grid, as in the encoder). P_i gives the levels one width D, which eq. (26)'s
sum needs when the VMamba stages differ in width. a_i is learnable per merge, kept in (0, 1) by a sigmoid and
started at ``alpha_init`` (or fixed there with ``learn_alpha=False``). One output channel is a foreground logit;
two are background / foreground scores (the paper's "two stratum score maps"); :func:`tfanet_loss` takes either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.layers import torch_default_kernel


class WFDM(nn.Module):
    """Eqs. (23)-(26): per-level word-guided kernels and a progressive coarse-to-fine merge.

    Attributes:
      dim: common width D of the merged maps.
      out_channels: score maps (1: foreground logit; 2: background/foreground).
      learn_alpha: eq. (26)'s alpha learnable (one per merge) or fixed at ``alpha_init``.
      alpha_init: starting (or fixed) alpha in (0, 1).
      align_corners: of the bilinear resizes (ReMamber's decoder upsamples with True).
      dtype, param_dtype: computation / parameter dtypes.
    """

    dim: int = 256
    out_channels: int = 1
    learn_alpha: bool = True
    alpha_init: float = 0.5
    align_corners: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray], lang: Sequence[jnp.ndarray]) -> jnp.ndarray:
        """feats: F_Fi, n x (B, h_i, w_i, C_i); lang: F_LV_i, n x (B, h'_i, w'_i, C'_i); both coarse to fine ->
        score maps (B, h_n, w_n, out_channels) on the finest grid."""
        if not feats or len(feats) != len(lang):
            raise ValueError(f"WFDM needs one F_LV per F_F level, got {len(feats)} and {len(lang)}")
        sizes = [f.shape[1:3] for f in feats]
        if any(a[0] > b[0] or a[1] > b[1] for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"WFDM levels must run coarse to fine, got grids {sizes}")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"WFDM alpha_init must lie in (0, 1), got {self.alpha_init}")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_default_kernel)
        merged = None
        for i, (f, f_lv) in enumerate(zip(feats, lang)):
            kernel = nn.Dense(f.shape[-1], name=f"kernel_{i}", **common)(f_lv)  # delta_i, eq. (23)
            kernel = bilinear_resize(kernel, f.shape[1:3], self.align_corners)  # omega, eq. (23)
            f_m = nn.Dense(self.dim, name=f"lateral_{i}", **common)(kernel * f)  # eq. (24)
            if merged is None:
                merged = f_m  # eq. (25)
                continue
            t0 = math.log(self.alpha_init / (1.0 - self.alpha_init))
            if self.learn_alpha:
                t = self.param(f"alpha_{i}", nn.initializers.constant(t0), (), self.param_dtype)
            else:
                t = jnp.asarray(t0, jnp.float32)
            alpha = nn.sigmoid(t).astype(f_m.dtype)
            merged = alpha * bilinear_resize(merged, f.shape[1:3], self.align_corners) + (1 - alpha) * f_m  # (26)
        return nn.Dense(self.out_channels, name="score", **common)(merged)
