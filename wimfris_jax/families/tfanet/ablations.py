"""The stand-ins of TFANet's ablation study (Table 3 rows a-d), chosen by ``config.model.level.attention`` /
``.mixer`` and ``config.model.decoder.kind`` (docs/TFANET.md "Ablation switches")::

    attention "transformer"  TransformerCrossAttention   MLAM's place: softmax cross-attention both ways (Table 3c)
    attention "none"         -                           F_LV = F_V, F_VL = F_W: no attention before fusion
    mixer "conv"             ConvFusion                  CFSM's place: the baseline's convolutional fusion (3a)
    decoder "simple"         SimpleDecoder               WFDM's place: the baseline's lightweight decoder (3a-d)

Each keeps the interface of the module it replaces, so TFANetLevel and TFANet run unchanged around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask, multi_head_attention
from wimfris_jax.families.tfanet.common import valid_words
from wimfris_jax.interpolate import bilinear_resize
from wimfris_jax.layers import torch_default_kernel

ATTENTIONS = ("mlam", "none", "transformer")
MIXERS = ("cfsm", "conv")
DECODERS = ("simple", "wfdm")


class TransformerCrossAttention(nn.Module):
    """Standard (softmax, multi-head) cross-attention in both directions, MLAM's interface (Table 3c)::

        F_LV = F_V + MHA(q = LN(F_V), k = v = LN(F_W), padded words masked)      (B, H, W, Cv)
        F_VL = (F_W + MHA(q = LN(F_W), k = v = LN(F_V))) * valid                 (B, L, Ct)

    Pre-norm residual blocks (a transformer decoder's cross-attention sub-layer); each direction attends at its
    query's width (q, k, v and output width Cv resp. Ct), so ``num_heads`` must divide both.

    Attributes:
      num_heads: heads of both attentions.
      implementation: :func:`wimfris_jax.attention.dot_product_attention` implementation.
      dtype: computation dtype.
    """

    num_heads: int = 8
    implementation: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, visual: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """visual (B, H, W, Cv), words (B, L, Ct), pad_mask (B, L) True = padding -> (F_LV, F_VL) as MLAM."""
        b, h, w, cv = visual.shape
        ct = words.shape[-1]
        if cv % self.num_heads or ct % self.num_heads:
            raise ValueError(f"transformer attention: num_heads {self.num_heads} must divide widths {cv} and {ct}")
        valid = valid_words(pad_mask, b, words.shape[1])
        pixels = visual.reshape(b, h * w, cv)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        mha = lambda width, name: multi_head_attention(
            self.num_heads, width, implementation=self.implementation, dtype=self.dtype, name=name
        )
        p_n, w_n = norm("pixel_norm")(pixels), norm("word_norm")(words)
        a_pixels = mha(cv, "image_to_text")(p_n, w_n, w_n, mask=key_padding_mask(~valid.astype(bool)))  # real words
        a_words = mha(ct, "text_to_image")(w_n, p_n, p_n)
        f_lv = visual + a_pixels.reshape(b, h, w, cv).astype(visual.dtype)
        f_vl = (words + a_words.astype(words.dtype)) * valid[..., None].astype(words.dtype)
        return f_lv, f_vl


class ConvFusion(nn.Module):
    """The baseline's convolutional fusion in CFSM's place (Table 3a): F_Block (B, H, W, 3C) -> F_F (B, H, W, C).

    F_Block = [E(F_VL) sentence, F_LV visual, F_c word-level] (:class:`FusionBlock`); the visual features are
    fused with the word-level ones by element-wise multiplication, concatenated with the visual and sentence
    features, and one k x k convolution brings the 3C channels back to C::

        F_F = Conv_kxk([F_LV * F_c, F_LV, E(F_VL)])
    """

    kernel_size: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f_block: jnp.ndarray) -> jnp.ndarray:
        if f_block.ndim != 4 or f_block.shape[-1] % 3:
            raise ValueError(f"ConvFusion expects (B, H, W, 3C), got {f_block.shape}")
        sentence, visual, word_level = jnp.split(f_block, 3, axis=-1)
        x = jnp.concatenate([visual * word_level, visual, sentence], axis=-1)
        k = self.kernel_size
        return nn.Conv(
            f_block.shape[-1] // 3,
            (k, k),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_kernel,
            name="conv",
        )(x)


class SimpleDecoder(nn.Module):
    """The baseline's lightweight decoder in WFDM's place (Table 3a-d): no word kernels, no alpha::

        F_Mi   = P_i(F_Fi)                     1x1 conv C_i -> D (WFDM's ``lateral_i``)
        M_i+1  = Up(M_i) + F_M(i+1)            bilinear, coarse to fine
        scores = Conv_1x1(M_n)                 (WFDM's ``score``)

    ``lang`` (F_LV) is accepted and unused, so the model calls both decoders alike.
    """

    dim: int = 256
    out_channels: int = 1
    align_corners: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray], lang: Sequence[jnp.ndarray] | None = None) -> jnp.ndarray:
        """feats: F_Fi, n x (B, h_i, w_i, C_i) coarse to fine -> (B, h_n, w_n, out_channels)."""
        del lang
        if not feats:
            raise ValueError("SimpleDecoder needs at least one level")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_default_kernel)
        merged = None
        for i, f in enumerate(feats):
            f_m = nn.Dense(self.dim, name=f"lateral_{i}", **common)(f)
            merged = f_m if merged is None else bilinear_resize(merged, f.shape[1:3], self.align_corners) + f_m
        return nn.Dense(self.out_channels, name="score", **common)(merged)
