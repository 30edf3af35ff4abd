"""Query-chunked softmax attention with a recomputing (FlashAttention-2 style) backward pass, in pure JAX:
``implementation="chunked"`` of :func:`wimfris_jax.attention.dot_product_attention` (the CPU default for long key
sequences; README "Attention").

At most (B, H, Tk, chunk) scores are alive at once, forward or backward, and the backward keeps only q, k, v, the
output and two softmax statistics per query (no (Tq, Tk) probabilities). Scores are laid out keys-major: XLA:CPU
vectorises a reduction over a major axis far better than over the minor one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from wimfris_jax.layers import keep_mask

Array = jax.Array
DEFAULT_CHUNK = 128  # queries per chunk: the CPU optimum of 64 / 128 / 256 in benchmarks/bench_attention.py


def big_neg(dtype: Any) -> Array:
    """The score a masked position gets: the dtype's most negative finite value (flax's convention)."""
    return jnp.asarray(jnp.finfo(dtype).min, dtype)


def _chunks(x: Array, axis: int, chunk: int) -> Array:
    """Pads ``axis`` to a multiple of ``chunk`` and moves the chunk index to the front: (n, ..., chunk, ...)."""
    n = -(-x.shape[axis] // chunk)
    pad = n * chunk - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=True if x.dtype == jnp.bool_ else 0)
    x = x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unchunk(x: Array, length: int) -> Array:
    """(n, B, chunk, ...) -> (B, length, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _mask_chunks(mask: Array | None, length: int, chunk: int) -> Array | None:
    """Mask (Bm, Hm, Tm, S), Tm in {1, length} -> per-chunk masks, keys major: (n, Bm, Hm, S, chunk | 1)."""
    if mask is None:
        return None
    if mask.shape[2] == 1:
        n = -(-length // chunk)
        return jnp.broadcast_to(jnp.swapaxes(mask, -1, -2)[None], (n,) + mask.shape[:2] + (mask.shape[3], 1))
    return jnp.swapaxes(_chunks(mask, 2, chunk), -1, -2)


def _scores_t(qi: Array, kh: Array, mask_i: Array | None) -> Array:
    """(B, c, H, D) x (B, H, S, D) -> float32 scores (B, H, S, c) (keys major: the softmax reduces over a major
    axis, which XLA:CPU vectorises far better than a minor-axis reduction)."""
    s = jnp.einsum("bqhd,bhkd->bhkq", qi, kh, preferred_element_type=jnp.float32)
    return s if mask_i is None else jnp.where(mask_i, s, big_neg(s.dtype))


def _drop_chunk(rng: Array | None, rate: float, i: Array, shape: tuple[int, ...]) -> Array | None:
    return None if rng is None or rate <= 0.0 else keep_mask(jax.random.fold_in(rng, i), rate, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(q, k, v, mask, rng, rate, chunk):
    return _chunked_fwd(q, k, v, mask, rng, rate, chunk)[0]


def _chunked_fwd(q, k, v, mask, rng, rate, chunk):
    b, t, h, d = q.shape
    qs = q * jnp.asarray(d**-0.5, q.dtype)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, H, S, D)
    masks = _mask_chunks(mask, t, chunk)
    drop_shape = (b, h, k.shape[1], chunk)

    def one(args):
        i, qi, mask_i = args
        s = _scores_t(qi, kh, mask_i)  # (B, H, S, c)
        m = s.max(axis=2)
        p = jnp.exp(s - m[:, :, None])
        denom = p.sum(axis=2)  # (B, H, c)
        keep = _drop_chunk(rng, rate, i, drop_shape)
        if keep is not None:
            p = jnp.where(keep, p / (1.0 - rate), 0.0)
        o = jnp.einsum("bhkq,bhkd->bqhd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
        o = o / jnp.swapaxes(denom, 1, 2)[..., None]
        return o.astype(q.dtype), (m, 1.0 / denom)  # not m + log(denom): finfo.min + log(S) rounds to finfo.min

    qc = _chunks(qs, 1, chunk)
    out, stats = jax.lax.map(one, (jnp.arange(qc.shape[0]), qc, masks))
    out = _unchunk(out, t)
    return out, (q, k, v, mask, rng, out, stats)


def _chunked_bwd(rate, chunk, res, g):
    q, k, v, mask, rng, out, (m, inv_denom) = res
    b, t, h, d = q.shape
    scale = d**-0.5
    qs = q * jnp.asarray(scale, q.dtype)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    delta = jnp.einsum("bthd,bthd->bth", out.astype(jnp.float32), g.astype(jnp.float32))  # rowsum(dO * O)
    masks = _mask_chunks(mask, t, chunk)
    drop_shape = (b, h, k.shape[1], chunk)

    def one(carry, args):
        dk, dv = carry
        i, qi, gi, m_i, inv_i, delta_i, mask_i = args
        s = _scores_t(qi, kh, mask_i)
        p = jnp.exp(s - m_i[:, :, None]) * inv_i[:, :, None]  # (B, H, S, c) softmax, recomputed
        dp = jnp.einsum("bqhd,bhkd->bhkq", gi, vh, preferred_element_type=jnp.float32)
        keep = _drop_chunk(rng, rate, i, drop_shape)
        pd = p
        if keep is not None:
            pd = jnp.where(keep, p / (1.0 - rate), 0.0)
            dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
        dv = dv + jnp.einsum("bhkq,bqhd->bhkd", pd.astype(g.dtype), gi, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.swapaxes(delta_i, 1, 2)[:, :, None])
        if mask_i is not None:
            ds = jnp.where(mask_i, ds, 0.0)
        ds = ds.astype(q.dtype)
        dk = dk + jnp.einsum("bhkq,bqhd->bhkd", ds, qi, preferred_element_type=jnp.float32)
        dq = jnp.einsum("bhkq,bhkd->bqhd", ds, kh, preferred_element_type=jnp.float32) * scale
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(kh.shape, jnp.float32)
    qc = _chunks(qs, 1, chunk)
    xs = (jnp.arange(qc.shape[0]), qc, _chunks(g, 1, chunk), m, inv_denom, _chunks(delta, 1, chunk), masks)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), xs)
    dk = jnp.swapaxes(dk, 1, 2).astype(k.dtype)  # d(q_scaled . k)/dk = q_scaled: the scale is in qi
    dv = jnp.swapaxes(dv, 1, 2).astype(v.dtype)
    return _unchunk(dq, t), dk, dv, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Array:
    """Query-chunked softmax attention, differentiable, with a recomputing (flash-style) backward pass.

    Args:
      query: (B, Tq, H, D); key, value: (B, Tk, H, D).
      mask: optional bool, broadcastable to (B, H, Tq, Tk); True = attend.
      dropout_rng, dropout_rate: dropout on the attention weights (each weight independently); the backward
        pass regenerates the same keep mask from the key.
      chunk_size: queries per chunk; the scores alive at once are (B, H, Tk, chunk_size) float32.

    Returns:
      (B, Tq, H, D) in the query's dtype.
    """
    b, t, h, _ = query.shape
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.shape[-1] != key.shape[1]:
            mask = jnp.broadcast_to(mask, mask.shape[:-1] + (key.shape[1],))
        if mask.shape[2] not in (1, t):
            raise ValueError(f"mask {mask.shape} does not broadcast to (B, H, {t}, {key.shape[1]})")
    rng = dropout_rng if dropout_rate > 0.0 else None
    return _chunked(query, key, value, mask, rng, float(dropout_rate), int(min(chunk_size, t)))
