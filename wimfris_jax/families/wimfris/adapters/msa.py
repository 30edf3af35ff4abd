"""Multi-Scale Aligner (MSA) with the RFMixer and the learnable emphasis parameter, WIMFRIS eq. (2)-(3).

RFMixer, eq. (2), on the patch tokens as a map x (B, h, w, d):

    x~(k) = DWConv_{k x 1}(DWConv_{1 x k}(x))           for each kernel size k in ``kernels`` (3, 5, 7; Table 4)
    x~    = ReLU(x + sum_k x~(k))
    x_mix = x~ * x                                        (Hadamard product)

MSA (Fig. 2c), applied to the normed token stream n2 = norm2(x) of a DINOv2 block (DETRIS's vision-adapter
seam: ``x = x + ls2(mlp(n2) + MSA(n2))``, docs/detris_code.md "Where adapters sit"):

    x0      = ReLU(Down(n2))                              (B, T, d), T = P + h*w, P = 1 + registers
    x_mix   = [x0[:, :P], RFMixer(x0[:, P:])]             prefix (cls, registers) tokens bypass the convolutions
    x_fused = Up(x_mix + CrossAttn(q=x_mix, k=v=f_t))     (B, T, width)
    out     = alpha * x_fused,   alpha = sigmoid(p),  p0 = logit(alpha0) = logit(0.2)      eq. (3)

Decisions where the paper is silent:
- Cross-attention: flax ``MultiHeadDotProductAttention`` (:func:`wimfris_jax.attention.multi_head_attention`) with
  ``qkv_features = d``; its key/value projections
  take the word features f_t (B, L, 512) straight to the hidden size (this is "f_t projected to the hidden
  size"; no separate text Linear). Dropout 0.1 on the attention weights, as DETRIS's adapter.
- Key padding mask: padded word positions (id == 0) are masked out, as in the decoder. DETRIS attends to them;
  masking makes the adapter independent of how far a sentence is padded (tested in
  tests/families/wimfris/test_model.py).
- Residual: ``x_mix + CrossAttn(x_mix)`` before Up, so the multi-scale features themselves (not only the
  attention weights they steer) reach the backbone; DETRIS likewise adds its pre-attention features back.
- Prefix tokens skip the RFMixer (unchanged x0, as in DETRIS) but take part in the cross-attention.
- Init as DETRIS's Dense Aligner ends up (WIMFRIS builds on DETRIS's code and the MSA sits in the same place,
  inside the DINOv2 ViT, whose ``init_weights_vit_timm`` re-initialises every nn.Linear there;
  docs/detris_code.md "Initialisation of the adapters"): Down, Up and the attention's output projection get
  trunc_normal(std 0.02) kernels (:data:`wimfris_jax.layers.vit_trunc_normal`) and zero biases; the attention's
  q/k/v projections are those of a PyTorch ``nn.MultiheadAttention(d, heads, kdim=vdim=512)`` (Parameters,
  not nn.Linear, so not re-initialised): Xavier-uniform per matrix, zero biases; the RFMixer's depthwise
  convolutions keep Kaiming-normal (fan_in, ReLU gain) with zero biases, as DETRIS's convs. Up is not
  zero-initialised: with a zero Up the emphasis parameter would get no gradient at the first step, and DETRIS
  does not do it either.
- ``emphasis=False`` (Table 3b "EP off") replaces sigmoid(p) by the constant alpha0 (DETRIS's fixed 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask, multi_head_attention
from wimfris_jax.layers import kaiming_normal, vit_trunc_normal, xavier_uniform


def logit(p: float) -> float:
    """ln(p / (1 - p)), the inverse of the sigmoid; p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"alpha0 must lie strictly between 0 and 1, got {p}")
    return math.log(p / (1.0 - p))


