"""Small building blocks shared by the adapters, the necks and the projector.

- :func:`batch_norm`: ``flax.linen.BatchNorm`` set up as PyTorch's ``nn.BatchNorm{1,2}d``.
- :class:`ConvBNReLU`: conv ('same' zero padding) + BatchNorm + ReLU, DETRIS's ``BasicConv1d/2d`` (with bias,
  eps 1e-3) and ``conv_layer`` (1x1, no bias, eps 1e-5).
- PyTorch's default initialisers, for layers that start as their PyTorch counterparts do.
- :func:`conv`: ``flax.linen.Conv`` whose 1x1 kernels run as a matrix product (same parameters).
- :func:`fusion_barrier`: an identity XLA cannot fuse across (between transformer blocks).
- :func:`remat`: a module class (or a function of a module) under ``flax.linen.remat`` with one of the
  ``train.remat`` policies.
- :func:`keep_mask` / :class:`Dropout`: dropout from 16 random bits per entry (PyTorch's semantics, a third of
  the PRNG time of flax's ``nn.Dropout`` on CPU).

BatchNorm uses batch statistics when ``train`` and running statistics otherwise. Under ``jax.jit`` with the batch
sharded over a mesh the batch mean/variance are reductions over the global (logical) array, so they are global
statistics (SyncBatchNorm) without an ``axis_name``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.platform import target_platform

Initializer = nn.initializers.Initializer

BN_MOMENTUM = 0.9  # flax convention: new = momentum * old + (1 - momentum) * batch; PyTorch's momentum 0.1

# PyTorch's kaiming_normal_ (fan_in, ReLU gain), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's default Linear / Conv weight init: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# timm / DINOv2 ``init_weights_vit_timm``: trunc_normal_(std=0.02), which PyTorch truncates at +-2 *absolute*
# (= +-100 std), i.e. effectively a plain N(0, 0.02^2); flax's bounds are in std units (default +-2 std, which
# would shrink the std to 0.88 * 0.02). DETRIS applies it to every nn.Linear inside its DINOv2 ViT, adapters
# included (docs/detris_code.md "Initialisation of the adapters").
vit_trunc_normal = nn.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
# PyTorch's xavier_uniform_ (gain 1): uniform, var = 2 / (fan_in + fan_out); e.g. nn.MultiheadAttention's separate
# q/k/v projection weights when kdim != embed_dim.
xavier_uniform = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def uniform(bound: float) -> Initializer:
    """Uniform in [-bound, bound)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default Linear / Conv bias init: uniform in +-1/sqrt(fan_in)."""
    return uniform(1.0 / math.sqrt(fan_in))


def conv_general_dilated(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jnp.ndarray:
    """``lax.conv_general_dilated`` with flax's channels-last layout, computed as a matrix product when the kernel
    is 1x1 (stride 1, no padding, no dilation, one group): XLA:CPU runs the weight gradient of a 1x1 convolution
    at a tenth of the speed of the equivalent matrix product (measured: projector ``vis_4``, 226 vs ~20 ms)."""
    spatial = rhs.shape[:-2]
    pointwise = (
        all(k == 1 for k in spatial)
        and all(s == 1 for s in window_strides)
        and (isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding))  # any string pads 1x1 by 0
        and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
        and feature_group_count == 1
    )
    if pointwise:
        return jnp.einsum("...c,co->...o", lhs, rhs.reshape(rhs.shape[-2:]), precision=precision)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )


def conv(features: int, kernel_size: Sequence[int], **kwargs: Any) -> nn.Conv:
    """``flax.linen.Conv`` (channels-last, parameters ``kernel`` (*k, Cin, Cout) and ``bias``) that runs 1x1
    kernels as a matrix product (:func:`conv_general_dilated`)."""
    return nn.Conv(features, tuple(kernel_size), conv_general_dilated=conv_general_dilated, **kwargs)


REMAT_MODES = ("none", "block", "dots")
# "auto" per platform. CPU: memory is plentiful, recomputation costs time. GPU and TPU: "dots" keeps the matrix
# products and recomputes the rest, for less recomputation than "block" (+11% vs +27% FLOPs in a CPU compile) and
# far less memory than "none" (benchmarks/aot.py, README "Compiled for accelerators": WIMFRIS-B, batch 32, 448 px,
# bf16: H200 12.5 GiB vs 22.1; v5e 2x2 slice 10.2 vs 12.4 GiB per chip). On TPU it needs libtpu's larger fiber
# stacks (wimfris_jax.platform.prepare_libtpu), without which libtpu 0.0.42.1 crashes compiling it.
AUTO_REMAT = {"cpu": "none", "gpu": "dots", "tpu": "dots"}


def resolve_remat(mode: str, platform: str | None = None) -> str:
    """``train.remat``: "auto" is :data:`AUTO_REMAT` of ``platform`` (default: the platform being compiled for,
    :func:`wimfris_jax.platform.target_platform`; others as a GPU); other values pass through, checked."""
    if check_remat(mode) == "auto":
        return AUTO_REMAT.get(platform or target_platform(), AUTO_REMAT["gpu"])
    return mode


def check_remat(mode: str) -> str:
    """``mode`` if it is a ``train.remat`` value ("auto" or one of :data:`REMAT_MODES`), else a ValueError."""
    if mode != "auto" and mode not in REMAT_MODES:
        raise ValueError(f"train.remat={mode!r}: choose one of {('auto',) + REMAT_MODES}")
    return mode


def remat(target: Any, mode: str) -> Any:
    """``target`` -- a module class, or a function whose first argument is a module -- rematerialised in the
    backward pass (``train.remat``):

    - "none": unchanged (every activation the backward needs is stored);
    - "block": ``flax.linen.remat`` saving nothing inside the module: its inputs are stored and all of its
      intermediates are recomputed when the gradient reaches it;
    - "dots": saves the outputs of matrix products without batch dimensions
      (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) and recomputes the rest (norms,
      activations, softmax) -- less memory than "none", less recomputation than "block".

    Parameter and variable names are unchanged (flax lifts the target into its module's own scope). "auto" is
    resolved here, when the model is traced, for the platform being compiled for (:func:`resolve_remat`).
    """
    mode = resolve_remat(mode)
    if mode == "none":
        return target
    if mode == "block":
        return nn.remat(target, policy=jax.checkpoint_policies.nothing_saveable)
    if mode == "dots":
        return nn.remat(target, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat mode {mode!r}: choose one of {REMAT_MODES}")


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jnp.ndarray:
    """Bernoulli(1 - rate) keep mask (bool, ``shape``) for dropout, from 16 random bits per entry: each 32-bit word
    of the PRNG serves two entries (along axis -2), a third of the time of one word per entry on CPU; the drop
    rate is exact to 2^-16."""
    if len(shape) < 2:
        return keep_mask(rng, rate, tuple(shape) + (1,)).reshape(shape)
    rows = shape[-2]
    words = jax.random.bits(rng, shape[:-2] + (-(-rows // 2), shape[-1]), jnp.uint32)
    bits = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-2)[..., :rows, :]
    return bits >= jnp.uint32(min(round(rate * 65536), 65536))


class Dropout(nn.Module):
    """Inverted dropout (zero with probability ``rate``, scale the rest by 1 / (1 - rate)) as PyTorch's
    ``nn.Dropout``, drawn with :func:`keep_mask` from the ``"dropout"`` rng; identity when deterministic."""

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        keep = keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


def batch_norm(train: bool, *, eps: float, dtype: Any, name: str) -> nn.BatchNorm:
    """A BatchNorm over the last axis that matches PyTorch's.

    Momentum 0.9 in flax's convention is PyTorch's momentum 0.1. ``use_fast_variance=False`` computes the batch
    variance as ``mean((x - mean)^2)`` as PyTorch does, not as ``mean(x^2) - mean^2`` (which loses precision
    when the mean is large). One difference remains: flax updates the running variance with the biased batch
    variance, PyTorch with the unbiased one (factor n / (n - 1), n the number of reduced positions).

    Args:
      train: use (and, with ``mutable=["batch_stats"]``, update) batch statistics; else the running ones.
      eps: epsilon added to the variance (PyTorch's default 1e-5; DETRIS's adapters 1e-3).
      dtype: computation dtype (parameters stay float32).
      name: the module name (its parameters: ``params/<name>/{scale,bias}``, ``batch_stats/<name>/{mean,var}``).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


class ConvBNReLU(nn.Module):
    """conv ('same' zero padding, odd kernel) + BatchNorm + ReLU: (B, *spatial, Cin) -> (B, *spatial, features).

    ``len(kernel_size)`` spatial dims (1 or 2). Submodules ``conv`` and ``bn``. The defaults are DETRIS's
    ``conv_layer`` (1x1, no bias, eps 1e-5, flax's default kernel init).
    """

    features: int
    kernel_size: tuple[int, ...] = (1, 1)
    use_bias: bool = False
    eps: float = 1e-5
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        pad = [(k // 2, k // 2) for k in self.kernel_size]
        x = conv(
            self.features,
            self.kernel_size,
            padding=pad,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name="conv",
        )(x)
        return nn.relu(batch_norm(train, eps=self.eps, dtype=self.dtype, name="bn")(x))


def _materialise(x: jnp.ndarray) -> jnp.ndarray:
    """``x``, passed through a ``while`` loop that XLA cannot simplify away, so that XLA stores it instead of
    fusing its computation into every consumer. The loop runs once (twice if x's first entry is NaN) and adds
    ``i > 1``, which is 0 on every trip; XLA cannot know the trip count, so it keeps the loop. (An optimisation
    barrier would not do: XLA:CPU expands those into scheduling constraints before fusion.)"""
    trips = 1 + jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)

    def body(carry: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
        i, y = carry
        return i + 1, y + (i > 1).astype(y.dtype)

    return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), x))[1]


