"""SS2D, the 2-D selective scan of VMamba (Liu et al. 2024, "VMamba: Visual State Space Model", Sec. 4.2 and Fig. 2;
official code ``classification/models/vmamba.py``, ``SS2Dv2.forwardv2`` / ``forward_corev2``), channels last.

Cross-scan (paper Fig. 2, code ``csm_triton.cross_scan_fwd``, ``scans=0``): a (H, W) map is read as K = 4 sequences
of length L = H * W: row-major (k=0), column-major (k=1), and both reversed (k=2, 3). Each direction k has its own
x_proj (-> dt, B, C), dt_proj, A and D, and runs the S6 scan (Mamba, Gu & Dao 2023, Alg. 2)::

    x          = SiLU(depthwise conv3x3(in_proj(x)))                           (B, H, W, Di)
    xs         = cross_scan(x)                                                  (B, K, L, Di)
    dt, B, C   = split(xs @ x_proj_weight[k]^T)                                (R, N, N) per direction
    delta      = dt @ dt_projs_weight[k]^T                                      (B, K, L, Di)
    ys[k]      = selective_scan(xs[k], delta, A_k = -exp(A_logs[k]), B, C, Ds[k],
                                delta_bias=dt_projs_bias[k], delta_softplus=True)
    y          = out_norm(cross_merge(ys))                                      LayerNorm over Di
    out        = out_proj(y)                                                    (B, H, W, d_model)

``cross_merge`` (``cross_merge_fwd``) un-flips k=2, 3, un-transposes k=1, 3 and sums; it is the adjoint of
``cross_scan``. Only forward type ``"v05_noz"`` (the VMamba v2 checkpoints: no z gate, no output activation,
LayerNorm out_norm) is implemented; ``"v05"`` etc. raise. The four directions run as ONE selective scan, vmapped
over the direction axis (A, D and delta_bias differ per direction, B and C are shared by a direction's channels).

Parameter names and layouts follow the official state dict (``port_weights/vmamba.py``): ``in_proj/kernel``
(d_model, Di), ``conv2d/kernel`` (3, 3, 1, Di) [+ ``bias``], ``x_proj_weight`` (K, R + 2N, Di),
``dt_projs_weight`` (K, Di, R), ``dt_projs_bias`` (K, Di), ``A_logs`` (K * Di, N), ``Ds`` (K * Di,),
``out_norm/{scale,bias}``, ``out_proj/kernel`` (Di, d_model); R = dt_rank, N = d_state, Di = ssm_ratio * d_model.

Initialisation as the official VSSM: in/out_proj trunc-normal(0.02) (``VSSM._init_weights``), the depthwise conv
PyTorch's default, ``x_proj_weight`` PyTorch's Linear default (+-1/sqrt(Di)), dt projections mamba_ssm's
(``mamba_init.dt_init``), A S4D-real log(1..N), D = 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wimfris_jax.layers import torch_default_bias, torch_default_kernel, uniform, vit_trunc_normal
from wimfris_jax.ssm.mamba import dt_bias_init
from wimfris_jax.ssm.scan import default_impl, selective_scan

K_GROUP = 4
FORWARD_TYPES = ("v05_noz",)


def cross_scan(x: jnp.ndarray) -> jnp.ndarray:
    """x (B, H, W, C) -> (B, 4, H*W, C): [row-major, column-major, row-major reversed, column-major reversed]."""
    b, h, w, c = x.shape
    fwd = jnp.stack([x.reshape(b, h * w, c), jnp.swapaxes(x, 1, 2).reshape(b, h * w, c)], axis=1)
    return jnp.concatenate([fwd, jnp.flip(fwd, axis=2)], axis=1)


def cross_merge(ys: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """ys (B, 4, H*W, C) -> (B, H, W, C): the sum of the four sequences, each put back at its pixels (the adjoint
    of :func:`cross_scan`; summed in the official order: (y0 + flip y2) + transpose(y1 + flip y3))."""
    b, k, length, c = ys.shape
    if k != K_GROUP or length != height * width:
        raise ValueError(f"cross_merge: expected (B, 4, {height * width}, C), got {ys.shape}")
    y = ys[:, :2] + jnp.flip(ys[:, 2:], axis=2)
    col = jnp.swapaxes(y[:, 1].reshape(b, width, height, c), 1, 2)
    return y[:, 0].reshape(b, height, width, c) + col


def _a_logs_init(key, shape, dtype=jnp.float32):
    """S4D-real A_logs (K * Di, N): log(1..N) in every row."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def _scan1(u, delta, A, B, C, D, delta_bias, *, impl):
    """One direction: u, delta (B, L, Di); A (Di, N); B, C (B, L, N); D, delta_bias (Di,) -> (B, L, Di)."""
    return selective_scan(u, delta, A, B, C, D, None, delta_bias, True, impl)


