"""Small building blocks shared by the adapters, the necks and the projector.

- :func:`batch_norm`: ``flax.linen.BatchNorm`` set up as PyTorch's ``nn.BatchNorm{1,2}d``.
- :class:`ConvBNReLU`: conv ('same' zero padding) + BatchNorm + ReLU, DETRIS's ``BasicConv1d/2d`` (with bias,
  eps 1e-3) and ``conv_layer`` (1x1, no bias, eps 1e-5).
- PyTorch's default initialisers, for layers that start as their PyTorch counterparts do.

BatchNorm uses batch statistics when ``train`` and running statistics otherwise. Under ``jax.jit`` with the batch
sharded over a mesh the batch mean/variance are reductions over the global (logical) array, so they are global
statistics (SyncBatchNorm) without an ``axis_name``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = nn.initializers.Initializer

BN_MOMENTUM = 0.9  # flax convention: new = momentum * old + (1 - momentum) * batch; PyTorch's momentum 0.1

# PyTorch's kaiming_normal_ (fan_in, ReLU gain), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's default Linear / Conv weight init: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def uniform(bound: float) -> Initializer:
    """Uniform in [-bound, bound)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default Linear / Conv bias init: uniform in +-1/sqrt(fan_in)."""
    return uniform(1.0 / math.sqrt(fan_in))


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
        x = nn.Conv(
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