@jax.custom_vjp
def fusion_barrier(x: jnp.ndarray) -> jnp.ndarray:
    """Identity that XLA materialises, forward and backward: no computation is fused across it.

    Placed between transformer blocks it stores the residual stream (and its gradient) once per block. Without
    it XLA fuses the cheap elementwise residual sums of many blocks into each consumer and recomputes them there,
    with strided reads when the consumer transposes: measured 0.7 s of an 8.3 s DETRIS-B CPU train step, in the
    transposes of the Dense Aligners' weight gradients, which re-derived the residual stream of all later blocks.
    """
    return _materialise(x)


def _fusion_barrier_fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, None]:
    return _materialise(x), None


def _fusion_barrier_bwd(_: None, g: jnp.ndarray) -> tuple[jnp.ndarray]:
    return (_materialise(g),)


fusion_barrier.defvjp(_fusion_barrier_fwd, _fusion_barrier_bwd)


# Generic blocks shared by the backbones and the families (PyTorch's numerics).
def gelu_exact(x: jax.Array) -> jax.Array:
    """``torch.nn.GELU()`` with ``approximate='none'``, in PyTorch's form ``x/2 (1 + erf(x/sqrt 2))`` (flax's default is
    the tanh approximation; ``jax.nn.gelu(approximate=False)`` goes through erfc, 2-3x slower on CPU)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def layer_norm(eps: float, dtype: Any = None, name: str | None = None) -> nn.LayerNorm:
    """A LayerNorm with PyTorch's variance computation, so that parity holds at 1e-5 on large activations."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class Mlp(nn.Module):
    """Linear(width -> hidden) -> act -> Linear(hidden -> width); (B, T, C) -> (B, T, C)."""

    hidden: int
    act: Callable[[jax.Array], jax.Array]
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(self.act(x))


def cast(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in ``dtype`` (unchanged when ``dtype`` is None)."""
    return x if dtype is None else jnp.asarray(x, dtype)