class SS2D(nn.Module):
    """VMamba's SS2D mixer (``forward_type="v05_noz"``). ``__call__``: (B, H, W, d_model) -> (B, H, W, d_model).

    Attributes:
      d_model: input/output width.
      d_state: SSM state size N (1 in the v2 checkpoints).
      ssm_ratio: Di = int(ssm_ratio * d_model).
      dt_rank: rank R of the dt projection; "auto" = ceil(d_model / 16).
      d_conv: depthwise conv kernel size (odd; padding (d_conv - 1) // 2).
      conv_bias: bias in the depthwise conv (False in the v2 checkpoints).
      forward_type: "v05_noz" only.
      ln_eps: out_norm epsilon (torch's LayerNorm default 1e-5).
      scan_impl: the selective scan implementation; None = :func:`~wimfris_jax.ssm.scan.default_impl` for
        the whole (4-direction) problem.
      dtype: computation dtype of the projections, the conv and the norm (None: float32); the scan runs in
        float32.
    """

    d_model: int
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    conv_bias: bool = False
    forward_type: str = "v05_noz"
    ln_eps: float = 1e-5
    scan_impl: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def d_inner(self) -> int:
        return int(self.ssm_ratio * self.d_model)

    @property
    def rank(self) -> int:
        """The resolved dt_rank."""
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 16)
        if isinstance(self.dt_rank, str):
            raise ValueError(f"SS2D: dt_rank must be an int or 'auto', got {self.dt_rank!r}")
        return int(self.dt_rank)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (B, H, W, d_model) -> (B, H, W, d_model)."""
        if self.forward_type not in FORWARD_TYPES:
            raise ValueError(
                f"SS2D: forward_type {self.forward_type!r} is not implemented; only {FORWARD_TYPES} (VMamba v2 "
                "checkpoints: no z gate, LayerNorm out_norm)"
            )
        if x.ndim != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D(d_model={self.d_model}) expects (B, H, W, {self.d_model}), got {x.shape}")
        if self.d_conv % 2 != 1:
            raise ValueError(f"SS2D: d_conv must be odd (same padding), got {self.d_conv}")
        b, h, w, _ = x.shape
        di, n, r, k, length = self.d_inner, self.d_state, self.rank, K_GROUP, h * w
        pd = self.param_dtype
        cast = lambda v: v if self.dtype is None else jnp.asarray(v, self.dtype)

        dense = dict(use_bias=False, kernel_init=vit_trunc_normal, dtype=self.dtype, param_dtype=pd)
        x = nn.Dense(di, name="in_proj", **dense)(x)
        p = (self.d_conv - 1) // 2
        x = nn.Conv(
            di,
            (self.d_conv, self.d_conv),
            padding=((p, p), (p, p)),
            feature_group_count=di,
            use_bias=self.conv_bias,
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(self.d_conv**2),
            dtype=self.dtype,
            param_dtype=pd,
            name="conv2d",
        )(x)
        xs = cross_scan(nn.silu(x))  # (B, K, L, Di)

        x_proj = self.param("x_proj_weight", uniform(1 / math.sqrt(di)), (k, r + 2 * n, di), pd)
        dt_w = self.param("dt_projs_weight", uniform(r**-0.5), (k, di, r), pd)
        dt_b = self.param("dt_projs_bias", dt_bias_init(1e-3, 1e-1, 1e-4), (k, di), pd)
        a_logs = self.param("A_logs", _a_logs_init, (k * di, n), pd)
        ds = self.param("Ds", nn.initializers.ones, (k * di,), pd)

        x_dbl = jnp.einsum("bkld,kcd->bklc", xs, cast(x_proj))  # (B, K, L, R + 2N)
        dts, bs, cs = jnp.split(x_dbl, [r, r + n], axis=-1)
        dts = jnp.einsum("bklr,kdr->bkld", dts, cast(dt_w))  # (B, K, L, Di)
        a = -jnp.exp(a_logs.astype(jnp.float32)).reshape(k, di, n)
        impl = self.scan_impl or default_impl(length=length, state_size=b * k * di * n)
        scan = jax.vmap(functools.partial(_scan1, impl=impl), in_axes=(1, 1, 0, 1, 1, 0, 0), out_axes=1)
        ys = scan(xs, dts, a, bs, cs, ds.reshape(k, di), dt_b)  # (B, K, L, Di)
        y = cross_merge(ys, h, w)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, use_fast_variance=False, name="out_norm")(y)
        return nn.Dense(self.d_model, name="out_proj", **dense)(y)
