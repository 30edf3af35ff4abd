"""The DETRIS mask head ("Projector"): upsampled pixel features scored against a text-generated kernel.

Source: DETRIS ``model/layers.py`` ``Projector`` (docs/detris_code.md "Projector"), reused by WIMFRIS. The
per-pixel score ``<kernel(f_s), Z_c^i> + bias(f_s)`` (a 3x3 neighbourhood of pixel features against a kernel
generated from the sentence feature) is the text-to-pixel contrastive score Z_t . Z_c^i of WIMFRIS eq. (5).

Visual path: bilinear x2 -> 3x3 conv (no bias) + BN + ReLU -> bilinear x2 -> 3x3 conv + BN + ReLU (in_dim/2)
-> 1x1 conv (bias). Upsampling is PyTorch's ``nn.Upsample(scale_factor=2, mode='bilinear')``
(align_corners=False, half-pixel, edge-clamped), applied exactly through :mod:`wimfris_jax.interpolate`.
Text path: Linear(word_dim -> in_dim/2 * k * k + 1), split into a (in_dim/2, k, k) kernel (PyTorch's
``reshape(B, C, k, k)`` order) and a scalar bias; per-sample cross-correlation with padding k // 2.

BatchNorm: ``flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)`` = PyTorch's momentum 0.1. DETRIS trains with
SyncBatchNorm; here no ``axis_name`` is needed: under ``jax.jit`` with the batch sharded over a mesh, the batch
mean/variance are reductions over the global (logical) array, so they are global statistics automatically
(tests/families/wimfris/test_decoder.py checks an 8-device sharded batch against the unsharded one). One difference
remains:
flax updates the running variance with the biased batch variance, PyTorch with the unbiased one (factor
n / (n - 1), n = B * H * W pixels; ~1e-6 relative at DETRIS's sizes).

Submodule names follow DETRIS's (``vis.1.0`` -> ``vis_1_0``, ``vis.1.1`` -> ``vis_1_1``, ``vis.4`` -> ``vis_4``,
``txt``) so :func:`port_weights.detris.projector_rules` is a renaming.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.interpolate import resize_2d, resize_matrix
from wimfris_jax.layers import batch_norm, conv, remat

BN_EPS = 1e-5


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, 2H, 2W, C), exactly PyTorch's bilinear ``scale_factor=2, align_corners=False``."""
    h, w = x.shape[-3:-1]
    return resize_2d(x, resize_matrix(h, 2 * h, mode="bilinear"), resize_matrix(w, 2 * w, mode="bilinear"))


def dynamic_conv(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """Per-sample cross-correlation with zero padding k // 2 (PyTorch's grouped ``F.conv2d`` trick).

    Args:
      x: (B, H, W, C) pixel features.
      kernel: (B, C, k, k) per-sample kernel, PyTorch layout (channel, row, column); k odd.
      bias: (B,) per-sample bias.

    Returns:
      (B, H, W): out[b, y, x] = bias[b] + sum_{c, i, j} kernel[b, c, i, j] * x_pad[b, y + i, x + j, c].

    Computed channels first: one pass over x gives the k*k tap maps t_ij = sum_c kernel[b, c, i, j] x[b, :, :, c]
    (B, H, W, k*k), and the output sums the zero-padded tap maps shifted by (i, j) — the same sum as shifting the
    C-channel map k*k times, with the shifts (and their gradients) on k*k channels instead of C.
    """
    b, h, w, c = x.shape
    k = kernel.shape[-1]
    if kernel.shape != (b, c, k, k) or k % 2 == 0:
        raise ValueError(f"dynamic_conv: kernel {kernel.shape} does not fit x {x.shape} (want (B, C, k, k), k odd)")
    p = k // 2
    taps = jnp.einsum("bhwc,bcij->bhwij", x, kernel.astype(x.dtype)).reshape(b, h, w, k * k)
    taps = jnp.pad(taps, ((0, 0), (p, p), (p, p), (0, 0)))
    out = bias.astype(x.dtype)[:, None, None]
    for i in range(k):
        for j in range(k):
            out = out + taps[:, i : i + h, j : j + w, i * k + j]
    return out


class Projector(nn.Module):
    """DETRIS Projector.

    Attributes:
      word_dim: width of the sentence feature (512).
      in_dim: width of the decoder output (512); the pixel features are in_dim // 2 wide.
      kernel_size: size of the text-generated kernel (3).
      dtype: computation dtype (None: inputs' / float32).
      remat_mode: rematerialisation of the visual path (:func:`wimfris_jax.layers.remat`): at 4x the feature
        grid it holds the largest activations of the model (1 GiB per float32 map at batch 32, 448 px).
    """

    word_dim: int = 512
    in_dim: int = 512
    kernel_size: int = 3
    dtype: Any = None
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, x: jnp.ndarray, state: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Mask logits.

        Args:
          x: (B, H, W, in_dim) decoder output.
          state: (B, word_dim) sentence feature.
          train: BatchNorm uses (and updates, with ``mutable=["batch_stats"]``) batch statistics when True,
            running statistics when False.

        Returns:
          (B, 4H, 4W) logits.
        """
        x, state = jnp.asarray(x, self.dtype), jnp.asarray(state, self.dtype)
        if x.shape[-1] != self.in_dim or state.shape[-1] != self.word_dim:
            raise ValueError(
                f"Projector(in_dim={self.in_dim}, word_dim={self.word_dim}) got x {x.shape}, state {state.shape}"
            )
        mid, k = self.in_dim // 2, self.kernel_size

        def conv_bn_relu(y: jnp.ndarray, width: int, idx: int) -> jnp.ndarray:
            y = conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name=f"vis_{idx}_0")(y)
            return nn.relu(batch_norm(train, eps=BN_EPS, dtype=self.dtype, name=f"vis_{idx}_1")(y))

        def visual(module: nn.Module, x: jnp.ndarray) -> jnp.ndarray:
            y = conv_bn_relu(upsample2x(x), self.in_dim, 1)
            y = conv_bn_relu(upsample2x(y), mid, 3)
            return conv(mid, (1, 1), dtype=self.dtype, name="vis_4")(y)  # (B, 4H, 4W, mid)

        y = remat(visual, self.remat_mode)(self, x)

        t = nn.Dense(mid * k * k + 1, dtype=self.dtype, name="txt")(state)  # (B, mid*k*k + 1)
        kernel = t[:, :-1].reshape(-1, mid, k, k)
        return dynamic_conv(y, kernel, t[:, -1])
