"""PyTorch references of DETRIS's Dense Aligner, text adapter and neck, written from docs/detris_code.md
("Where adapters sit", "Initialisation of the adapters", "Neck that WIMFRIS replaces").

Parameter names equal an official DETRIS checkpoint's (relative to ``dinov2.blocks.{i}.adapter.``,
``txt_backbone.transformer.resblocks.{i}.adapter.`` and ``neck.``), so their ``state_dict()`` stands in for
those parts of a checkpoint. Inputs/outputs are batch-first (B, T, C) token tensors and NCHW maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv(nn.Module):
    """conv (with bias) + BatchNorm(eps 1e-3) + ReLU; ``conv``/``bn`` are the 1-D or 2-D classes."""

    def __init__(self, conv, bn, cin: int, cout: int, k: int):
        super().__init__()
        self.conv, self.bn = conv(cin, cout, k, padding=k // 2), bn(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _dense_branches(m: nn.Module, d: int, conv, bn) -> None:
    """Adds dense_branch1/2/3 (D-MoC) of width d to module m; conv/bn are Conv1d/BatchNorm1d or the 2-D pair."""

    def cbr(cin, cout, k):
        return BasicConv(conv, bn, cin, cout, k)

    m.dense_branch1 = cbr(d, d // 2, 1)
    m.dense_branch2 = nn.Sequential(cbr(d + d // 2, d // 16, 1), cbr(d // 16, d // 4, 3))
    m.dense_branch3 = nn.Sequential(cbr(d + d // 2 + d // 4, d // 16, 1), cbr(d // 16, d // 4, 5))


def _mixture(m: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """xs (B, d, *spatial) -> cat of the three branches (B, d, *spatial)."""
    b1 = m.dense_branch1(xs)
    b2 = m.dense_branch2(torch.cat([xs, b1], 1))
    b3 = m.dense_branch3(torch.cat([xs, b1, b2], 1))
    return torch.cat([b1, b2, b3], 1)


class TextAdapter(nn.Module):
    def __init__(self, width: int = 512, dim: int = 64):
        super().__init__()
        _dense_branches(self, dim, nn.Conv1d, nn.BatchNorm1d)
        self.D_fc1, self.D_fc2 = nn.Linear(width, dim), nn.Linear(dim, width)

    def forward(self, x):
        """x (B, L, width) -> (B, L, width), unscaled."""
        f = F.relu(self.D_fc1(x))
        mixed = _mixture(self, f[:, 1:].transpose(1, 2)).transpose(1, 2)
        return self.D_fc2(torch.cat([f[:, :1], mixed], 1) + f)


class CrossModal(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.image_proj, self.text_proj = nn.Linear(dim, dim), nn.Linear(text_dim, dim)
        self.back_proj = nn.Linear(dim, dim)

    def forward(self, img, text):
        q = self.image_proj(img).transpose(0, 1)
        kv = self.text_proj(text).transpose(0, 1)
        return self.back_proj(self.multihead_attn(q, kv, kv, need_weights=False)[0]).transpose(0, 1)


class DenseAligner(nn.Module):
    def __init__(self, width: int = 768, dim: int = 128, text_dim: int = 512, heads: int = 8, prefix: int = 5):
        super().__init__()
        _dense_branches(self, dim, nn.Conv2d, nn.BatchNorm2d)
        self.D_fc1, self.D_fc2 = nn.Linear(width, dim), nn.Linear(dim, width)
        self.cross = CrossModal(dim, text_dim, heads)
        self.prefix = prefix

    def forward(self, x, words, h: int, w: int):
        """x (B, P + h*w, width), words (B, L, text_dim) -> (B, P + h*w, width), unscaled."""
        f = F.relu(self.D_fc1(x))
        b, _, d = f.shape
        xs = f[:, self.prefix :].transpose(1, 2).reshape(b, d, h, w)
        dense = (_mixture(self, xs) + xs).flatten(2).transpose(1, 2)
        return self.D_fc2(torch.cat([f[:, : self.prefix], self.cross(dense, words)], 1) + f)


def _conv_bn_relu(cin, cout, k, transpose=False):
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, k, padding=k // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class Gate(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)

    def forward(self, v, t):
        """v (N, B, C), t (1, B, C) -> v * MHA(v, t, t)."""
        return v * self.multihead_attn(v, t, t, need_weights=False)[0]


class CoordConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv1 = _conv_bn_relu(dim + 2, dim, 3)

    def forward(self, x):
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xx, yy])[None].expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], 1))


class Neck(nn.Module):
    def __init__(self, in_dim: int = 768, dim: int = 512, heads: int = 8, text_dim: int = 512):
        super().__init__()
        self.fusion3, self.fusion4, self.fusion5 = Gate(dim, heads), Gate(dim, heads), Gate(dim, heads)
        self.txt_proj = nn.Linear(text_dim, dim)
        self.f3_proj, self.f4_proj = _conv_bn_relu(in_dim, dim, 1), _conv_bn_relu(in_dim, dim, 1)
        self.f5_proj = _conv_bn_relu(in_dim, dim, 1, transpose=True)
        self.aggr = _conv_bn_relu(3 * dim, dim, 1)
        self.coordconv = nn.Sequential(CoordConv(dim), _conv_bn_relu(dim, dim, 3))

    def forward(self, maps, state):
        """maps: 3 x (B, Cv, h, w), state (B, text_dim) -> (B, dim, h, w)."""
        t = self.txt_proj(state)[None]
        outs = []
        for proj, gate, v in zip(
            (self.f3_proj, self.f4_proj, self.f5_proj), (self.fusion3, self.fusion4, self.fusion5), maps
        ):
            v = proj(v)
            b, c, h, w = v.shape
            outs.append(gate(v.flatten(2).permute(2, 0, 1), t).permute(1, 2, 0).reshape(b, c, h, w))
        fq = self.aggr(torch.cat(outs, 1))
        return fq + self.coordconv(fq)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, *, layer_norm: bool = False) -> None:
    """Non-trivial values for what PyTorch initialises to constants (BatchNorm affine and running statistics,
    attention biases; LayerNorm affines too with ``layer_norm``), so parity exercises every mapping."""
    g = torch.Generator().manual_seed(seed)
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    affine = batch_norms + ((nn.LayerNorm,) if layer_norm else ())
    for m in module.modules():
        if isinstance(m, affine):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, batch_norms):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.num_batches_tracked.fill_(7)
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=g))
            m.out_proj.bias.copy_(0.1 * torch.randn(m.out_proj.bias.shape, generator=g))
