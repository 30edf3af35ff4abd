"""BERT (Devlin et al. 2019) as a text encoder: the WordPiece-id encoder of CrossVLT-style referring segmentation.

Source: transformers ``BertModel`` (``models/bert/modeling_bert.py``), eval mode (no dropout), absolute positions,
encoder only (no cross-attention, no cache):

    x = LayerNorm(word(ids) + position(0..L-1) + token_type(token_type_ids or 0))                       (B, L, W)
    layer:  x = attn_norm(x + attn(x, keys masked where ids == 0))           (post-norm, as BertSelfOutput)
            x = mlp_norm(x + fc2(gelu(fc1(x))))                              (exact erf GELU, as BertOutput)
    pooled = tanh(pooler(x[:, 0]))                                           (BertPooler: the [CLS] row)

Padding is [PAD] = id 0 (every BERT vocabulary): ``pad_mask = ids == 0`` masks those keys, which is transformers'
``attention_mask = ids != 0``. Padded query rows are computed as transformers computes them (they attend to the
words), so every hidden state matches, padding rows included. LayerNorm eps 1e-12.

The module is built in ``setup``, so a caller can run it piece by piece (``embed``, then ``layer(i, ...)`` for each
layer with its own modules in between, then ``pool``) through ``apply(..., method=...)`` or as a submodule; its
``__call__`` runs them in order. Parameters: ``embeddings/{word, position, token_type, norm}``,
``layers_{i}/{attn/{query, key, value, out}, attn_norm, mlp/{fc1, fc2}, mlp_norm}`` and ``pooler_dense`` (when
``pooler``); ``port_weights.bert`` converts transformers checkpoints into them.

Presets (:func:`bert_config`): "base" (bert-base-*) and "large" (bert-large-*).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import key_padding_mask
from wimfris_jax.backbones.vit import Array, self_attention
from wimfris_jax.layers import Mlp, cast, gelu_exact, layer_norm, remat

# name -> (width, depth, heads, mlp); all: vocabulary 30522 (uncased), 512 positions, 2 token types, eps 1e-12.
_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
BERT_PRESETS = tuple(_SIZES)

_normal = nn.initializers.normal(0.02)  # BERT's initializer_range


def bert_config(name: str) -> dict[str, Any]:
    """:class:`Bert` fields of Google's BERT "base" or "large" (the sizes ``port_weights.bert`` infers from a
    ``bert-base-uncased`` / ``bert-large-uncased`` checkpoint; ``pooler`` left at its default)."""
    if name not in _SIZES:
        raise ValueError(f"unknown BERT preset {name!r}; choose from {sorted(_SIZES)}")
    width, depth, heads, mlp = _SIZES[name]
    return dict(
        vocab_size=30522,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        max_positions=512,
        type_vocab_size=2,
        ln_eps=1e-12,
    )


class Embeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm; ids (B, L) -> (B, L, W)."""

    vocab_size: int
    width: int
    max_positions: int
    type_vocab_size: int
    ln_eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, ids: Array, token_type_ids: Array | None = None) -> Array:
        length = ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"text length {length} exceeds the position table's max_positions {self.max_positions}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        word = nn.Embed(self.vocab_size, self.width, embedding_init=_normal, name="word")
        pos = nn.Embed(self.max_positions, self.width, embedding_init=_normal, name="position")
        tt = nn.Embed(self.type_vocab_size, self.width, embedding_init=_normal, name="token_type")
        x = word(ids) + pos.embedding[:length] + tt(token_type_ids)
        return layer_norm(self.ln_eps, self.dtype, "norm")(x)


class BertLayer(nn.Module):
    """One post-norm BERT layer; x (B, L, W), pad_mask (B, L) bool (True = padding) -> (B, L, W)."""

    num_heads: int
    mlp_dim: int
    ln_eps: float
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, x: Array, pad_mask: Array) -> Array:
        w = x.shape[-1]
        mask = key_padding_mask(pad_mask)  # (B, 1, 1, L), True = attend
        h = self_attention(self.num_heads, w, self.dtype, "attn", self.attention, self.remat_mode)(x, mask=mask)
        x = layer_norm(self.ln_eps, self.dtype, "attn_norm")(x + h)
        y = remat(Mlp, self.remat_mode)(self.mlp_dim, gelu_exact, self.dtype, name="mlp")(x)
        return layer_norm(self.ln_eps, self.dtype, "mlp_norm")(x + y)


class Bert(nn.Module):
    """BERT encoder; the defaults are BERT-base, ``Bert(**bert_config("large"))`` builds BERT-large.

    Attributes:
      vocab_size, width, depth, num_heads, mlp_dim: transformer sizes (``mlp_dim``: intermediate size).
      max_positions: rows of the position table (512); inputs may be shorter (CrossVLT: 21).
      type_vocab_size: rows of the token-type table (2).
      ln_eps: LayerNorm epsilon (1e-12).
      pooler: whether the model has BERT's pooler (``tanh(Dense(x[:, 0]))``, output "pooled").
      dtype: computation dtype (None: float32); parameters stay float32.
      attention: attention implementation (:mod:`wimfris_jax.attention`).
      remat_mode: rematerialisation of each layer's attention and MLP (:func:`wimfris_jax.layers.remat`).
    """

    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pooler: bool = False
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    def setup(self) -> None:
        self.embeddings = Embeddings(
            self.vocab_size, self.width, self.max_positions, self.type_vocab_size, self.ln_eps, self.dtype
        )
        self.layers = [
            BertLayer(self.num_heads, self.mlp_dim, self.ln_eps, self.dtype, self.attention, self.remat_mode)
            for _ in range(self.depth)
        ]  # named layers_0 .. layers_{depth-1}
        if self.pooler:
            self.pooler_dense = nn.Dense(self.width, dtype=self.dtype)

    def embed(self, ids: Array, token_type_ids: Array | None = None) -> Array:
        """ids (B, L) int (0 = [PAD]), optional token_type_ids (B, L) (default 0) -> embeddings (B, L, W)."""
        if ids.ndim != 2:
            raise ValueError(f"Bert expects ids (B, L), got shape {ids.shape}")
        return cast(self.embeddings(ids, token_type_ids), self.dtype)

    def layer(self, i: int, x: Array, pad_mask: Array) -> Array:
        """Layer ``i``: x (B, L, W), pad_mask (B, L) bool, True = padding (those keys are masked) -> (B, L, W)."""
        if not 0 <= i < self.depth:
            raise ValueError(f"layer {i}: Bert has layers 0..{self.depth - 1}")
        return self.layers[i](x, pad_mask)

    def pool(self, x: Array) -> Array:
        """(B, L, W) -> (B, W): ``tanh(pooler_dense(x[:, 0]))``, the [CLS] row (only with ``pooler=True``)."""
        if not self.pooler:
            raise ValueError("this Bert has no pooler (pooler=False)")
        return jnp.tanh(self.pooler_dense(x[:, 0]))

    def __call__(self, ids: Array, token_type_ids: Array | None = None) -> dict[str, Any]:
        """ids (B, L) int, 0 = [PAD] -> {"hidden_states": depth + 1 arrays (B, L, W) (embeddings, then each
        layer), "last_hidden_state": (B, L, W), "pooled": (B, W) when ``pooler``}."""
        pad_mask = ids == 0
        x = self.embed(ids, token_type_ids)
        hidden = [x]
        for i in range(self.depth):
            x = self.layer(i, x, pad_mask)
            hidden.append(x)
        out = {"hidden_states": tuple(hidden), "last_hidden_state": x}
        if self.pooler:
            out["pooled"] = self.pool(x)
        return out
