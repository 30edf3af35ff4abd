"""One attention function for every softmax attention of the package, with a choice of implementation.

    out = softmax(q k^T / sqrt(D) [masked]) [dropout] v      q (B, Tq, H, D), k, v (B, Tk, H, D) -> (B, Tq, H, D)

``implementation`` (``config.model.attention``):

- ``"xla"``: :func:`jax.nn.dot_product_attention` with ``implementation="xla"``: the (B, H, Tq, Tk) scores are
  materialised. Attention-weight dropout, which ``jax.nn`` does not offer, is applied on the same dense path.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused (flash) kernel, where its
  rules allow (:func:`cudnn_applies`): an NVIDIA GPU, bfloat16 / float16 inputs, head size a multiple of 8 up to 128.
  Under differentiation cuDNN refuses odd sequence lengths (measured on an H200, README "Measured on an H200"), so
  an odd query or key length is padded up to a multiple of :data:`CUDNN_PAD` with the real lengths passed as
  ``query_seq_lengths`` / ``key_value_seq_lengths`` (:func:`padded_attention`: DINOv2's 1,029 tokens run as
  1,040: 2.1% more attention FLOPs). Calls the rules refuse (head size 12, float32) and calls with active dropout, which
  ``jax.nn`` does not offer, take the XLA / dense path instead of failing.
- ``"chunked"``: :func:`chunked_attention` (:mod:`wimfris_jax.chunked_attention`), query-chunked attention with a
  recomputing backward pass (FlashAttention-2's, in pure JAX): at most (B, H, Tk, chunk) scores are alive at once,
  forward or backward, and the backward keeps only q, k, v, the output and two softmax statistics per query.
- ``"auto"`` (default): cuDNN on a GPU wherever its rules allow, else XLA (TPU: XLA); on CPU ``"chunked"`` for key
  sequences of at least :data:`CHUNKED_MIN_KEYS` (DINOv2's 1,029 tokens, the decoder's 1,024 pixels), where it
  measured 2-3x faster than the dense form forward and backward and on par with PyTorch's fused CPU kernel
  (README, "Attention"), and XLA for the short word sequences.

The platform is the one being compiled for (:func:`wimfris_jax.platform.target_platform`), not the host's.

Masks follow flax: boolean, broadcastable to (B, H, Tq, Tk), True = attend; a masked score becomes the float
minimum, so a row with no allowed key attends uniformly (as ``flax.linen.dot_product_attention``). Softmax
statistics are float32 whatever the input dtype; the output has the query's dtype.

:func:`multi_head_attention` builds ``flax.linen.MultiHeadDotProductAttention`` (parameter names and layout
unchanged: ``query``/``key``/``value``/``out``) with this function as its ``attention_fn``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.chunked_attention import big_neg, chunked_attention
from wimfris_jax.layers import keep_mask, remat, resolve_remat
from wimfris_jax.platform import target_platform

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
# CPU "auto": chunked from this many keys on. benchmarks/bench_attention.py, fwd+bwd: at 128 keys XLA's dense
# form is ahead (12 vs 15 ms), at 256 the chunked one (23 vs 59 ms), at 1,029 by 2.5-2.9x.
CHUNKED_MIN_KEYS = 256
# cuDNN: odd lengths are padded up to a multiple of this. H200, DINOv2-B attention (32, 1029 tokens, 12 x 64, bf16)
# fwd+bwd: padded to 1,032 1.81 ms, to 1,040 1.71 ms, to 1,088 1.63 ms; XLA unpadded 6.59 ms.
CUDNN_PAD = 16
CUDNN_MAX_HEAD = 128  # 256 on Hopper and later with a recent cuDNN; 128 holds on every GPU JAX compiles for


def _check(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")


def cudnn_applies(query: Array, key: Array) -> bool:
    """cuDNN's fused attention rules that padding cannot meet (JAX's ``check_is_flash_attention``): half precision,
    one dtype, head size a multiple of 8 up to :data:`CUDNN_MAX_HEAD`. Sequence lengths are met by padding."""
    d = query.shape[-1]
    half = query.dtype in (jnp.bfloat16, jnp.float16) and query.dtype == key.dtype
    return half and d % 8 == 0 and d <= CUDNN_MAX_HEAD


def resolve(implementation: str, query: Array, key: Array, *, dropout: bool = False) -> str:
    """The implementation a call runs with on the target platform: "xla", "cudnn", "chunked" or "dense" (XLA with
    dropout). ``"cudnn"`` off a GPU is refused; on a GPU, a call its rules refuse runs with XLA. Inside
    :func:`record_decisions` each call is also recorded with the reason."""
    chosen, why = _resolve(implementation, query, key, dropout)
    if (log := _DECISIONS.get()) is not None:
        log.append({"q": tuple(query.shape), "kv_len": key.shape[1], "dtype": str(query.dtype),
                    "requested": implementation, "chosen": chosen, "why": why})  # fmt: skip
    return chosen


def _resolve(implementation: str, query: Array, key: Array, dropout: bool) -> tuple[str, str]:
    _check(implementation)
    platform = target_platform()
    if implementation == "auto":
        if platform == "gpu" and not dropout and cudnn_applies(query, key):
            return "cudnn", "cuDNN's rules hold" + (" (padded)" if query.shape[1] % 2 or key.shape[1] % 2 else "")
        if platform == "cpu" and key.shape[1] >= CHUNKED_MIN_KEYS:
            return "chunked", f"CPU, {key.shape[1]} >= {CHUNKED_MIN_KEYS} keys"
        if platform == "gpu":
            return ("dense" if dropout else "xla"), _cudnn_refusal(query, key, dropout)
        implementation = "xla"
    if implementation == "cudnn":
        if platform != "gpu":
            raise ValueError(
                f"attention='cudnn' needs an NVIDIA GPU, but this is compiled for {platform!r} "
                "(use attention='auto' to fall back where it does not apply)"
            )
        if dropout or not cudnn_applies(query, key):
            return ("dense" if dropout else "xla"), _cudnn_refusal(query, key, dropout)
        return "cudnn", "requested"
    if implementation == "xla" and dropout:
        return "dense", "attention dropout"
    return implementation, "requested" if implementation != "xla" else f"{platform}: XLA"


def _cudnn_refusal(query: Array, key: Array, dropout: bool) -> str:
    """Why cuDNN does not take a call: attention dropout, dtype or head size."""
    if dropout:
        return "attention dropout (jax.nn's cuDNN attention has none)"
    if query.dtype not in (jnp.bfloat16, jnp.float16) or query.dtype != key.dtype:
        return f"{query.dtype} (cuDNN: bfloat16 / float16)"
    return f"head size {query.shape[-1]} (cuDNN: a multiple of 8 up to {CUDNN_MAX_HEAD})"


_DECISIONS: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("attention_decisions", default=None)


@contextlib.contextmanager
def record_decisions() -> Iterator[list[dict]]:
    """Collects every :func:`resolve` made while tracing inside the block (shapes, requested, chosen, why): the
    census of attention kernels a compiled model uses (``benchmarks/aot.py``)."""
    log: list[dict] = []
    token = _DECISIONS.set(log)
    try:
        yield log
    finally:
        _DECISIONS.reset(token)


def key_padding_mask(pad_mask: Array | None, queries: int | None = None) -> Array | None:
    """The one home of key masks: (B, Lk) True = padding (``ids == 0``, an unused cue) -> the attention mask
    (B, 1, 1, Lk) True = attend, broadcast over heads and queries, or (B, 1, queries, Lk) spelled out; None stays
    None (no padding)."""
    if pad_mask is None:
        return None
    mask = jnp.logical_not(jnp.asarray(pad_mask, bool))[:, None, None, :]
    return mask if queries is None else jnp.broadcast_to(mask, (mask.shape[0], 1, queries, mask.shape[-1]))


def _pad_to(x: Array, axis: int, length: int, value: Any = 0) -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def padded_attention(query: Array, key: Array, value: Array, mask: Array | None, implementation: str,
                     multiple: int = CUDNN_PAD, bias: Array | None = None) -> Array:  # fmt: skip
    """``jax.nn.dot_product_attention`` with odd query / key lengths padded up to a multiple of ``multiple``, the
    real lengths given as ``query_seq_lengths`` / ``key_value_seq_lengths`` (padded keys get no weight, padded
    queries are cut off), so cuDNN takes it under differentiation. Even lengths run as they are.

    q (B, Tq, H, D), k, v (B, Tk, H, D), mask bool (B|1, H|1, Tq|1, Tk|1) or None, bias float of the same shape or
    None -> (B, Tq, H, D)."""
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    tp = t if t % 2 == 0 else -(-t // multiple) * multiple
    sp = s if s % 2 == 0 else -(-s // multiple) * multiple
    if mask is not None:  # cuDNN takes a mask as a bias of full (Tq, Tk); padded keys get none
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s))
    if (tp, sp) == (t, s):
        return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, implementation=implementation)
    if mask is not None:  # padded query rows may attend (they are cut off), padded keys may not
        mask = _pad_to(_pad_to(mask, 2, tp, True), 3, sp, False)
    if bias is not None:  # padded keys are excluded by the key lengths; their bias is never read
        bias = _pad_to(_pad_to(bias, 2, tp), 3, sp)
    out = jax.nn.dot_product_attention(
        _pad_to(query, 1, tp), _pad_to(key, 1, sp), _pad_to(value, 1, sp), bias=bias, mask=mask,
        query_seq_lengths=jnp.full((b,), t, jnp.int32), key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
        implementation=implementation,
    )  # fmt: skip
    return out[:, :t]


def _dense(q: Array, k: Array, v: Array, mask: Array | None, rng: Array | None, rate: float,
           bias: Array | None = None) -> Array:  # fmt: skip
    """Materialised attention with weight dropout (flax's dot_product_attention maths, float32 softmax)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                   preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    if bias is not None:
        s = s + bias.astype(s.dtype)
    if mask is not None:
        s = jnp.where(mask, s, big_neg(s.dtype))
    p = jax.nn.softmax(s, axis=-1)
    if rng is not None and rate > 0.0:
        p = jnp.where(keep_mask(rng, rate, p.shape), p / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    bias: Array | None = None,
    implementation: str = "auto",
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
) -> Array:
    """Softmax attention (module docstring): (B, Tq, H, D), (B, Tk, H, D), (B, Tk, H, D) -> (B, Tq, H, D).

    ``bias``: added to the scaled scores (in float32, or float64 for float64 inputs) before the mask and the
    softmax, broadcastable to (B, H, Tq, Tk): Swin's relative-position bias and shift mask. With a bias the chunked
    path (which has none) runs as XLA's dense form, and cuDNN pads the bias as it pads the mask."""
    dropout = not deterministic and dropout_rate > 0.0
    if dropout and dropout_rng is None:
        raise ValueError("attention dropout needs a dropout_rng")
    impl = resolve(implementation, query, key, dropout=dropout)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape).astype(jnp.promote_types(query.dtype, jnp.float32))
        impl = "xla" if impl == "chunked" else impl
    if impl == "chunked":
        return chunked_attention(query, key, value, mask, dropout_rng=dropout_rng if dropout else None,
                                 dropout_rate=dropout_rate if dropout else 0.0)
    if impl == "dense":
        return _dense(query, key, value, mask, dropout_rng, dropout_rate, bias)
    if impl == "cudnn":
        return padded_attention(query, key, value, mask, "cudnn", bias=bias).astype(query.dtype)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation=impl).astype(query.dtype)  # fmt: skip


