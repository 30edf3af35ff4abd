"""VMamba v2 (Liu et al. 2024, "VMamba: Visual State Space Model"), the visual backbone of ReMamber / TFANet.

Source: the official ``classification/models/vmamba.py`` (MzeroMiko/VMamba, ``VSSM`` with ``forward_type="v05_noz"``,
``patchembed_version="v2"``, ``downsample_version="v3"``; configs ``classification/configs/vssm/vmambav2_*_224.yaml``),
channels last::

    embed:      conv3x3/2 (3 -> d0/2) -> LN -> GELU -> conv3x3/2 (d0/2 -> d0) -> LN          (B, H/4, W/4, d0)
    block:      x = x + SS2D(norm(x));  x = x + mlp(norm2(x))      mlp: fc1 -> exact GELU -> fc2 (ratio 4)
    stage i:    depths[i] blocks at width dims[i], on (B, H/2^(i+2), W/2^(i+2), dims[i])
    downsample: conv3x3/2 (dims[i] -> dims[i+1]) -> LN                                          (i = 0, 1, 2)

Convolutions pad by 1, so odd sides round up (ceil(H / 2)). LayerNorms are torch's (eps 1e-5; "ln2d" in the
configs is the same normalisation, channels first). Drop path (stochastic depth) is not implemented: the module
is the deterministic forward. Parameter names mirror the official state dict (``port_weights/vmamba.py``):
``patch_embed/{conv1,norm1,conv2,norm2}``, ``layers_{i}/blocks_{j}/{norm,op,norm2,mlp/{fc1,fc2}}``,
``layers_{i}/downsample/{conv,norm}``; SS2D's own names are in :mod:`wimfris_jax.ssm.ss2d`.

A parent model (TFANet) calls the stages one at a time, to fuse text between them::

    x = vmamba.embed(images)
    for i in range(4):
        x = vmamba.blocks(i, x)          # tap / fuse here
        if i < 3:
            x = vmamba.downsample(i, x)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.layers import gelu_exact, remat, torch_default_bias, torch_default_kernel, vit_trunc_normal
from wimfris_jax.ssm.ss2d import FORWARD_TYPES, SS2D

Array = jnp.ndarray

_PRESETS = {  # official v2 classification configs (vmambav2_{tiny,small,base}_224.yaml): depths, embed dim
    "tiny": ((2, 2, 5, 2), 96),  # vssm1_tiny_0230
    "small": ((2, 2, 15, 2), 96),  # vssm1_small_0229
    "base": ((2, 2, 15, 2), 128),  # vssm1_base_0229 (ReMamber / TFANet)
}


def vmamba_config(name: str) -> dict[str, Any]:
    """:class:`VMamba` fields of the official VMamba v2 T/S/B (d_state 1, ssm_ratio 2, dt_rank auto, conv 3 without
    bias, MLP ratio 4, forward type v05_noz, patch embed v2, downsample v3)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown VMamba preset {name!r}; choose from {sorted(_PRESETS)}")
    depths, d0 = _PRESETS[name]
    return dict(
        depths=depths,
        dims=tuple(d0 * 2**i for i in range(4)),
        d_state=1,
        ssm_ratio=2.0,
        dt_rank="auto",
        d_conv=3,
        conv_bias=False,
        mlp_ratio=4.0,
        forward_type="v05_noz",
    )


def _conv(features: int, fan_in: int, dtype: Any, name: str) -> nn.Conv:
    """torch ``Conv2d(k=3, stride=2, padding=1)`` with bias, PyTorch's default init."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(2, 2),
        padding=((1, 1), (1, 1)),
        kernel_init=torch_default_kernel,
        bias_init=torch_default_bias(fan_in * 9),
        dtype=dtype,
        name=name,
    )


def _norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class PatchEmbed(nn.Module):
    """Patch embed v2: (B, H, W, 3) -> (B, ceil(H/4), ceil(W/4), dim)."""

    dim: int
    ln_eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _conv(self.dim // 2, x.shape[-1], self.dtype, "conv1")(x)
        x = gelu_exact(_norm(self.ln_eps, self.dtype, "norm1")(x))
        x = _conv(self.dim, self.dim // 2, self.dtype, "conv2")(x)
        return _norm(self.ln_eps, self.dtype, "norm2")(x)


class Downsample(nn.Module):
    """Downsample v3: conv3x3/2 + LN, (B, h, w, C) -> (B, ceil(h/2), ceil(w/2), dim)."""

    dim: int
    ln_eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _conv(self.dim, x.shape[-1], self.dtype, "conv")(x)
        return _norm(self.ln_eps, self.dtype, "norm")(x)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2, (..., C) -> (..., C); trunc-normal(0.02) weights, zero biases (``_init_weights``)."""

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = dict(kernel_init=vit_trunc_normal, dtype=self.dtype)
        y = gelu_exact(nn.Dense(self.hidden, name="fc1", **dense)(x))
        return nn.Dense(x.shape[-1], name="fc2", **dense)(y)


class VSSBlock(nn.Module):
    """One VSS block, (B, h, w, C) -> (B, h, w, C): ``x + op(norm(x))``, then ``x + mlp(norm2(x))``."""

    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    conv_bias: bool = False
    mlp_ratio: float = 4.0
    forward_type: str = "v05_noz"
    ln_eps: float = 1e-5
    scan_impl: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        ssm = dict(d_state=self.d_state, ssm_ratio=self.ssm_ratio, dt_rank=self.dt_rank, d_conv=self.d_conv)
        ssm.update(conv_bias=self.conv_bias, forward_type=self.forward_type, ln_eps=self.ln_eps)
        op = SS2D(c, **ssm, scan_impl=self.scan_impl, dtype=self.dtype, name="op")
        x = x + op(_norm(self.ln_eps, self.dtype, "norm")(x))
        mlp = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")
        return x + mlp(_norm(self.ln_eps, self.dtype, "norm2")(x))


