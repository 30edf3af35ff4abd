"""VIPA's encoder fusion (Sec. III-A; the early fusion of CrossVLT, Cho et al. 2023, VIPA's default, Table VII).

Vision side, after each Swin stage (CrossVLT ``FusionLayer`` + its gated FFN):

    q = InstanceNorm(W_q v)            keys / values = W_k l, W_v l  (the words; padded words masked)
    r = GELU(W_p(InstanceNorm(W_o attn(q, k, v)) + v))                 (B, h, w, C)      "x_residual"
    v' = v + tanh(W_2 relu(W_1 r)) * r                                  gate W_1, W_2 ~ normal(0.02)

The gate is initialised as CrossVLT effectively does (it builds zeros, then its ``_init_weights`` re-initialises
every Linear with trunc_normal(0.02)): with both matrices zero, neither ever gets a gradient (each one's gradient
goes through the other) and the sentence never reaches the Swin stages. Small weights keep an untrained fusion
close to the pretrained Swin (tanh of a small gate). ``r`` (normed per stage) is the stage's output to the
decoder, ``v'`` continues into the stage's patch merging.

Language side, before each BERT stage but the first (CrossVLT ``BertStage.crossattention`` + FFN), post-norm
as BERT: ``a = LN(x + W_o attn(q = x, k, v = vision tokens)); x = LN(a + FFN(a))`` with the stage's merged vision
tokens (B, h*w, C) as keys and values.

Shapes: v (B, h, w, C), words l (B, L, D), pad_mask (B, L) True = padding. Decisions: docs/VIPA.md.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.attention import dot_product_attention, key_padding_mask, multi_head_attention
from wimfris_jax.layers import gelu_exact, layer_norm

Array = jax.Array
NORMAL = nn.initializers.normal(0.02)  # BERT's initializer_range


def instance_norm(x: Array, eps: float = 1e-5) -> Array:
    """``torch.nn.InstanceNorm1d`` (no affine) over the tokens of (B, N, C): per sample and channel."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(axis=1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def default_fusion_heads(dim: int) -> int:
    """CrossVLT's heads of a fusion ``dim`` wide: one per 64 channels, at least one."""
    return max(1, dim // 64)


class VisionLanguageFusion(nn.Module):
    """CrossVLT's vision-side fusion with its tanh gate: (v, words) -> (v', r), both (B, h, w, C).

    Attributes: dim (attention width; None = C), num_heads (None = max(1, dim // 64) as CrossVLT), dtype,
    attention (:func:`wimfris_jax.attention.dot_product_attention`'s implementation).
    """

    dim: int | None = None
    num_heads: int | None = None
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, v: Array, words: Array, pad_mask: Array | None) -> tuple[Array, Array]:
        b, h, w, c = v.shape
        dim = self.dim or c
        heads = self.num_heads or default_fusion_heads(dim)
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by {heads} heads")
        tokens = v.reshape(b, h * w, c)
        dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, name=name, **kw)  # noqa: E731
        q = instance_norm(dense(dim, "query")(tokens)).reshape(b, h * w, heads, dim // heads)
        k = dense(dim, "key")(words).reshape(b, -1, heads, dim // heads)
        val = dense(dim, "value")(words).reshape(b, -1, heads, dim // heads)
        out = dot_product_attention(q, k, val, key_padding_mask(pad_mask), implementation=self.attention)
        out = out.reshape(b, h * w, dim)
        r = instance_norm(dense(c, "out")(out)) + tokens
        r = gelu_exact(dense(c, "project")(r))
        gate = dense(c, "gate_1", use_bias=False, kernel_init=NORMAL)(r)
        gate = jnp.tanh(dense(c, "gate_2", use_bias=False, kernel_init=NORMAL)(jax.nn.relu(gate)))
        return (tokens + gate * r).reshape(b, h, w, c), r.reshape(b, h, w, c)


class TextCrossLayer(nn.Module):
    """A BERT-style post-norm layer whose attention reads vision tokens: (words (B, L, D), vision (B, N, Cv)) ->
    (B, L, D). Attributes: num_heads (12 as BERT-base), mlp_dim (None = 4 D), ln_eps (BERT's 1e-12), dtype."""

    num_heads: int = 12
    mlp_dim: int | None = None
    ln_eps: float = 1e-12
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, words: Array, vision: Array) -> Array:
        d = words.shape[-1]
        vision = vision.reshape(vision.shape[0], -1, vision.shape[-1])
        attn = multi_head_attention(self.num_heads, d, implementation=self.attention, dtype=self.dtype,
                                    name="attn", kernel_init=NORMAL, out_kernel_init=NORMAL)(words, vision)  # fmt: skip
        x = layer_norm(self.ln_eps, self.dtype, "attn_norm")(words + attn)
        y = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype, kernel_init=NORMAL, name="fc1")(x)
        y = nn.Dense(d, dtype=self.dtype, kernel_init=NORMAL, name="fc2")(gelu_exact(y))
        return layer_norm(self.ln_eps, self.dtype, "mlp_norm")(x + y)
