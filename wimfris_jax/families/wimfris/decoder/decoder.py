"""The DETRIS vision-language task decoder that WIMFRIS reuses after its neck.

Source: DETRIS (Huang et al. 2025) ``model/layers.py`` ``Decoder`` / ``DecoderLayer``, restated in
docs/detris_code.md "Decoder"; WIMFRIS (implementation details): "We leverage the task decoder from DETRIS". Each of
the pre-norm layers computes, with pos2d/pos1d the fixed encodings of
:mod:`wimfris_jax.families.wimfris.decoder.position`::

    v2 = norm1(v);  v = v + drop(self_attn_norm(MHA(q=k=v2 + pos2d, v=v2)))
    v2 = norm2(v);  v = v + drop(cross_attn_norm(MHA(q=v2 + pos2d, k=words + pos1d, v=words, key padding)))
    v2 = norm3(v);  v = v + drop(ffn_4(LN_ffn_3(drop(relu(ffn_0(v2))))))

followed by a final LayerNorm. Submodule names follow DETRIS's parameter names one-to-one
(``layers.{i}.multihead_attn`` -> ``layers_{i}/multihead_attn``, ``ffn.3`` -> ``ffn_3``), so
:func:`port_weights.detris.decoder_rules` is a plain renaming. Dropout (rate 0.1 in DETRIS) acts on the attention
weights, inside the FFN and on the three residual branches, as in PyTorch's ``nn.MultiheadAttention`` and DETRIS.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask, multi_head_attention
from wimfris_jax.families.wimfris.decoder.position import pos1d, pos2d
from wimfris_jax.layers import Dropout, remat

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default, used throughout DETRIS's decoder


class DecoderLayer(nn.Module):
    """One pre-norm layer: pixel self-attention, pixel-to-word cross-attention, FFN (shapes: see Decoder)."""

    d_model: int = 512
    num_heads: int = 8
    dim_ffn: int = 512
    dropout: float = 0.1
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        vis: jnp.ndarray,
        words: jnp.ndarray,
        vis_pos: jnp.ndarray,
        word_pos: jnp.ndarray,
        attend: jnp.ndarray,
        *,
        deterministic: bool,
    ) -> jnp.ndarray:
        """vis (B, N, C), words (B, L, C), vis_pos (N, C), word_pos (L, C), attend (B, 1, 1, L) bool -> (B, N, C)."""

        def ln(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)

        def mha(name: str) -> nn.MultiHeadDotProductAttention:
            # attention-weight dropout drawn per weight, as PyTorch's nn.MultiheadAttention
            return multi_head_attention(
                self.num_heads,
                self.d_model,
                implementation=self.attention,
                dropout_rate=self.dropout,
                dtype=self.dtype,
                name=name,
            )

        def drop(x: jnp.ndarray) -> jnp.ndarray:
            return Dropout(self.dropout)(x, deterministic=deterministic)

        v2 = ln("norm1")(vis)
        qk = v2 + vis_pos
        v2 = mha("self_attn")(qk, qk, v2, deterministic=deterministic)
        vis = vis + drop(ln("self_attn_norm")(v2))

        v2 = ln("norm2")(vis)
        v2 = mha("multihead_attn")(v2 + vis_pos, words + word_pos, words, mask=attend, deterministic=deterministic)
        vis = vis + drop(ln("cross_attn_norm")(v2))

        v2 = ln("norm3")(vis)
        v2 = nn.Dense(self.dim_ffn, dtype=self.dtype, name="ffn_0")(v2)
        v2 = drop(nn.relu(v2))
        v2 = ln("ffn_3")(v2)
        v2 = nn.Dense(self.d_model, dtype=self.dtype, name="ffn_4")(v2)
        return vis + drop(v2)


class Decoder(nn.Module):
    """DETRIS decoder: ``num_layers`` :class:`DecoderLayer` and a final LayerNorm ``norm``.

    Attributes:
      num_layers, d_model, num_heads, dim_ffn, dropout: DETRIS's values are 3, 512, 8, 512, 0.1.
      dtype: computation dtype (None: the inputs' / float32); parameters stay float32.
      attention: attention implementation (:mod:`wimfris_jax.attention`).
      remat_mode: rematerialisation of each layer (:func:`wimfris_jax.layers.remat`).
    """

    num_layers: int = 3
    d_model: int = 512
    num_heads: int = 8
    dim_ffn: int = 512
    dropout: float = 0.1
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(
        self, vis: jnp.ndarray, words: jnp.ndarray, pad_mask: jnp.ndarray, *, deterministic: bool
    ) -> jnp.ndarray:
        """Refines the neck's map with the words.

        Args:
          vis: (B, H, W, C) visual features, C = d_model.
          words: (B, L, C) word features (CLIP's final LayerNorm output, unprojected).
          pad_mask: (B, L) bool, True where the token is padding (DETRIS: token id == 0). Every row needs
            at least one False entry (the SOT token always is).
          deterministic: False enables dropout (needs the ``"dropout"`` rng).

        Returns:
          (B, H, W, C).
        """
        vis, words = jnp.asarray(vis, self.dtype), jnp.asarray(words, self.dtype)
        b, h, w, c = vis.shape
        if c != self.d_model or words.shape[-1] != self.d_model:
            raise ValueError(f"Decoder(d_model={self.d_model}) got vis {vis.shape} and words {words.shape}")
        if pad_mask.shape != words.shape[:2]:
            raise ValueError(f"pad_mask {pad_mask.shape} does not match words {words.shape}")
        vis_pos = jnp.asarray(pos2d(h, w, c).reshape(h * w, c), vis.dtype)
        word_pos = jnp.asarray(pos1d(words.shape[1], c), words.dtype)
        attend = key_padding_mask(pad_mask)  # (B, 1, 1, L)
        x = vis.reshape(b, h * w, c)
        for i in range(self.num_layers):
            layer = DecoderLayer(
                self.d_model, self.num_heads, self.dim_ffn, self.dropout, self.dtype, self.attention, name=f"layers_{i}"
            )
            run = remat(lambda mdl, *args: mdl(*args, deterministic=deterministic), self.remat_mode)
            x = run(layer, x, words, vis_pos, word_pos, attend)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
        return x.reshape(b, h, w, c)