def attention_fn(implementation: str = "auto"):
    """``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` running :func:`dot_product_attention`."""
    _check(implementation)

    def fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0, broadcast_dropout=False,
           deterministic=True, dtype=None, precision=None):
        del dtype, precision  # the projections have already cast q, k, v
        if broadcast_dropout and not deterministic and dropout_rate > 0.0:
            raise ValueError("attention dropout is drawn per weight here: use broadcast_dropout=False")
        return dot_product_attention(query, key, value, mask, implementation=implementation, dropout_rng=dropout_rng,
                                     dropout_rate=dropout_rate, deterministic=deterministic)

    return fn


def multi_head_attention(
    num_heads: int,
    features: int,
    *,
    implementation: str = "auto",
    dropout_rate: float = 0.0,
    dtype: Any = None,
    name: str | None = None,
    remat_mode: str = "none",
    **kwargs: Any,
) -> nn.MultiHeadDotProductAttention:
    """``flax.linen.MultiHeadDotProductAttention`` (q, k, v and output widths ``features``, biases, attention
    dropout drawn per weight as PyTorch does) running :func:`dot_product_attention` with ``implementation``,
    rematerialised as ``remat_mode`` (:func:`wimfris_jax.layers.remat`; only for modules without dropout).
    Extra keyword arguments (initialisers) go to the flax module."""
    remat_mode = resolve_remat(remat_mode)
    if remat_mode != "none" and dropout_rate > 0.0:
        raise ValueError("rematerialised attention cannot take dropout (a bool argument)")
    return remat(nn.MultiHeadDotProductAttention, remat_mode)(
        num_heads=num_heads,
        qkv_features=features,
        out_features=features,
        dropout_rate=dropout_rate,
        broadcast_dropout=False,
        dtype=dtype,
        attention_fn=attention_fn(implementation),
        name=name,
        **kwargs,
    )
