"""The Mamba block (Gu & Dao 2023, Fig. 3 and Algorithm 2), as transformers' ``MambaMixer`` / mamba_ssm's
``Mamba`` compute it, channels last::

    x, z = split(in_proj(x))                                   (B, L, d_inner) each
    x    = SiLU(causal depthwise conv1d(x))                    left padding d_conv - 1
    dt, B, C = split(x_proj(x))                                (B, L, dt_rank), (B, L, N), (B, L, N)
    y    = selective_scan(x, dt_proj.kernel^T dt, -exp(A_log), B, C, D, z,
                          delta_bias=dt_proj.bias, delta_softplus=True)
    out  = out_proj(y)                                         (B, L, d_model)

Parameter names mirror ``MambaMixer`` (``port_weights/mamba.py`` converts its state dict): ``in_proj/kernel``,
``conv1d/kernel`` (d_conv, 1, d_inner) and ``conv1d/bias``, ``x_proj/kernel``, ``dt_proj/kernel`` (dt_rank,
d_inner) and ``dt_proj/bias``, ``A_log`` (d_inner, N), ``D`` (d_inner,), ``out_proj/kernel``.

Initialisation is mamba_ssm's: S4D-real ``A_log = log(1..N)`` per channel; ``dt_proj.bias`` the inverse
softplus of ``dt`` drawn log-uniformly in [dt_min, dt_max] and floored at dt_init_floor; ``dt_proj.kernel``
uniform in +-dt_rank^-0.5; ``D = 1``; the other layers PyTorch's defaults (uniform +-1/sqrt(fan_in); biases of
Linear layers zero, of the conv uniform +-1/sqrt(d_conv) as in mamba_ssm).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.layers import torch_default_kernel, uniform
from wimfris_jax.ssm.scan import selective_scan


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> nn.initializers.Initializer:
    """Inverse softplus of dt ~ exp(U[log dt_min, log dt_max]) clamped at ``floor`` (mamba_ssm's dt init)."""

    def init(key, shape, dtype=jnp.float32):
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(1..N); shape (d_inner, N)."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class _DtProj(nn.Module):
    """``dt_proj`` with its bias kept apart, so the scan adds it before the softplus (``delta_bias``)."""

    features: int
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (B, L, dt_rank) -> (x @ kernel (B, L, features), bias (features,))."""
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.dot(x, kernel), bias


class Mamba(nn.Module):
    """One Mamba block (mixer only: no norm, no residual). ``__call__``: (B, L, d_model) -> (B, L, d_model).

    Attributes:
      d_model: input/output width.
      d_state: SSM state size N.
      d_conv: causal depthwise conv kernel size.
      expand: d_inner = expand * d_model.
      dt_rank: rank of the dt projection; "auto" = ceil(d_model / 16).
      dt_min, dt_max, dt_init_floor: range of the initial time steps.
      conv_bias: bias in the depthwise conv.
      bias: bias in in_proj and out_proj.
      scan_impl: "associative", "sequential" or None (backend default), see :mod:`wimfris_jax.ssm.scan`.
      dtype: computation dtype of the projections and the conv (None: from inputs/params); the scan itself
        always runs in float32.
      param_dtype: parameter dtype.
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    scan_impl: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        """The resolved dt_rank."""
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 16)
        if isinstance(self.dt_rank, str):
            raise ValueError(f"Mamba: dt_rank must be an int or 'auto', got {self.dt_rank!r}")
        return int(self.dt_rank)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (B, L, d_model) -> (B, L, d_model)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba(d_model={self.d_model}) expects (B, L, {self.d_model}), got shape {x.shape}")
        d_inner, n, rank = self.d_inner, self.d_state, self.rank
        dense = dict(kernel_init=torch_default_kernel, dtype=self.dtype, param_dtype=self.param_dtype)

        xz = nn.Dense(2 * d_inner, use_bias=self.bias, name="in_proj", **dense)(x)
        xs, z = jnp.split(xz, 2, axis=-1)  # (B, L, d_inner) each
        xs = nn.Conv(
            d_inner,
            kernel_size=(self.d_conv,),
            padding=[(self.d_conv - 1, 0)],
            feature_group_count=d_inner,
            use_bias=self.conv_bias,
            bias_init=uniform(1.0 / math.sqrt(self.d_conv)),
            name="conv1d",
            **dense,
        )(xs)
        xs = nn.silu(xs)
        dbc = nn.Dense(rank + 2 * n, use_bias=False, name="x_proj", **dense)(xs)
        dt, b, c = jnp.split(dbc, [rank, rank + n], axis=-1)
        dt, dt_bias = _DtProj(
            d_inner,
            kernel_init=uniform(rank**-0.5),
            bias_init=dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dt_proj",
        )(dt)
        a_log = self.param("A_log", _a_log_init, (d_inner, n), self.param_dtype)
        d_skip = self.param("D", nn.initializers.ones, (d_inner,), self.param_dtype)
        y = selective_scan(
            xs,
            dt,
            -jnp.exp(a_log.astype(jnp.float32)),
            b,
            c,
            D=d_skip,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
            impl=self.scan_impl,
        )
        return nn.Dense(self.d_model, use_bias=self.bias, name="out_proj", **dense)(y)
