"""Cross-modal Feature Scanning Module (CFSM), TFANet Section 3.4, eqs. (20)-(22), channels last::

    X         = LayerNorm(F_Block)                          (B, H, W, 3C)  pre-norm, as every VMamba/ReMamber block
    F_Channel = X + CSSM(X)                                 (B, H, W, 3C)  eq. (20) + "combined with F_Block"
    Y         = F_Channel W_r                               (B, H, W, C)   3C -> C before the spatial scan
    F_Space   = SCSM(Y) = SS2D(Y)                           (B, H, W, C)   eq. (21)
    F_F       = F_Space + Y                                 (B, H, W, C)   eq. (22)

CSSM (channel selective scan): the map is bilinearly resized to at most ``channel_res`` x ``channel_res``
(h' x w'), the 3C channels become the sequence and the h' w' positions the features, a Mamba block scans it in
both directions (two blocks, outputs summed: the concatenation order [F~_VL, F~_LV, F_c] is arbitrary, so no
channel should see only its predecessors) and the result is resized back. This is ReMamber's ``Twister`` channel
mix (16 x 16, bidirectional 1-D scan), rebuilt on :class:`wimfris_jax.ssm.Mamba`.

SCSM is VMamba's 2-D selective scan ``SS2D`` (:mod:`wimfris_jax.ssm.ss2d`), or any module class with its
constructor (``d_model, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, dtype``) passed as ``spatial``.
Eq. (21) reads SCSM(F_Block + F_c); with the text ("performs 2D spatial selective scanning ... within each channel
of the intermediate feature") we take its input to be F_Channel, the block plus the channel-scan output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.layers import torch_default_kernel
from wimfris_jax.ssm import Mamba


class CSSM(nn.Module):
    """Channel Selective Scanning Model: a 1-D selective scan along the channel axis. (B, H, W, D) -> (B, H, W, D).

    Attributes:
      channel_res: the map is resized to min(channel_res, H) x min(channel_res, W) = h' x w' for the scan;
        the Mamba width is h' w' (ReMamber: 16, so 256).
      d_state, d_conv, expand: of the Mamba blocks (d_inner = expand * h' w').
      bidirectional: also scan the channels in reverse (a second Mamba block) and sum.
      scan_impl: :func:`wimfris_jax.ssm.selective_scan` implementation (None: backend default).
    """

    channel_res: int = 16
    d_state: int = 1
    d_conv: int = 3
    expand: int = 2
    bidirectional: bool = True
    scan_impl: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, d = x.shape
        sh, sw = min(self.channel_res, h), min(self.channel_res, w)
        small = bilinear_resize(x, (sh, sw), align_corners=False)  # F.interpolate's default, as ReMamber
        seq = small.reshape(b, sh * sw, d).transpose(0, 2, 1)  # (B, D, h'w'): the channels are the sequence
        mamba = dict(d_model=sh * sw, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                     scan_impl=self.scan_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        y = Mamba(name="forward", **mamba)(seq)
        if self.bidirectional:
            y = y + Mamba(name="backward", **mamba)(seq[:, ::-1])[:, ::-1]
        y = y.transpose(0, 2, 1).reshape(b, sh, sw, d)
        return bilinear_resize(y, (h, w), align_corners=False)


def _default_spatial():
    from wimfris_jax.ssm.ss2d import SS2D  # imported late: the backbone's SS2D is an optional neighbour

    return SS2D


class CFSM(nn.Module):
    """Eqs. (20)-(22): F_Block (B, H, W, 3C) -> F_F (B, H, W, C).

    Attributes:
      features: output width C (None: the input width / 3).
      d_state, ssm_ratio, d_conv: of the SS2D (SCSM); d_state and d_conv also of the CSSM's Mamba blocks.
      channel_res, channel_expand, bidirectional: of the CSSM.
      spatial: the SCSM module class (None: :class:`wimfris_jax.ssm.ss2d.SS2D`).
      spatial_kwargs: further keyword arguments of ``spatial`` (e.g. SS2D's ``scan_impl``).
      scan_impl: the CSSM's selective-scan implementation.
      dtype, param_dtype: computation / parameter dtypes.
    """

    features: int | None = None
    d_state: int = 1
    ssm_ratio: float = 2.0
    d_conv: int = 3
    channel_res: int = 16
    channel_expand: int = 2
    bidirectional: bool = True
    spatial: Any = None
    spatial_kwargs: Any = None
    scan_impl: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f_block: jnp.ndarray) -> jnp.ndarray:
        """f_block (B, H, W, 3C) -> F_F (B, H, W, C)."""
        if f_block.ndim != 4:
            raise ValueError(f"CFSM expects (B, H, W, 3C), got {f_block.shape}")
        c = self.features or f_block.shape[-1] // 3
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.LayerNorm(epsilon=1e-5, name="norm", **common)(f_block)
        cssm = CSSM(channel_res=self.channel_res, d_state=self.d_state, d_conv=self.d_conv,
                    expand=self.channel_expand, bidirectional=self.bidirectional, scan_impl=self.scan_impl,
                    name="cssm", **common)
        f_channel = x + cssm(x)  # eq. (20)
        y = nn.Dense(c, use_bias=False, kernel_init=torch_default_kernel, name="reduce", **common)(f_channel)
        spatial = self.spatial or _default_spatial()
        scsm = spatial(d_model=c, d_state=self.d_state, ssm_ratio=self.ssm_ratio, d_conv=self.d_conv,
                       conv_bias=False, dtype=self.dtype, name="scsm", **(self.spatial_kwargs or {}))
        return scsm(y) + y  # eqs. (21), (22)
