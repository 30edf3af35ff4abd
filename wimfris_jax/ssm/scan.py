"""The selective scan (S6) of Mamba (Gu & Dao 2023, Algorithm 2 and eqs. (2a), (2b), (4)), channels last.

Semantics are those of mamba_ssm's ``selective_scan_ref`` (and of transformers' ``MambaMixer`` slow path)::

    delta = softplus(delta + delta_bias)                          (if asked)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     ZOH for A, Euler for B; h_0 = 0, (B, D, N)
    y_t   = <C_t, h_t> + D * u_t
    y     = y * SiLU(z)                                           (if z is given)

Three implementations compute the same recurrence:

* ``"associative"``: ``lax.associative_scan`` over the pairs ``(a_t, b_t) = (exp(delta_t A), delta_t B_t u_t)``
  with the combine ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``: O(log L) depth, but it materialises
  (B, L, D, N) tensors in the forward pass. Meant for GPU/TPU.
* ``"sequential"``: ``lax.scan`` over time whose step discretises in place, so the forward never holds more
  than one (B, D, N) state. For the backward pass the time axis is cut into chunks of K = ceil(sqrt(L))
  steps (:data:`SEQ_CHUNK`) under ``jax.checkpoint``: only the state at chunk boundaries is stored and each
  chunk is recomputed, which keeps residuals at O((L / K + K) B D N) instead of O(L B D N). Measured on a
  2-core CPU (benchmarks/bench_scan.py): fwd+bwd memory 600 -> 281 MiB at the WMF shape (128, 18, 1024, 16)
  for +8% time, and 253 -> 43 MiB at (2, 1025, 512, 16) while 20% faster; the forward alone is slower at
  short L (72 vs 39 ms at the WMF shape).
* ``"unrolled"``: the sequential step as an unrolled ``lax.scan`` (fully up to :data:`MAX_UNROLL` steps, in
  blocks of that many beyond; no rematerialisation):
  for the MTA's short sequences (17-22 words, a (2, 336, 16) state) it removes the per-step loop overhead that
  dominates there; its backward stores all L states, so it is kept for small states.

``impl=None`` picks :func:`default_impl` from the backend and the shape, by measurement on CPU
(``python -m benchmarks.bench_scan``, README "Selective scan"): ``"unrolled"`` for short sequences with a small
state (the MTA), ``"sequential"`` otherwise (the WMF's 128 x 18 x 1024 x 16 scan: 4x faster forward and
backward than associative, 7x less memory; L = 1025 likewise). On a GPU (measured on an H200, bf16 model, float32
scan, ``benchmarks/device_check.py``, README "Measured on an H200"): ``"unrolled"`` for every sequence of at most
:data:`UNROLL_MAX_LENGTH` steps whatever its state (WMF fwd+bwd 1.04 ms vs associative 3.79, sequential 3.31; MTA
0.31 vs 0.39 / 1.20), ``"associative"`` for longer ones (unmeasured); on TPU ``"associative"`` (unmeasured).

Numerics: everything is computed in float32 and the result is cast back to ``u.dtype``. ``softplus`` is the
overflow-free ``logaddexp(x, 0)``. The log-decay ``delta * A`` is clamped to <= 0, so ``exp`` can never
overflow: for valid inputs (A < 0, delta >= 0) this changes nothing, and each ``a_t`` lies in [0, 1], so the
products in the combine only ever shrink (they underflow to 0 for huge ``delta``, which is the right limit).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from wimfris_jax.platform import target_platform

Impl = Literal["associative", "sequential", "unrolled"]
IMPLS: tuple[str, ...] = ("associative", "sequential", "unrolled")
# Time steps per rematerialised chunk of the sequential scan's backward pass: None = ceil(sqrt(L)), which
# minimises the O(L / K + K) residuals; 0 = no rematerialisation (all L states are stored for the backward).
SEQ_CHUNK: int | None = None


MAX_UNROLL = 64  # "unrolled" unrolls at most this many steps per loop iteration (compile time grows with it)
UNROLL_MAX_LENGTH = 32  # default "unrolled" up to this many steps (CPU and GPU) ...
UNROLL_MAX_STATE = 2**16  # ... and, on CPU, this many state entries B * D * N (MTA: 10,752; WMF at batch 2: 2,097,152)


def default_impl(platform: str | None = None, length: int | None = None, state_size: int | None = None) -> str:
    """The scan for a platform and a problem: on CPU (measured) ``"unrolled"`` when ``length`` <=
    :data:`UNROLL_MAX_LENGTH` and ``state_size`` (B * D * N) <= :data:`UNROLL_MAX_STATE`, else ``"sequential"``;
    on GPU (measured on an H200) ``"unrolled"`` when ``length`` <= :data:`UNROLL_MAX_LENGTH`, else
    ``"associative"``; ``"associative"`` on TPU (unmeasured). ``platform`` defaults to the platform being compiled
    for (:func:`wimfris_jax.platform.target_platform`)."""
    platform = platform or target_platform()
    short = length is not None and length <= UNROLL_MAX_LENGTH
    if platform == "gpu" and short:
        return "unrolled"
    if platform != "cpu":
        return "associative"
    small = state_size is not None and state_size <= UNROLL_MAX_STATE
    return "unrolled" if short and small else "sequential"


def _log_decay(delta: jnp.ndarray, A: jnp.ndarray) -> jnp.ndarray:
    """delta (..., D), A (D, N) -> delta * A (..., D, N), clamped to <= 0 (exp never overflows)."""
    x = delta[..., None] * A
    return jnp.where(x > 0, 0.0, x)


def _combine(left: tuple[jnp.ndarray, jnp.ndarray], right: tuple[jnp.ndarray, jnp.ndarray]):
    """Composition of the affine maps h -> a h + b, left (earlier) first."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _scan_associative(u, delta, A, B, C) -> jnp.ndarray:
    """u, delta (B, L, D); A (D, N); B, C (B, L, N) -> <C_t, h_t> (B, L, D)."""
    a = jnp.exp(_log_decay(delta, A))  # (B, L, D, N)
    b = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, D, N)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return jnp.sum(h * C[:, :, None, :], axis=-1)


