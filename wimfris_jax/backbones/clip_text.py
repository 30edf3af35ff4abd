"""CLIP text transformer (Radford et al. 2021): the frozen text encoder of WIMFRIS (Fig. 2a), as DETRIS uses it, and
TFANet's text tower (trained there).

Source: OpenAI ``clip/model.py`` (``CLIP.encode_text``) and transformers ``CLIPTextModel``; DETRIS reads it as in
docs/detris_code.md ("Backbones and how they are read"):

    x = token_embedding(ids) + positional_embedding[:L]                                   (B, L, W)
    block:  x = x + attn(ln_1(x), causal mask)
            x = x + mlp(ln_2(x)) [+ adapter_i(x)]     (adapter seam, MTA: reads x after attention, un-normed)
    words  = ln_final(x)                                                                   (B, L, W)
    pooled = words[argmax(ids)]  (EOT has the largest id; padding is 0);  text_embeds = pooled @ text_projection

Only the causal mask is applied (DETRIS passes no padding mask; with a causal mask the padding after EOT cannot
reach the EOT token or any word before it). QuickGELU, LayerNorm eps 1e-5.

Presets (:func:`clip_text_config`): "b16", the text tower of CLIP ViT-B/16 (WIMFRIS, DETRIS) and "l14", that of
CLIP ViT-L/14 (TFANet, ReMamber).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.backbones.vit import Adapter, Adapters, Array, quick_gelu, self_attention
from wimfris_jax.layers import Mlp, cast, layer_norm, remat

# name -> (width, depth, heads, proj_dim); all: vocabulary 49408, 77 positions, MLP ratio 4, LayerNorm eps 1e-5.
# OpenAI's clip/model.py: heads = transformer_width // 64 (the checkpoints do not store it).
_SIZES = {
    "b16": (512, 12, 8, 512),  # ViT-B/16 (the same text tower as ViT-B/32)
    "l14": (768, 12, 12, 768),  # ViT-L/14 (the same text tower as ViT-L/14@336px)
}
CLIP_TEXT_PRESETS = tuple(_SIZES)


def clip_text_config(name: str) -> dict[str, Any]:
    """:class:`ClipText` fields of an OpenAI CLIP text tower: "b16" (ViT-B/16) or "l14" (ViT-L/14); the same
    fields the converter infers from such a checkpoint (``port_weights.clip``), so ``ClipText(**clip_text_config(
    name))`` takes its converted params."""
    if name not in _SIZES:
        raise ValueError(f"unknown CLIP text preset {name!r}; choose from {sorted(_SIZES)}")
    width, depth, heads, proj = _SIZES[name]
    return dict(
        vocab_size=49408,
        width=width,
        depth=depth,
        num_heads=heads,
        context_length=77,
        proj_dim=proj,
        ln_eps=1e-5,
        mlp_ratio=4.0,
    )


class ResidualAttentionBlock(nn.Module):
    """CLIP text block with the MTA adapter seam; (B, L, W) -> (B, L, W)."""

    num_heads: int
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, x: Array, mask: Array, adapter: Adapter | None = None) -> Array:
        w = x.shape[-1]
        x = x + self_attention(self.num_heads, w, self.dtype, "attn", self.attention, self.remat_mode)(
            layer_norm(self.ln_eps, self.dtype, "ln_1")(x), mask=mask
        )
        y = remat(Mlp, self.remat_mode)(int(w * self.mlp_ratio), quick_gelu, self.dtype, name="mlp")(
            layer_norm(self.ln_eps, self.dtype, "ln_2")(x)
        )
        if adapter is not None:
            y = y + adapter(x)
        return x + y


class ClipText(nn.Module):
    """CLIP text tower with per-block adapters; the defaults are the ViT-B/16 tower, ``ClipText(**clip_text_config(
    "l14"))`` builds the ViT-L/14 one.

    Attributes:
      vocab_size: BPE vocabulary (49408 for OpenAI CLIP).
      width, depth, num_heads, mlp_ratio: transformer sizes.
      context_length: rows of the stored position table (77); inputs may be shorter (DETRIS: 17 or 22).
      proj_dim: output size of ``text_projection``; None for a tower without it (then no "text_embeds").
      ln_eps: LayerNorm epsilon.
      dtype: computation dtype (None: float32); parameters stay float32.
      attention: attention implementation (:mod:`wimfris_jax.attention`).
      remat_mode: rematerialisation of each block's attention and MLP (:func:`wimfris_jax.layers.remat`).
    """

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    context_length: int = 77
    proj_dim: int | None = 512
    ln_eps: float = 1e-5
    mlp_ratio: float = 4.0
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, ids: Array, adapters: Adapters | None = None) -> dict[str, Any]:
        """ids (B, L) int, 0 = padding, EOT = the largest id of each row -> {"hidden_states": depth + 1 arrays
        (B, L, W) (embeddings, then each block, before ln_final), "last_hidden_state": ln_final output (B, L, W),
        "pooled": (B, W) at argmax(ids), "text_embeds": (B, proj_dim) when proj_dim is set}.

        ``adapters``: {block index: callable (B, L, W) -> (B, L, W)} added beside that block's MLP; it reads x
        after the attention residual, before ln_2.
        """
        if ids.ndim != 2:
            raise ValueError(f"ClipText expects ids (B, L), got shape {ids.shape}")
        b, length = ids.shape
        if length > self.context_length:
            raise ValueError(f"text length {length} exceeds the position table's context_length {self.context_length}")
        adapters = dict(adapters or {})
        bad = [i for i in adapters if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"adapters for blocks {bad}; ClipText has blocks 0..{self.depth - 1}")
        emb = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="token_embedding")
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
        x = cast(emb(ids) + pos[:length], self.dtype)
        mask = nn.make_causal_mask(ids)  # (B, 1, L, L)
        hidden = [x]
        for i in range(self.depth):
            blk = ResidualAttentionBlock(
                self.num_heads,
                self.mlp_ratio,
                self.ln_eps,
                self.dtype,
                self.attention,
                self.remat_mode,
                name=f"blocks_{i}",
            )
            x = blk(x, mask, adapters.get(i))
            hidden.append(x)
        words = layer_norm(self.ln_eps, self.dtype, "ln_final")(x)
        pooled = words[jnp.arange(b), jnp.argmax(ids, axis=-1)]
        out = {"hidden_states": tuple(hidden), "last_hidden_state": words, "pooled": pooled}
        if self.proj_dim is not None:
            proj = self.param("text_projection", nn.initializers.normal(self.width**-0.5), (self.width, self.proj_dim))
            out["text_embeds"] = pooled @ cast(proj, pooled.dtype)
        return out