class RFMixer(nn.Module):
    """Receptive Field Mixer, eq. (2): (B, h, w, d) -> (B, h, w, d).

    Attributes:
      kernels: strip-kernel size of each branch (Table 4: (3, 5, 7) is the paper's best; (1, 1, 1) ... allowed).
      dtype: computation dtype.
    """

    kernels: Sequence[int] = (3, 5, 7)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        total = x
        for n, k in enumerate(self.kernels):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"RFMixer kernel sizes must be odd and positive (same padding), got {self.kernels}")
            y = x
            for shape, tag in (((1, k), "1xk"), ((k, 1), "kx1")):
                pad = ((shape[0] // 2, shape[0] // 2), (shape[1] // 2, shape[1] // 2))
                y = nn.Conv(
                    d,
                    shape,
                    padding=pad,
                    feature_group_count=d,
                    kernel_init=kaiming_normal,
                    dtype=self.dtype,
                    name=f"branch{n}_{tag}",
                )(y)
            total = total + y
        return nn.relu(total) * x


class MultiScaleAligner(nn.Module):
    """MSA, eq. (2)-(3): (B, T, width) normed vision tokens + words -> alpha * x_fused (B, T, width).

    Attributes:
      width: vision width (768 for DINOv2-B).
      text_dim: width of the word features (512), checked when given (None: any).
      dim: bottleneck width d.
      num_heads: cross-attention heads (d must be divisible by it).
      kernels: RFMixer branch kernel sizes.
      emphasis: learnable emphasis alpha = sigmoid(p) (True) or the constant alpha0 (False).
      alpha0: initial / fixed emphasis, 0.2 as DETRIS.
      dropout: attention-weight dropout of the cross-attention (DETRIS: 0.1).
      dtype: computation dtype (None: float32); parameters stay float32.
      attention: attention implementation (:mod:`wimfris_jax.attention`).
    """

    width: int
    text_dim: int | None = None
    dim: int = 48
    num_heads: int = 4
    kernels: Sequence[int] = (3, 5, 7)
    emphasis: bool = True
    alpha0: float = 0.2
    dropout: float = 0.1
    dtype: Any = None
    attention: str = "auto"

    def setup(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"MSA dim {self.dim} is not divisible by num_heads {self.num_heads}")
        self.down = nn.Dense(self.dim, kernel_init=vit_trunc_normal, dtype=self.dtype)
        self.rfmixer = RFMixer(tuple(self.kernels), dtype=self.dtype)
        self.cross_attn = multi_head_attention(
            self.num_heads,
            self.dim,
            implementation=self.attention,
            dropout_rate=self.dropout,
            dtype=self.dtype,
            kernel_init=xavier_uniform,  # q/k/v: PyTorch MHA's separate q/k/v_proj_weight (kdim != d)
            out_kernel_init=vit_trunc_normal,  # out_proj: an nn.Linear, re-initialised by init_weights_vit_timm
        )
        self.up = nn.Dense(self.width, kernel_init=vit_trunc_normal, dtype=self.dtype)
        if self.emphasis:
            self.emphasis_logit = self.param(
                "emphasis_logit", nn.initializers.constant(logit(self.alpha0)), (), jnp.float32
            )

    def alpha(self) -> jnp.ndarray:
        """The emphasis alpha () of this layer: sigmoid(p) with EP, else the constant alpha0."""
        if not self.emphasis:
            return jnp.asarray(self.alpha0, jnp.float32)
        return nn.sigmoid(self.emphasis_logit)

    def __call__(
        self,
        x: jnp.ndarray,
        words: jnp.ndarray,
        pad_mask: jnp.ndarray | None,
        *,
        grid: tuple[int, int],
        num_prefix: int,
        train: bool = False,
    ) -> jnp.ndarray:
        """Adapter output to add beside the block's MLP.

        Args:
          x: (B, T, width) the block's norm2 output; tokens [cls, registers, h*w patches (row-major)].
          words: (B, L, Ct) MTA-enhanced word features (CLIP's final LayerNorm output).
          pad_mask: (B, L) bool, True at padding (id == 0), or None to attend to every word.
          grid: (h, w) patch grid.
          num_prefix: P = 1 + number of registers.
          train: True enables attention dropout (needs the "dropout" rng).

        Returns:
          (B, T, width) = alpha * Up(x_mix + CrossAttn(x_mix, words)).
        """
        b, t, c = x.shape
        h, w = grid
        if c != self.width or t != num_prefix + h * w or self.text_dim not in (None, words.shape[-1]):
            raise ValueError(
                f"MultiScaleAligner(width={self.width}, text_dim={self.text_dim}) got tokens {x.shape}, words "
                f"{words.shape}; expected (B, {num_prefix} + {h}*{w}, {self.width}) and (B, L, {self.text_dim})"
            )
        x0 = nn.relu(self.down(x))
        patches = x0[:, num_prefix:].reshape(b, h, w, self.dim)
        mixed = self.rfmixer(patches).reshape(b, h * w, self.dim)
        x_mix = jnp.concatenate([x0[:, :num_prefix], mixed], axis=1)

        attend = key_padding_mask(pad_mask)
        attn = self.cross_attn(x_mix, jnp.asarray(words, x_mix.dtype), mask=attend, deterministic=not train)
        fused = self.up(x_mix + attn)
        return self.alpha().astype(fused.dtype) * fused
