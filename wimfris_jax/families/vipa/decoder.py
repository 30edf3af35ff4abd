"""VIPA's segmentation decoder (Sec. III-C, eq. 8): vision queries attend to the visual expression, coarse to fine.

    x = W_4 F_4                                                     (B, h4, w4, D)
    at each level i = 4, 3, 2, 1 (for i < 4 first: x = W_i [up2(x), F_i], bilinear up to F_i's grid):
        F_o = MHCA(x, E_V, expression mask) + x;  x = F_d = MLP(F_o) + F_o                   eq. (8)
    logits = W_out LN(x)                                            (B, h1, w1) = (B, S/4, S/4)

The sublayers are pre-norm (decision in docs/VIPA.md); the same module takes language tokens as its key-value set
for Table V's "LE" rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask, multi_head_attention
from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.layers import Mlp, gelu_exact, layer_norm

Array = jax.Array


class VipaDecoder(nn.Module):
    """(stage features fine -> coarse [(B, h_i, w_i, C_i)], kv (B, L, Dk), kv_mask (B, L) True = usable key)
    -> logits (B, h_1, w_1). Attributes: dim (D), num_heads, mlp_ratio, dtype, attention."""

    dim: int = 256
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, feats: Sequence[Array], kv: Array, kv_mask: Array) -> Array:
        x = None
        for i in reversed(range(len(feats))):
            f = feats[i]
            if x is not None:
                x = bilinear_resize(x, f.shape[1:3], align_corners=True)
                f = jnp.concatenate([x, f.astype(x.dtype)], axis=-1)
            x = nn.Dense(self.dim, dtype=self.dtype, name=f"in_{i}")(f)
            b, h, w, _ = x.shape
            q = x.reshape(b, h * w, self.dim)
            mask = key_padding_mask(~kv_mask, h * w)  # kv_mask True = a usable key
            attn = multi_head_attention(self.num_heads, self.dim, implementation=self.attention, dtype=self.dtype,
                                        name=f"cross_{i}")  # fmt: skip
            q = q + attn(layer_norm(1e-5, self.dtype, f"cross_norm_{i}")(q), kv, mask=mask)
            y = layer_norm(1e-5, self.dtype, f"mlp_norm_{i}")(q)
            q = q + Mlp(int(self.dim * self.mlp_ratio), gelu_exact, self.dtype, name=f"mlp_{i}")(y)
            x = q.reshape(b, h, w, self.dim)
        x = layer_norm(1e-5, self.dtype, "out_norm")(x)
        return nn.Dense(1, dtype=self.dtype, name="out")(x)[..., 0].astype(jnp.float32)