class Stage(nn.Module):
    """Stage i: ``depth`` VSS blocks (``blocks_{j}``) and, except for the last stage, the ``downsample`` after them."""

    depth: int
    out_dim: int | None  # width after the downsample; None: no downsample
    block: dict[str, Any]
    remat_mode: str = "none"
    dtype: Any = None

    def setup(self):
        block = remat(VSSBlock, self.remat_mode)
        self.blocks = [block(**self.block, dtype=self.dtype) for _ in range(self.depth)]
        if self.out_dim is not None:
            self.downsample = Downsample(self.out_dim, self.block.get("ln_eps", 1e-5), self.dtype)

    def run_blocks(self, x: Array) -> Array:
        for blk in self.blocks:
            x = blk(x)
        return x

    def run_downsample(self, x: Array) -> Array:
        if self.out_dim is None:
            raise ValueError("the last stage has no downsample")
        return self.downsample(x)


class VMamba(nn.Module):
    """VMamba v2 backbone; see the module docstring for the computation and :func:`vmamba_config` for presets.

    Methods (all channels last; a parent model may call them one by one):
      ``embed(images (B, H, W, 3)) -> (B, H/4, W/4, dims[0])``;
      ``blocks(i, x) -> x``: stage i's VSS blocks (same shape);
      ``downsample(i, x) -> (B, h/2, w/2, dims[i+1])``, i in 0..2;
      ``__call__(images) -> [stage i's blocks output (B, H/2^(i+2), W/2^(i+2), dims[i]) for i in 0..3]``
      (before each downsample: what a segmentation backbone taps). Odd sides round up at every stride.

    Attributes:
      depths, dims: blocks and width per stage.
      d_state, ssm_ratio, dt_rank, d_conv, conv_bias, forward_type: SS2D's (:class:`~wimfris_jax.ssm.SS2D`).
      mlp_ratio: MLP hidden = int(dim * mlp_ratio).
      ln_eps: every LayerNorm's epsilon (torch's 1e-5).
      scan_impl: selective-scan implementation (None: the backend's default for each stage's problem).
      dtype: computation dtype (None: float32); parameters stay float32, the scan runs in float32.
      remat_mode: rematerialisation of each VSS block, "none" | "block" | "dots" (:func:`wimfris_jax.layers.remat`).
    """

    depths: Sequence[int] = (2, 2, 15, 2)
    dims: Sequence[int] = (128, 256, 512, 1024)
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    conv_bias: bool = False
    mlp_ratio: float = 4.0
    forward_type: str = "v05_noz"
    ln_eps: float = 1e-5
    scan_impl: str | None = None
    dtype: Any = None
    remat_mode: str = "none"

    def setup(self):
        if len(self.depths) != len(self.dims):
            raise ValueError(f"VMamba: {len(self.depths)} depths but {len(self.dims)} dims")
        if self.forward_type not in FORWARD_TYPES:
            raise ValueError(f"VMamba: forward_type {self.forward_type!r} is not implemented; only {FORWARD_TYPES}")
        block = dict(
            d_state=self.d_state, ssm_ratio=self.ssm_ratio, dt_rank=self.dt_rank, d_conv=self.d_conv,
            conv_bias=self.conv_bias, mlp_ratio=self.mlp_ratio, forward_type=self.forward_type,
            ln_eps=self.ln_eps, scan_impl=self.scan_impl,
        )  # fmt: skip
        n = len(self.depths)
        self.patch_embed = PatchEmbed(self.dims[0], self.ln_eps, self.dtype)
        self.layers = [
            Stage(d, self.dims[i + 1] if i < n - 1 else None, block, self.remat_mode, self.dtype)
            for i, d in enumerate(self.depths)
        ]

    def embed(self, images: Array) -> Array:
        """images (B, H, W, 3) normalised -> (B, ceil(H/4), ceil(W/4), dims[0])."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"VMamba expects images (B, H, W, 3), got {images.shape}")
        return self.patch_embed(images)

    def blocks(self, i: int, x: Array) -> Array:
        """Stage ``i``'s VSS blocks: (B, h, w, dims[i]) -> same shape."""
        self._check(i, x, len(self.depths))
        return self.layers[i].run_blocks(x)

    def downsample(self, i: int, x: Array) -> Array:
        """Stage ``i``'s downsample (i < last): (B, h, w, dims[i]) -> (B, ceil(h/2), ceil(w/2), dims[i+1])."""
        self._check(i, x, len(self.depths) - 1)
        return self.layers[i].run_downsample(x)

    def __call__(self, images: Array) -> dict[str, Any]:
        """images (B, H, W, 3) -> {"hidden_states": the stem's output then each stage's, before its downsample
        (1 + stages arrays (B, h_i, w_i, dims[i])), "last_hidden_state": the last stage's output} (the backbones'
        one output convention, :mod:`wimfris_jax.backbones`)."""
        x = self.embed(images)
        hidden = [x]
        for i in range(len(self.depths)):
            x = self.blocks(i, x)
            hidden.append(x)
            if i < len(self.depths) - 1:
                x = self.downsample(i, x)
        return {"hidden_states": tuple(hidden), "last_hidden_state": x}

    def _check(self, i: int, x: Array, n: int) -> None:
        if not 0 <= i < n:
            raise ValueError(f"VMamba: stage index {i} out of range 0..{n - 1}")
        if x.ndim != 4 or x.shape[-1] != self.dims[i]:
            raise ValueError(f"VMamba stage {i} expects (B, h, w, {self.dims[i]}), got {x.shape}")
