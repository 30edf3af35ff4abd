"""A whole DETRIS in PyTorch at any size, written from docs/detris_code.md ("Parity checklist"), with the parameter
names of an official DETRIS checkpoint (``txt_backbone.*``, ``dinov2.*``, ``neck.*``, ``decoder.*``, ``proj.*``).

Its ``state_dict()`` is an official-layout checkpoint of its sizes, so a tiny instance tests the whole converter
and the model's wiring end to end: OpenAI CLIP text tower (causal mask, QuickGELU, text adapters beside the MLP
with 0.2), torch-hub DINOv2 with registers (bicubic position resampling with scale factor (g + 0.1) / M, Dense
Aligners beside the MLP with 0.2), taps of blocks ``taps`` before the final norm plus the normed last block,
DETRIS neck, decoder and projector (torch_ref/detris_head.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.detris_head import Decoder, Projector
from torch_ref.detris_parts import DenseAligner, Neck, TextAdapter


class TextBlock(nn.Module):
    def __init__(self, width, heads, adapter_dim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        if adapter_dim:
            self.adapter = TextAdapter(width, adapter_dim)

    def forward(self, x, mask):
        """x (L, B, W)."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        y = self.mlp.c_proj(h * torch.sigmoid(1.702 * h))
        if hasattr(self, "adapter"):
            y = y + 0.2 * self.adapter(x.transpose(0, 1)).transpose(0, 1)
        return x + y


class TextTower(nn.Module):
    def __init__(self, vocab, width, depth, heads, context, adapter_layers, adapter_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, width))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.transformer = nn.Module()
        blocks = [TextBlock(width, heads, adapter_dim if i in adapter_layers else None) for i in range(depth)]
        self.transformer.resblocks = nn.Sequential(*blocks)
        self.token_embedding = nn.Embedding(vocab, width)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, ids):
        length = ids.shape[1]
        x = (self.token_embedding(ids) + self.positional_embedding[:length]).transpose(0, 1)
        mask = torch.full((length, length), float("-inf")).triu_(1)
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        words = self.ln_final(x.transpose(0, 1))
        state = words[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection
        return words, state


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class VisionBlock(nn.Module):
    def __init__(self, width, heads, text_dim, adapter_dim=None, adapter_heads=8):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ls1, self.ls2 = LayerScale(width), LayerScale(width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads
        if adapter_dim:
            self.adapter = DenseAligner(width, adapter_dim, text_dim, adapter_heads, prefix=5)

    def forward(self, x, words, grid):
        b, t, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, c)
        x = x + self.ls1.gamma * self.attn.proj(a)
        n2 = self.norm2(x)
        y = self.mlp.fc2(F.gelu(self.mlp.fc1(n2)))
        if hasattr(self, "adapter"):
            y = y + 0.2 * self.adapter(n2, words, *grid)
        return x + self.ls2.gamma * y


class Dino(nn.Module):
    def __init__(self, width, depth, heads, patch, pos_grid, text_dim, adapter_layers, adapter_dim, adapter_heads):
        super().__init__()
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + pos_grid**2, width))
        self.register_tokens = nn.Parameter(0.02 * torch.randn(1, 4, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.blocks = nn.ModuleList(
            VisionBlock(width, heads, text_dim, adapter_dim if i in adapter_layers else None, adapter_heads)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.patch, self.pos_grid = patch, pos_grid

    def forward(self, img, words, taps):
        """img (B, 3, S, S) -> [blocks taps (pre-norm)..., norm(last)] as (B, C, h, w) maps."""
        b = img.shape[0]
        x = self.patch_embed.proj(img)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        m = self.pos_grid
        pos = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if (h, w) != (m, m):
            pos = F.interpolate(pos, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
        pos = torch.cat([self.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], 1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + pos
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], 1)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, words, (h, w))
            if i in taps:
                outs.append(x)
        outs.append(self.norm(x))
        return [o[:, 5:].transpose(1, 2).reshape(b, -1, h, w) for o in outs]


class Detris(nn.Module):
    """DETRIS at configurable sizes; ``forward(img (B, 3, S, S), ids (B, L)) -> logits (B, 4h, 4w)``."""

    def __init__(
        self,
        *,
        vocab=49408,
        text_width=512,
        text_depth=12,
        text_heads=8,
        context=77,
        text_adapter_layers=(1, 3, 5, 7, 9, 11),
        text_adapter_dim=64,
        width=768,
        depth=12,
        heads=12,
        patch=14,
        pos_grid=37,
        vision_adapter_layers=(1, 3, 5, 7, 9, 11),
        vision_adapter_dim=128,
        adapter_heads=8,
        taps=(4, 8),
        dim=512,
        neck_heads=8,
        decoder_layers=3,
        decoder_heads=8,
        dim_ffn=512,
    ):
        super().__init__()
        self.txt_backbone = TextTower(
            vocab, text_width, text_depth, text_heads, context, text_adapter_layers, text_adapter_dim
        )
        self.dinov2 = Dino(
            width, depth, heads, patch, pos_grid, text_width, vision_adapter_layers, vision_adapter_dim, adapter_heads
        )
        self.neck = Neck(width, dim, neck_heads, text_width)
        self.decoder = Decoder(decoder_layers, dim, decoder_heads, dim_ffn)
        self.proj = Projector(text_width, dim)
        self.taps = tuple(taps)

    def forward(self, img, ids):
        words, state = self.txt_backbone(ids)
        maps = self.dinov2(img, words, self.taps)
        fq = self.decoder(self.neck(maps, state), words, ids == 0)
        return self.proj(fq, state)[:, 0]
