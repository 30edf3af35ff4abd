"""VIPA's Visual Expression Generator (Sec. III-B, eqs. 1-7): retrieve the visual tokens each linguistic cue points
at, refine them, and let them share attributes; the result is the decoder's key-value set.

    X = phi_V(F_v) (B, N, D), Y = phi_L(E_L) (B, L, D)         F_v = the last stage's features, N = h * w
    S_c = cos(Y, X)                                              (B, L, N)                           eq. (1)
    train: S' = softmax((a S_c + g) / tau), g ~ Gumbel; eval: S' = softmax(a S_c / tau), a = score_scale (1)  eq. (2)
    M = 1 on the k = ceil(r N) largest S' of each row, straight-through (M + S' - sg(S'))          eq. (3)
    F_a = linear(sum_n M F_v / k)                                                                   eq. (5)
    F^ = MHCA(F_a, F_v, mask M) + F_a;  F_r = MLP(F^) + F^                                          eq. (6)
    E^ = MHSA(F_r) + F_r;  E_V = MLP(E^) + E^                                                       eq. (7)

Rows are the cues: [CLS] (global) and the words (local), ``cues`` picks "both" | "global" | "local" (Table VI b);
words whose id is in ``skip_ids`` (articles, Table IX "w/o articles") are dropped as cues. Padded words, unpicked
and skipped cues are masked as keys wherever the expression is attended to (eq. 7, the decoder). ``retrieve=False``
uses every visual token (M = 1, Table VI a "w/o step 1"); ``refine=False`` skips Step 2's eqs. (6) and (7)
(E_V = F_a, "w/o step 2"); ``share=False`` skips eq. (7) alone (E_V = F_r). The [CLS] row of S_c is the relevance
map the loss supervises ("relevance"); times a learnable scale, it is eq. (4)'s logit map ("global_logits").
The attention and MLP sublayers are pre-norm (the paper writes no norm; decision in docs/VIPA.md).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask, multi_head_attention
from wimfris_jax.layers import Mlp, gelu_exact, layer_norm

Array = jax.Array
CUES = ("both", "global", "local")


def cue_mask(pad_mask: Array, cues: str) -> Array:
    """(B, L) True = padding -> (B, L) True = a cue row in use: [CLS] (row 0) for "global", the words for "local"."""
    if cues not in CUES:
        raise ValueError(f"cues={cues!r}: choose one of {list(CUES)}")
    valid = ~pad_mask
    first = jnp.arange(pad_mask.shape[1])[None, :] == 0
    return valid & first if cues == "global" else (valid & ~first if cues == "local" else valid)


def retrieved_count(n: int, ratio: float) -> int:
    """k = ceil(r N), at least 1 and at most N: the tokens each cue retrieves (eq. 2's R)."""
    return min(n, max(1, math.ceil(ratio * n)))


def retrieval_mask(scores: Array, ratio: float, tau: Array, rng: Array | None, scale: float = 1.0) -> Array:
    """Straight-through Gumbel top-k, eqs. (2)-(3): scores (B, L, N) -> M (B, L, N), 1 on the k = ceil(ratio N)
    largest of softmax((scale * S + g) / tau) in each row (forward), that softmax's gradient (backward); rng None: no
    noise. Neither tau nor scale changes the noise-free selection (top-k of S); scale sets how much the noise moves it.
    The k are picked on the logits by index, exactly k even where the softmax underflows to ties at 0."""
    n = scores.shape[-1]
    logits = scale * scores.astype(jnp.float32)
    if rng is not None:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    logits = logits / tau
    soft = jax.nn.softmax(logits, axis=-1)
    hard = jax.nn.one_hot(jax.lax.top_k(logits, retrieved_count(n, ratio))[1], n, dtype=jnp.float32).sum(-2)
    return hard + (soft - jax.lax.stop_gradient(soft))  # exactly {0, 1} forward: soft - soft == 0


def selection_overlap(a: Array, b: Array, rows: Array) -> Array:
    """Mean over the True ``rows`` (B, L) of |a n b| / |a|: the share of one selection (B, L, N) in {0, 1} (k per
    row) that another selection keeps; k / N for two independent uniform draws."""
    shared = (a * b).sum(-1) / jnp.maximum(a.sum(-1), 1.0)
    return jnp.sum(jnp.where(rows, shared, 0.0)) / jnp.maximum(rows.sum(), 1)


class VEG(nn.Module):
    """Visual Expression Generator: (F_v (B, h, w, C), words (B, L, Dt), pad_mask (B, L), ids (B, L) when
    ``skip_ids``) -> dict "expression" (B, L, dim), "expression_mask" (B, L) True = usable key, "global_logits"
    (B, h, w) eq. (4)'s logits, "relevance" (B, h, w) the [CLS] row of S_c, "scores" (B, L, N) S_c, "retrieved"
    (B, L, N) the hard mask M.

    Attributes: dim (D, the decoder width), num_heads, ratio (r, 0.3), cues, skip_ids (token ids that are no cue,
    default none), retrieve, refine (Step 2: eqs. 6-7), share (eq. 7), score_scale (a of eq. 2, 1 = the paper's),
    tau_init (the learnable Gumbel-softmax temperature, 1 as Jang et al.), scale_init (contrastive logit scale),
    dtype.
    """

    dim: int = 256
    num_heads: int = 8
    ratio: float = 0.3
    cues: str = "both"
    skip_ids: tuple[int, ...] = ()
    retrieve: bool = True
    refine: bool = True
    share: bool = True
    score_scale: float = 1.0
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

    def _cues(self, pad_mask: Array, ids: Array | None) -> Array:
        """(B, L) True = a cue row in use: ``cues``' rows, less padding and the words of ``skip_ids``."""
        cue = cue_mask(pad_mask, self.cues)
        if not self.skip_ids:
            return cue
        if ids is None:
            raise ValueError(f"VEG skip_ids={self.skip_ids}: pass the token ids (ids=...) to find those words")
        return cue & ~jnp.isin(ids, jnp.asarray(self.skip_ids, ids.dtype))

    @nn.compact
    def __call__(
        self, vision: Array, words: Array, pad_mask: Array, *, ids: Array | None = None, train: bool = False
    ) -> dict[str, Array]:
        b, h, w, _ = vision.shape
        n, length = h * w, words.shape[1]
        fv = nn.Dense(self.dim, dtype=self.dtype, name="vision_in")(vision.reshape(b, n, -1))  # F_v in D
        x = nn.Dense(self.dim, dtype=self.dtype, name="phi_v")(fv)
        y = nn.Dense(self.dim, dtype=self.dtype, name="phi_l")(words)
        unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6)  # noqa: E731
        scores = jnp.einsum("bld,bnd->bln", unit(y.astype(jnp.float32)), unit(x.astype(jnp.float32)))  # eq. (1)
        log_tau = self.param("log_tau", nn.initializers.constant(math.log(self.tau_init)), ())
        log_scale = self.param("log_scale", nn.initializers.constant(math.log(self.scale_init)), ())
        cue = self._cues(pad_mask, ids)  # (B, L)
        if self.retrieve:
            rng = self.make_rng("dropout") if train else None
            m = retrieval_mask(scores, self.ratio, jnp.exp(log_tau), rng, self.score_scale)
        else:
            m = jnp.ones_like(scores)
        hard = jax.lax.stop_gradient(m)  # M's values: exactly {0, 1} (retrieval_mask's forward)
        k = jnp.maximum(hard.sum(-1, keepdims=True), 1.0)
        e = nn.Dense(self.dim, dtype=self.dtype, name="aggregate")(
            jnp.einsum("bln,bnd->bld", m.astype(fv.dtype), fv) / k.astype(fv.dtype))  # eq. (5): F_a  # fmt: skip
        if self.refine:  # eq. (6): each cue attends to its retrieved tokens only -> F_r
            e = self._mlp("refine_mlp", e + self._attend("refine_attn", e, fv, hard[:, None] > 0.5))
            if self.share:  # eq. (7): the cues in use share attributes -> E_V
                keys = key_padding_mask(~cue, length)  # the cues in use are the keys
                e = self._mlp("share_mlp", e + self._attend("share_attn", e, e, keys))
        relevance = scores[:, 0].reshape(b, h, w)
        return {
            "expression": e,
            "expression_mask": cue,
            "global_logits": relevance * jnp.exp(log_scale),
            "relevance": relevance,
            "scores": scores,
            "retrieved": hard,
        }