def _scan_sequential(u, delta, A, B, C, chunk: int | None = None, unroll: bool = False) -> jnp.ndarray:
    """Same contract as :func:`_scan_associative`; never holds a (B, L, D, N) tensor in the forward pass.

    ``chunk``: time steps per rematerialised chunk (None: :data:`SEQ_CHUNK`; 0: plain ``lax.scan``).
    ``unroll``: one fully unrolled ``lax.scan`` instead (no loop, no rematerialisation: XLA sees all L steps).
    """
    bsz, length, d = u.shape
    chunk = 0 if unroll else SEQ_CHUNK if chunk is None else chunk
    chunk = math.ceil(math.sqrt(length)) if chunk is None else chunk
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C))  # time-major: (L, B, D) / (L, B, N)

    def step(h, x):
        u_t, dt_t, b_t, c_t = x
        h = jnp.exp(_log_decay(dt_t, A)) * h + (dt_t * u_t)[..., None] * b_t[:, None, :]
        return h, jnp.sum(h * c_t[:, None, :], axis=-1)

    h0 = jnp.zeros((bsz, d, A.shape[1]), jnp.float32)
    if chunk <= 0 or length <= chunk:
        _, y = lax.scan(step, h0, xs, unroll=min(length, MAX_UNROLL) if unroll else 1)
        return jnp.swapaxes(y, 0, 1)

    @jax.checkpoint
    def chunk_step(h, xc):
        return lax.scan(step, h, xc)

    # L = n * K + r: n rematerialised chunks, then the r leftover steps as a plain scan (padding instead
    # measured slower: it copies every input).
    n, r = divmod(length, chunk)
    head = tuple(x[: n * chunk].reshape(n, chunk, *x.shape[1:]) for x in xs)
    h, y = lax.scan(chunk_step, h0, head)
    y = y.reshape(n * chunk, bsz, d)
    if r:
        _, y_tail = lax.scan(step, h, tuple(x[n * chunk :] for x in xs))
        y = jnp.concatenate([y, y_tail], axis=0)
    return jnp.swapaxes(y, 0, 1)


def selective_scan(
    u: jnp.ndarray,
    delta: jnp.ndarray,
    A: jnp.ndarray,
    B: jnp.ndarray,
    C: jnp.ndarray,
    D: jnp.ndarray | None = None,
    z: jnp.ndarray | None = None,
    delta_bias: jnp.ndarray | None = None,
    delta_softplus: bool = False,
    impl: Impl | None = None,
) -> jnp.ndarray:
    """The selective scan; see the module docstring for the recurrence.

    Args:
      u: (B, L, D) input sequence.
      delta: (B, L, D) time steps (before ``delta_bias`` and softplus).
      A: (D, N) state matrix (diagonal per channel), negative real.
      B, C: (B, L, N) input-dependent input and output matrices.
      D: (D,) skip connection, or None.
      z: (B, L, D) gate, or None; the output is multiplied by SiLU(z).
      delta_bias: (D,) added to ``delta`` before the softplus, or None.
      delta_softplus: apply softplus to ``delta`` (after ``delta_bias``).
      impl: ``"associative"``, ``"sequential"``, ``"unrolled"`` or None (:func:`default_impl`).

    Returns:
      y: (B, L, D), in ``u.dtype``.
    """
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must be (B, L, D), got shape {u.shape}")
    bsz, length, d = u.shape
    impl = default_impl(length=length, state_size=bsz * d * A.shape[-1]) if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS} or None, got {impl!r}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (D={d}, N), got shape {A.shape}")
    n = A.shape[1]
    checks = {"delta": (delta, (bsz, length, d)), "B": (B, (bsz, length, n)), "C": (C, (bsz, length, n))}
    checks.update({k: (v, s) for k, v, s in (("z", z, u.shape), ("D", D, (d,)), ("delta_bias", delta_bias, (d,)))})
    for name, (x, shape) in checks.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(x.shape)}")

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    u32, delta, A, B, C = (f32(x) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + f32(delta_bias)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    if impl == "associative":
        y = _scan_associative(u32, delta, A, B, C)
    else:
        y = _scan_sequential(u32, delta, A, B, C, unroll=impl == "unrolled")
    if D is not None:
        y = y + u32 * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    return y.astype(u.dtype)
