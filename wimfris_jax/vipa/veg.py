"""VIPA's Visual Expression Generator (Sec. III-B, eqs. 1-7): retrieve the visual tokens each linguistic cue points
at, refine them, and let them share attributes; the result is the decoder's key-value set.

    X = phi_V(F_v) (B, N, D), Y = phi_L(E_L) (B, L, D)         F_v = the last stage's features, N = h * w
    S_c = cos(Y, X)                                              (B, L, N)                           eq. (1)
    train: S' = softmax((S_c + g) / tau), g ~ Gumbel; eval: S' = softmax(S_c / tau)              eq. (2)
    M = 1 on the k = ceil(r N) largest S' of each row, straight-through (M + S' - sg(S'))          eq. (3)
    F_a = linear(sum_n M F_v / k)                                                                   eq. (5)
    F^ = MHCA(F_a, F_v, mask M) + F_a;  F_r = MLP(F^) + F^                                          eq. (6)
    E^ = MHSA(F_r) + F_r;  E_V = MLP(E^) + E^                                                       eq. (7)

Rows are the cues: [CLS] (global) and the words (local), ``cues`` picks "both" | "global" | "local" (Table VI b);
padded words and unpicked cues are masked as keys wherever the expression is attended to. ``retrieve=False``
uses every visual token (M = 1, Table VI a "w/o step 1"); ``refine=False`` skips eq. (6) (F_r = F_a, "w/o step 2").
The [CLS] row of S_c, times a learnable scale, is the pixel-contrastive logit map of eq. (4) ("global_logits").
The attention and MLP sublayers are pre-norm (the paper writes no norm; decision in docs/VIPA.md).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.attention import multi_head_attention
from wimfris_jax.backbones.vit import Mlp, gelu_exact, layer_norm

Array = jax.Array
CUES = ("both", "global", "local")


def cue_mask(pad_mask: Array, cues: str) -> Array:
    """(B, L) True = padding -> (B, L) True = a cue row in use: [CLS] (row 0) for "global", the words for "local"."""
    if cues not in CUES:
        raise ValueError(f"cues={cues!r}: choose one of {list(CUES)}")
    valid = ~pad_mask
    first = jnp.arange(pad_mask.shape[1])[None, :] == 0
    return valid & first if cues == "global" else (valid & ~first if cues == "local" else valid)


def retrieval_mask(scores: Array, ratio: float, tau: Array, rng: Array | None) -> Array:
    """Straight-through Gumbel top-k, eqs. (2)-(3): scores (B, L, N) -> M (B, L, N), 1 on the ceil(ratio N) most
    relevant tokens of each row (forward), gradient of softmax((S + g) / tau) (backward); rng None: no noise."""
    n = scores.shape[-1]
    k = min(n, max(1, math.ceil(ratio * n)))
    logits = scores.astype(jnp.float32)
    if rng is not None:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax(logits / tau, axis=-1)
    kth = jax.lax.top_k(soft, k)[0][..., -1:]
    hard = (soft >= kth).astype(jnp.float32)
    return hard + (soft - jax.lax.stop_gradient(soft))  # exactly {0, 1} forward: soft - soft == 0


class VEG(nn.Module):
    """Visual Expression Generator: (F_v (B, h, w, C), words (B, L, Dt), pad_mask (B, L)) -> dict
    "expression" (B, L, dim), "expression_mask" (B, L) True = usable key, "global_logits" (B, h, w),
    "retrieved" (B, L, N) the hard mask M.

    Attributes: dim (D, the decoder width), num_heads, ratio (r, 0.3), cues, retrieve, refine, tau_init
    (the learnable Gumbel-softmax temperature, 1 as Jang et al.), scale_init (contrastive logit scale), dtype.
    """

    dim: int = 256
    num_heads: int = 8
    ratio: float = 0.3
    cues: str = "both"
    retrieve: bool = True
    refine: bool = True
    tau_init: float = 1.0
    scale_init: float = 10.0
    mlp_ratio: float = 4.0
    dtype: Any = None
    attention: str = "auto"

    def _attend(self, name: str, q: Array, kv: Array, mask: Array | None) -> Array:
        attn = multi_head_attention(self.num_heads, self.dim, implementation=self.attention, dtype=self.dtype,
                                    name=name)  # fmt: skip
        return attn(layer_norm(1e-5, self.dtype, f"{name}_norm")(q), kv, mask=mask)

    def _mlp(self, name: str, x: Array) -> Array:
        y = layer_norm(1e-5, self.dtype, f"{name}_norm")(x)
        return x + Mlp(int(self.dim * self.mlp_ratio), gelu_exact, self.dtype, name=name)(y)

    @nn.compact
    def __call__(self, vision: Array, words: Array, pad_mask: Array, *, train: bool = False) -> dict[str, Array]:
        b, h, w, _ = vision.shape
        n, length = h * w, words.shape[1]
        fv = nn.Dense(self.dim, dtype=self.dtype, name="vision_in")(vision.reshape(b, n, -1))  # F_v in D
        x = nn.Dense(self.dim, dtype=self.dtype, name="phi_v")(fv)
        y = nn.Dense(self.dim, dtype=self.dtype, name="phi_l")(words)
        unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6)  # noqa: E731
        scores = jnp.einsum("bld,bnd->bln", unit(y.astype(jnp.float32)), unit(x.astype(jnp.float32)))  # eq. (1)
        log_tau = self.param("log_tau", nn.initializers.constant(math.log(self.tau_init)), ())
        log_scale = self.param("log_scale", nn.initializers.constant(math.log(self.scale_init)), ())
        cue = cue_mask(pad_mask, self.cues)  # (B, L)
        if self.retrieve:
            rng = self.make_rng("dropout") if train else None
            m = retrieval_mask(scores, self.ratio, jnp.exp(log_tau), rng)
        else:
            m = jnp.ones_like(scores)
        hard = jax.lax.stop_gradient(m)  # M's values: exactly {0, 1} (retrieval_mask's forward)
        k = jnp.maximum(hard.sum(-1, keepdims=True), 1.0)
        fa = nn.Dense(self.dim, dtype=self.dtype, name="aggregate")(
            jnp.einsum("bln,bnd->bld", m.astype(fv.dtype), fv) / k.astype(fv.dtype))  # eq. (5)  # fmt: skip
        if self.refine:  # eq. (6): each cue attends to its retrieved tokens only
            fa = fa + self._attend("refine_attn", fa, fv, hard[:, None] > 0.5)
            fa = self._mlp("refine_mlp", fa)
        keys = jnp.broadcast_to(cue[:, None, None, :], (b, 1, length, length))
        e = fa + self._attend("share_attn", fa, fa, keys)  # eq. (7)
        e = self._mlp("share_mlp", e)
        return {
            "expression": e,
            "expression_mask": cue,
            "global_logits": (scores[:, 0] * jnp.exp(log_scale)).reshape(b, h, w),
            "retrieved": hard,
        }
