"""Multiscale Linear Cross-Attention Module (MLAM), TFANet Section 3.3, eqs. (4)-(15), channels last.

Two cross-attention directions, each at the scales k in ``scales`` (the paper's 1x1, 3x3, 5x5)::

    text-to-image (eqs. 4-10):  Q_k = W_qk F_W  (words),  K_k, V_k = W_kk F_V, W_vk F_V  (pixels)
    image-to-text (eqs. 11-15): Q_k = W_qk F_V  (pixels), K_k, V_k = W_kk F_W, W_vk F_W  (words)
    A_k = XNorm(Q_k) (XNorm(K_k^T V_k))                           eqs. (8), (14): linear in the token count
    F   = sum_k w_k A_k                                           eqs. (10), (15), learnable w_k

Which output lives where (docs/TFANET.md "MLAM outputs"): a query-side output has the query's token count, so
eqs. (4)-(10) give F_VL on the *words* (B, L, .) and eqs. (11)-(15) give F_LV on the *pixels* (B, H, W, .), as
their text says ("linguistic feature map F_VL", "visual feature map F_LV"). Eq. (16) (H x W x L) and eq. (23)
(K in B x C x N, bilinearly upsampled) are consistent with this once eq. (16) is transposed.

Embeddings: the scale-k embedding W_k is a pointwise projection (shared by the scales of one role) followed by a
depthwise k x k convolution on the image map (k-tap 1-D convolution over word positions on the words), the
factorised k x k convolution of EfficientViT-style multiscale linear attention; k = 1 is the pointwise part alone.
X-Norm (eq. 9) is an L2 normalisation over the embedding axis (the rows of Q and of K^T V) times a learnable
per-channel gamma. Padded words are zeroed before and after every word-side convolution and in K, so they change
nothing in the outputs of real words or of pixels (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.families.tfanet.common import valid_words
from wimfris_jax.layers import torch_default_kernel


def xnorm(x: jnp.ndarray, gamma: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Eq. (9): gamma * x / ||x||_2 over the last (embedding) axis, in float32; ``gamma`` broadcasts against x.

    Invariant to a positive rescaling of x wherever ||x|| > eps (the clamp only guards all-zero rows)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), eps * eps))
    return gamma.astype(jnp.float32) * x32 / norm


def linear_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    gamma_q: jnp.ndarray,
    gamma_kv: jnp.ndarray,
    key_valid: jnp.ndarray | None = None,
    eps: float = 1e-6,
) -> jnp.ndarray:
    """Eqs. (8), (14): XNorm(Q) (XNorm(K^T V)) per head, computed as Q (K^T V), O(N d^2).

    Args:
      q: (B, Nq, heads, dh); k, v: (B, Nk, heads, dh).
      gamma_q, gamma_kv: (heads, dh) X-Norm scales.
      key_valid: (B, Nk) with 1 for real keys, 0 for padding (their K rows are zeroed: K^T V ignores them).
    Returns:
      (B, Nq, heads, dh) float32.
    """
    k = k.astype(jnp.float32)
    if key_valid is not None:
        k = k * key_valid[:, :, None, None].astype(jnp.float32)
    kv = jnp.einsum("bnhd,bnhe->bhde", k, v.astype(jnp.float32))  # (B, heads, dh, dh), one "patch" per row
    kv = xnorm(kv, gamma_kv[:, None, :], eps)
    return jnp.einsum("bqhd,bhde->bqhe", xnorm(q, gamma_q, eps), kv)


class _Embed(nn.Module):
    """Eqs. (4)-(6) / (11)-(13): per role (q, k or v) one embedding per scale.

    ``__call__``: x (B, H, W, C) or (B, L, C), valid None or (B, L) -> {role: [scale-k map (..., dim)]}."""

    dim: int
    roles: tuple[str, ...]
    scales: tuple[int, ...]
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, valid: jnp.ndarray | None) -> dict[str, list[jnp.ndarray]]:
        spatial = x.ndim - 2  # 2 on the image map, 1 on the words
        keep = (lambda t: t) if valid is None else (lambda t: t * valid[..., None].astype(t.dtype))
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_default_kernel)
        out = {}
        for role in self.roles:
            base = keep(nn.Dense(self.dim, name=role, **common)(x))
            maps = []
            for k in self.scales:
                if k == 1:
                    maps.append(base)
                    continue
                dw = nn.Conv(self.dim, (k,) * spatial, padding="SAME", feature_group_count=self.dim,
                             name=f"{role}_{k}x{k}" if spatial == 2 else f"{role}_{k}", **common)
                maps.append(keep(dw(base)))
            out[role] = maps
        return out


class _CrossDirection(nn.Module):
    """One direction of MLAM: queries from ``query_x``, keys and values from ``key_x``; eqs. (8)-(10)/(14)-(15).

    ``__call__``: query_x (B, *Sq, Cq), key_x (B, *Sk, Ck), validity masks (B, L) or None -> (B, *Sq, dim)."""

    dim: int
    num_heads: int
    scales: tuple[int, ...]
    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_x, key_x, query_valid, key_valid) -> jnp.ndarray:
        d, nh = self.dim, self.num_heads
        emb = dict(dim=d, scales=self.scales, dtype=self.dtype, param_dtype=self.param_dtype)
        qs = _Embed(roles=("q",), name="query_embed", **emb)(query_x, query_valid)["q"]
        kvs = _Embed(roles=("k", "v"), name="key_embed", **emb)(key_x, key_valid)
        gamma_q = self.param("gamma_q", nn.initializers.ones, (nh, d // nh), self.param_dtype)
        gamma_kv = self.param("gamma_kv", nn.initializers.ones, (nh, d // nh), self.param_dtype)
        w = self.param("scale_weights", nn.initializers.constant(1.0 / len(self.scales)), (len(self.scales),),
                       self.param_dtype)
        b = query_x.shape[0]
        heads = lambda t: t.reshape(b, -1, nh, d // nh)
        out = 0.0
        for i, (q, k, v) in enumerate(zip(qs, kvs["k"], kvs["v"])):
            out = out + w[i] * linear_attention(heads(q), heads(k), heads(v), gamma_q, gamma_kv, key_valid, self.eps)
        return out.reshape(*query_x.shape[:-1], d)


class MLAM(nn.Module):
    """Multiscale Linear bidirectional Cross-Attention, eqs. (4)-(15).

    Attributes:
      dim: attention width d (None: the visual channels Cv).
      num_heads: heads of each linear attention (d must divide; the paper's equations are single-head: 1).
      scales: odd kernel sizes of the embeddings (paper: (1, 3, 5)); any non-empty subset for ablations.
      residual: add each direction's projected output to its query input ("features fused with").
      eps: X-Norm's guard against all-zero rows.
      dtype, param_dtype: computation / parameter dtypes (the attention itself runs in float32).
    """

    dim: int | None = None
    num_heads: int = 1
    scales: Sequence[int] = (1, 3, 5)
    residual: bool = True
    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, visual: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """visual F_V (B, H, W, Cv), words F_W (B, L, Ct), pad_mask (B, L) True = padding (or None) ->
        (F_LV (B, H, W, Cv) on the pixels, eq. (15); F_VL (B, L, Ct) on the words, eq. (10), 0 at padding)."""
        if visual.ndim != 4 or words.ndim != 3 or words.shape[0] != visual.shape[0]:
            raise ValueError(f"MLAM expects visual (B, H, W, C) and words (B, L, C), got {visual.shape}, {words.shape}")
        scales = tuple(int(k) for k in self.scales)
        if not scales or len(set(scales)) != len(scales) or any(k < 1 or k % 2 == 0 for k in scales):
            raise ValueError(f"MLAM scales must be distinct odd positive sizes, got {self.scales}")
        b, _, _, cv = visual.shape
        ct = words.shape[-1]
        d = self.dim or cv
        if d % self.num_heads:
            raise ValueError(f"MLAM: dim {d} is not divisible by num_heads {self.num_heads}")
        valid = valid_words(pad_mask, b, words.shape[1])
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        direction = dict(dim=d, num_heads=self.num_heads, scales=scales, eps=self.eps, **common)
        a_words = _CrossDirection(name="text_to_image", **direction)(words, visual, valid, None)  # (B, L, d)
        a_pixels = _CrossDirection(name="image_to_text", **direction)(visual, words, None, valid)  # (B, H, W, d)
        dense = dict(kernel_init=torch_default_kernel, **common)
        f_vl = nn.Dense(ct, name="word_out", **dense)(a_words.astype(words.dtype))
        f_lv = nn.Dense(cv, name="pixel_out", **dense)(a_pixels.astype(visual.dtype))
        if self.residual:
            f_vl, f_lv = words + f_vl, visual + f_lv
        return f_lv, f_vl * valid[..., None].astype(f_vl.dtype)
