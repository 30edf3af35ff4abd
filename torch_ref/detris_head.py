"""PyTorch reference of DETRIS's decoder and projector, written from docs/detris_code.md ("Decoder", "Projector").

Parameter names equal an official DETRIS checkpoint's (``decoder.layers.{i}.*``, ``decoder.norm.*``,
``proj.vis.*``, ``proj.txt.*``), so ``state_dict()`` of :class:`DetrisHead` is a stand-in for the checkpoint.
Layouts are the sequence-first ones of ``nn.MultiheadAttention`` (N, B, C); inputs are NCHW.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.detris_parts import randomize as randomize_constants


def sine_1d(length: int, dim: int) -> torch.Tensor:
    """(L, dim): even channels sin(l * f_i), odd channels cos(l * f_i), f_i = 10000^(-2i/dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = torch.arange(length, dtype=torch.float32)[:, None] * freq[None]
    out = torch.empty(length, dim)
    out[:, 0::2], out[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return out


def sine_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(dim, H, W): first half of the channels encodes x (sin/cos interleaved), second half y."""
    half = dim // 2
    ex = sine_1d(width, half).t()[:, None, :].expand(half, height, width)  # x varies along W
    ey = sine_1d(height, half).t()[:, :, None].expand(half, height, width)
    return torch.cat([ex, ey], 0)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        ffn = [nn.Linear(d_model, dim_ffn), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(dim_ffn)]
        self.ffn = nn.Sequential(*ffn, nn.Linear(dim_ffn, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, v, t, v_pos, t_pos, pad_mask):
        """v (HW, B, C), t (L, B, C), v_pos (HW, 1, C), t_pos (L, 1, C), pad_mask (B, L) bool."""
        x = self.norm1(v)
        x = self.self_attn(x + v_pos, x + v_pos, x, need_weights=False)[0]
        v = v + self.drop(self.self_attn_norm(x))
        x = self.norm2(v)
        x = self.multihead_attn(x + v_pos, t + t_pos, t, key_padding_mask=pad_mask, need_weights=False)[0]
        v = v + self.drop(self.cross_attn_norm(x))
        return v + self.drop(self.ffn(self.norm3(v)))


class Decoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d_model, nhead, dim_ffn, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis, txt, pad_mask):
        """vis (B, C, H, W), txt (B, L, C), pad_mask (B, L) -> (B, C, H, W)."""
        b, c, h, w = vis.shape
        v_pos = sine_2d(h, w, c).reshape(c, h * w).t()[:, None]
        t_pos = sine_1d(txt.shape[1], c)[:, None]
        v = vis.flatten(2).permute(2, 0, 1)
        t = txt.transpose(0, 1)
        for layer in self.layers:
            v = layer(v, t, v_pos, t_pos, pad_mask)
        return self.norm(v).permute(1, 2, 0).reshape(b, c, h, w)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Projector(nn.Module):
    def __init__(self, word_dim: int, in_dim: int, kernel_size: int = 3):
        super().__init__()
        mid = in_dim // 2
        self.k = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            _conv_bn_relu(in_dim, in_dim),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            _conv_bn_relu(in_dim, mid),
            nn.Conv2d(mid, mid, 1),
        )
        self.txt = nn.Linear(word_dim, mid * kernel_size * kernel_size + 1)

    def forward(self, x, state):
        """x (B, in_dim, H, W), state (B, word_dim) -> (B, 1, 4H, 4W)."""
        x = self.vis(x)
        b, c, h, w = x.shape
        t = self.txt(state)
        weight = t[:, :-1].reshape(b, c, self.k, self.k)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, t[:, -1], padding=self.k // 2, groups=b)
        return out.transpose(0, 1)


class DetrisHead(nn.Module):
    """Holds ``decoder`` and ``proj`` under DETRIS's top-level names."""

    def __init__(self, d_model=512, nhead=8, dim_ffn=512, num_layers=3, word_dim=512, dropout=0.1):
        super().__init__()
        self.decoder = Decoder(num_layers, d_model, nhead, dim_ffn, dropout)
        self.proj = Projector(word_dim, d_model)

    def randomize(self, seed: int = 0) -> None:
        """Non-trivial values for everything PyTorch initialises to constants (LayerNorm/BatchNorm affine,
        BatchNorm running statistics, zero-initialised attention biases), so parity exercises every mapping."""
        randomize_constants(self, seed, layer_norm=True)
