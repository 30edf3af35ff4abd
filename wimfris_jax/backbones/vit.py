"""Pieces shared by the two frozen encoders (pre-norm transformer blocks of ViT and CLIP).

- :func:`layer_norm`: ``torch.nn.LayerNorm`` numerics (two-pass variance, not E[x^2] - E[x]^2).
- :func:`self_attention`: ``flax.linen.MultiHeadDotProductAttention`` as a ``torch`` self-attention layer with a
  fused or split in-projection, running :func:`wimfris_jax.attention.dot_product_attention` (``attention``: its
  implementation); converters map torch weights with ``heads_in`` / ``heads_out`` / ``split_in_proj``
  (port_weights/common.py).
- :class:`Mlp`: Linear -> activation -> Linear (``fc1``, ``fc2``); :class:`SwiGLU`: the fused SwiGLU FFN of
  DINOv2-g (``gate``, ``up``, ``down``: ``down(silu(gate(x)) * up(x))``).
- :func:`quick_gelu`: CLIP's ``x * sigmoid(1.702 x)``; :func:`gelu_exact`: ``torch.nn.GELU()`` (erf form).

Rematerialisation (``remat_mode``, the ``train.remat`` switch) wraps a block's attention and MLP, the parts
that hold the large activations; the adapters, called at a block's seam, are submodules of the parent model
and stay outside (a lifted ``flax.linen.remat`` cannot call modules bound outside it).

An adapter is any callable ``(B, T, C) -> (B, T, C)``; the encoders call it at their documented seam (see
:class:`wimfris_jax.backbones.dinov2.DinoV2` and :class:`wimfris_jax.backbones.clip_text.ClipText`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from wimfris_jax.attention import multi_head_attention

Array = jax.Array
Adapter = Callable[[Array], Array]
Adapters = Mapping[int, Adapter]


def quick_gelu(x: Array) -> Array:
    """CLIP's activation ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)






def self_attention(
    num_heads: int,
    width: int,
    dtype: Any = None,
    name: str | None = None,
    attention: str = "auto",
    remat_mode: str = "none",
) -> nn.MultiHeadDotProductAttention:
    """Multi-head self-attention, (B, T, C) -> (B, T, C), with biases on q, k, v and the output, no dropout;
    ``attention``: the implementation (:mod:`wimfris_jax.attention`); ``remat_mode``: :func:`remat`."""
    return multi_head_attention(
        num_heads, width, implementation=attention, dtype=dtype, name=name, remat_mode=remat_mode
    )




class SwiGLU(nn.Module):
    """DINOv2-g's SwiGLUFFNFused: ``down(silu(gate(x)) * up(x))``; (B, T, C) -> (B, T, C).

    ``hidden`` is the size of each branch; torch-hub fuses ``gate`` and ``up`` into one ``w12`` Linear.
    """

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        g = nn.Dense(self.hidden, dtype=self.dtype, name="gate")(x)
        u = nn.Dense(self.hidden, dtype=self.dtype, name="up")(x)
        return nn.Dense(width, dtype=self.dtype, name="down")(jax.nn.silu(g) * u)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """Branch size of DINOv2's SwiGLU FFN: two thirds of ``width * mlp_ratio``, rounded up to a multiple of 8."""
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8
