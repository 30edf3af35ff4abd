"""Mamba Text Adapter (MTA), WIMFRIS eq. (1).

    x_fc  = ReLU(Down(x))                                   (B, L, d)
    x_ssm = SSM(SiLU(Conv1D(Proj_in(x_fc))))                 \
    x_res = SiLU(Proj_in(x_fc))   (the z half of Proj_in)     } = Mamba(x_fc), one standard Mamba block
    out   = Up(Proj_out(x_ssm * x_res) + x_fc)              (B, L, width)

The middle line is exactly a Mamba block (:class:`wimfris_jax.ssm.mamba.Mamba`: in_proj gives x and z, causal
depthwise conv1d, SiLU, selective scan, gate by SiLU(z), out_proj), so the adapter is
``Up(Mamba(x_fc) + x_fc)``. It plugs into the CLIP text tower beside the MLP, reading the residual stream after
attention (DETRIS's text-adapter seam, docs/detris_code.md "Where adapters sit"):
``x = x + mlp(ln_2(x)) + scale * MTA(x)``, ``scale`` = DETRIS's fixed 0.2 (the paper gives the learnable
emphasis to the vision side only). The caller applies the scale (see :mod:`wimfris_jax.model`).

Initialisation (the paper is silent): Down and Up use PyTorch's default ``nn.Linear`` weight init
(kaiming-uniform, a = sqrt(5): U(+-1/sqrt(fan_in))) with zero biases, because DETRIS's text adapter, which
WIMFRIS follows, keeps PyTorch's default init. Up is NOT zero-initialised by default: the 0.2 scale already
keeps the perturbation of the frozen stream small, and a zero Up would give every other adapter parameter an
exactly zero gradient at the first step. ``zero_init_up=True`` gives the identity-at-init variant.

The scan is causal, so the output at a real token never depends on trailing padding (tested in
tests/families/wimfris/test_adapters.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.layers import torch_default_kernel
from wimfris_jax.ssm.mamba import Mamba


class MambaTextAdapter(nn.Module):
    """MTA: (B, L, width) -> (B, L, width), eq. (1).

    Attributes:
      width: channel width of the text tower (512 for CLIP B/16).
      dim: bottleneck width d (hidden size of the Mamba block).
      d_state, d_conv, expand: Mamba sizes (16, 4, 2 as in Mamba).
      scan_impl: selective-scan implementation passed to Mamba (None: backend default).
      zero_init_up: initialise Up to zero (identity adapter at init). Default False (see module docstring).
      dtype: computation dtype (None: float32); parameters stay float32.
    """

    width: int
    dim: int = 168
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_impl: str | None = None
    zero_init_up: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """x: (B, L, width) text residual stream (after attention, un-normed) -> (B, L, width). ``train`` is part of
        the text-adapter protocol (:mod:`wimfris_jax.families.wimfris.adapters`); the MTA has no dropout or batch
        statistics."""
        if x.ndim != 3 or x.shape[-1] != self.width:
            raise ValueError(f"MambaTextAdapter(width={self.width}) expects (B, L, {self.width}), got {x.shape}")
        x_fc = nn.relu(nn.Dense(self.dim, kernel_init=torch_default_kernel, dtype=self.dtype, name="down")(x))
        mixed = Mamba(
            d_model=self.dim,
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            scan_impl=self.scan_impl,
            dtype=self.dtype,
            name="mamba",
        )(x_fc)
        up_init = nn.initializers.zeros_init() if self.zero_init_up else torch_default_kernel
        return nn.Dense(self.width, kernel_init=up_init, dtype=self.dtype, name="up")(mixed + x_fc)
