"""The DETRIS cross-modal neck (DETRIS eq. (5); the neck WIMFRIS replaces with HMF, WIMFRIS Table 1 "DETRIS").

Source: DETRIS ``model/layers.py`` ``Neck`` / ``CrossAttn`` / ``CoordConv``, restated in docs/detris_code.md
"Neck that WIMFRIS replaces". With maps v3, v4, v5 (B, h, w, Cv) (blocks 4 and 8 pre-norm, the last block
post-norm) and the sentence feature s (B, Ct):

    v3 = CBR(f3_proj, v3); v4 = CBR(f4_proj, v4)           1x1 conv (no bias) + BN + ReLU, Cv -> C
    v5 = CBR(f5_proj, v5)                                   1x1 *transposed* conv (no bias) + BN + ReLU
    t  = txt_proj(s)                                        (B, 1, C), a single text token
    fq_k = v_k * MHA_k(q=v_k, k=v=t)                        text gating, 8 heads (fusion3/4/5)
    fq = CBR(aggr, cat[fq3, fq4, fq5])                      1x1, 3C -> C
    fq = fq + CBR3x3(coordconv_1, CBR3x3(coordconv_0, cat[fq, x, y]))     eq. (5), x, y in [-1, 1]

With a single key, the softmax is 1 and MHA_k(v_k, t) = out_proj(v_proj(t)) for every pixel: the gate is a
per-sample channel scaling (the query/key projections exist, and are loaded, but cannot change the output).
CoordConv appends x (varying along the width) then y (along the height), PyTorch's channel order [feat, x, y].

Names map one-to-one onto DETRIS's keys: ``fusion3.multihead_attn`` -> ``fusion3/multihead_attn``,
``f3_proj.0``/``f3_proj.1`` -> ``f3_proj_0``/``f3_proj_1``, ``coordconv.0.conv1.0`` -> ``coordconv_0_conv1_0``,
``coordconv.1.1`` -> ``coordconv_1_1``. BatchNorm: eps 1e-5, flax momentum 0.9 (PyTorch 0.1), batch statistics
when training (global over the mesh under jit), running statistics otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from wimfris_jax.attention import multi_head_attention
from wimfris_jax.layers import batch_norm, conv

BN_EPS = 1e-5
# DETRIS's Fusion.initialize_parameters does not reach the neck: PyTorch defaults there. Flax defaults are used.


def coord_features(h: int, w: int) -> np.ndarray:
    """(h, w, 2): channel 0 = x = linspace(-1, 1, w) along the width, channel 1 = y along the height."""
    y, x = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    return np.stack([x, y], axis=-1)


class TextGate(nn.Module):
    """DETRIS ``CrossAttn``: ``v * MHA(q=v, k=v=txt)``. v (B, N, C), txt (B, Lt, C) -> (B, N, C). No dropout."""

    num_heads: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, v: jnp.ndarray, txt: jnp.ndarray) -> jnp.ndarray:
        c = v.shape[-1]
        # one key: any implementation computes out_proj(v_proj(txt)); "auto" picks the dense one
        y = multi_head_attention(self.num_heads, c, dtype=self.dtype, name="multihead_attn")(v, txt, txt)
        return v * y


class DetrisNeck(nn.Module):
    """DETRIS neck: (3 x (B, h, w, Cv), state (B, Ct)) -> ((B, h, w, dim), None).

    Same call signature as the WIMFRIS necks (:mod:`wimfris_jax.families.wimfris.neck.hmf`); the second output
    (window logits)
    is always None.

    Attributes:
      dim: output width C (512).
      num_heads: heads of the three text gates (8).
      dtype: computation dtype (parameters stay float32).
    """

    dim: int = 512
    num_heads: int = 8
    dtype: Any = None

    def _cbr(self, x: jnp.ndarray, name: str, k: int, train: bool, transpose: bool = False) -> jnp.ndarray:
        pad = ((k // 2, k // 2),) * 2
        if transpose and k > 1:
            x = nn.ConvTranspose(self.dim, (k, k), padding=pad, use_bias=False, dtype=self.dtype, name=f"{name}_0")(x)
        else:  # a 1x1 transposed convolution is the 1x1 convolution with the same (1, 1, Cin, Cout) kernel
            x = conv(self.dim, (k, k), padding=pad, use_bias=False, dtype=self.dtype, name=f"{name}_0")(x)
        return nn.relu(batch_norm(train, eps=BN_EPS, dtype=self.dtype, name=f"{name}_1")(x))

    @nn.compact
    def __call__(self, maps: Sequence[jnp.ndarray], state: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, None]:
        if len(maps) != 3 or len({m.shape[:3] for m in maps}) != 1:
            raise ValueError(f"DetrisNeck needs 3 maps of equal (B, h, w); got {[m.shape for m in maps]}")
        b, h, w, _ = maps[0].shape
        if state.shape[0] != b or state.ndim != 2:
            raise ValueError(f"DetrisNeck: state {state.shape} does not fit the maps' batch {b}")
        vs = [
            self._cbr(maps[0], "f3_proj", 1, train),
            self._cbr(maps[1], "f4_proj", 1, train),
            self._cbr(maps[2], "f5_proj", 1, train, transpose=True),
        ]
        txt = nn.Dense(self.dim, dtype=self.dtype, name="txt_proj")(jnp.asarray(state, self.dtype))[:, None, :]
        fq = [
            TextGate(self.num_heads, dtype=self.dtype, name=f"fusion{k}")(v.reshape(b, h * w, self.dim), txt)
            for k, v in zip((3, 4, 5), vs)
        ]
        fq = self._cbr(jnp.concatenate(fq, axis=-1).reshape(b, h, w, 3 * self.dim), "aggr", 1, train)
        coords = jnp.broadcast_to(jnp.asarray(coord_features(h, w), fq.dtype), (b, h, w, 2))
        y = self._cbr(jnp.concatenate([fq, coords], axis=-1), "coordconv_0_conv1", 3, train)
        y = self._cbr(y, "coordconv_1", 3, train)
        return fq + y, None
