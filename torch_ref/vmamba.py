"""A compact PyTorch VMamba v2 (forward type ``v05_noz``, patch embed v2, downsample v3, channels-last LayerNorm),
the reference of tests/backbones/test_vmamba.py and benchmarks/bench_ss2d.py.

Written from the semantics of the official ``classification/models/vmamba.py`` (MzeroMiko/VMamba, MIT) on its pure
PyTorch path (``selective_scan_torch`` of csms6s.py, ``cross_scan_fwd`` / ``cross_merge_fwd`` of csm_triton.py),
trimmed to the one configuration the VMamba v2 checkpoints use; its ``state_dict`` names are the official ones
(``patch_embed.{0,2,5,7}``, ``layers.{i}.blocks.{j}.{norm,op,norm2,mlp}``, ``layers.{i}.downsample.{1,3}``,
``classifier.{norm,head}``), so official checkpoints load into it and the converter is tested on real names.
Cross-checked once against the official VSSM with the same weights (see tests/backbones/test_vmamba.py's module
docstring).
The scan's loop is the official recurrence; it walks per-step views from ``unbind`` so that its backward is linear
in L (slicing ``x[:, :, t]`` L times makes autograd's backward quadratic, infeasible at L = 14400).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

K = 4


def selective_scan(u, delta, A, B, C, D, delta_bias):
    """u, delta (b, K*d, L); A (K*d, n); B, C (b, K, n, L); D, delta_bias (K*d,) -> (b, K*d, L), float32 (float64
    for float64 inputs).

    softplus(delta + delta_bias); h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = <C_t, h_t> + D u_t,
    with B, C shared by the d channels of a direction (``selective_scan_torch``)."""
    b, kd, length = u.shape
    k, n = B.shape[1], B.shape[2]
    f = lambda t: t.to(torch.promote_types(u.dtype, torch.float32))  # float32 as the official; float64 kept
    delta = F.softplus(f(delta) + f(delta_bias)[:, None])
    u, A = f(u), f(A)
    B = f(B).repeat_interleave(kd // k, dim=1)  # (b, K*d, n, L)
    C = f(C).repeat_interleave(kd // k, dim=1)
    decay = torch.exp(delta[..., None] * A[:, None, :])  # (b, K*d, L, n)
    drive = (delta * u)[..., None] * B.transpose(2, 3)  # (b, K*d, L, n)
    h = u.new_zeros(b, kd, n)
    ys = []
    # unbind, not decay[:, :, t]: the backward of L slices would write L full-size gradients (quadratic in L)
    for a_t, b_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(3)):
        h = a_t * h + b_t
        ys.append((h * c_t).sum(-1))
    return torch.stack(ys, dim=-1) + u * f(D)[:, None]


def cross_scan(x):
    """(b, d, H, W) -> (b, 4, d, H*W): row-major, column-major, both reversed."""
    fwd = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)


def cross_merge(ys, h, w):
    """(b, 4, d, H*W) -> (b, d, H*W): un-flip, un-transpose, sum."""
    b, _, d, _ = ys.shape
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    return y[:, 0] + y[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, -1)


class SS2D(nn.Module):
    """SS2D, forward type v05_noz, channels last: (b, H, W, d_model) -> (b, H, W, d_model)."""

    def __init__(self, d_model, d_state=1, ssm_ratio=2.0, dt_rank="auto", d_conv=3, conv_bias=False):
        super().__init__()
        di = int(ssm_ratio * d_model)
        r = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank = di, d_state, r
        self.in_proj = nn.Linear(d_model, di, bias=False)
        self.conv2d = nn.Conv2d(di, di, d_conv, padding=(d_conv - 1) // 2, groups=di, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(K, r + 2 * d_state, di).uniform_(-(di**-0.5), di**-0.5))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, di, r).uniform_(-(r**-0.5), r**-0.5))
        dt = torch.exp(torch.rand(K, di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(K * di, 1))
        self.Ds = nn.Parameter(torch.ones(K * di))
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d_model, bias=False)

    def forward(self, x):
        b, h, w, _ = x.shape
        di, n, r, length = self.d_inner, self.d_state, self.dt_rank, h * w
        x = F.silu(self.conv2d(self.in_proj(x).permute(0, 3, 1, 2)))
        xs = cross_scan(x)  # (b, K, di, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        A = -torch.exp(self.A_logs)
        ys = selective_scan(
            xs.reshape(b, -1, length), dts.reshape(b, -1, length), A, Bs, Cs, self.Ds, self.dt_projs_bias.view(-1)
        )
        y = cross_merge(ys.view(b, K, di, length), h, w).transpose(1, 2).reshape(b, h, w, di)
        return self.out_proj(self.out_norm(y).to(x.dtype))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0, **ssm):
        super().__init__()
        self.norm, self.op = nn.LayerNorm(dim), SS2D(dim, **ssm)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.op(self.norm(x))
        return x + self.mlp(self.norm2(x))


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class VSSM(nn.Module):
    """VMamba v2 (patch embed v2, downsample v3, v05_noz). ``forward_features``: images (b, 3, H, W) -> the four
    stage outputs (b, H/2^(i+2), W/2^(i+2), dims[i]), each before its downsample; ``forward``: logits."""

    def __init__(self, depths=(2, 2, 15, 2), dims=128, num_classes=1000, mlp_ratio=4.0, **ssm):
        super().__init__()
        dims = [dims * 2**i for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        d0 = dims[0]
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, d0 // 2, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(d0 // 2), Permute(0, 3, 1, 2),
            nn.GELU(), nn.Conv2d(d0 // 2, d0, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(d0),
        )  # fmt: skip
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            down = nn.Identity()
            if i < len(depths) - 1:
                conv = nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1)
                down = nn.Sequential(Permute(0, 3, 1, 2), conv, Permute(0, 2, 3, 1), nn.LayerNorm(dims[i + 1]))
            blocks = nn.Sequential(*[VSSBlock(dims[i], mlp_ratio, **ssm) for _ in range(depth)])
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=nn.LayerNorm(dims[-1]), permute=Permute(0, 3, 1, 2), avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1), head=nn.Linear(dims[-1], num_classes),
        ))  # fmt: skip
        for m in self.modules():  # VSSM._init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)
        outs = []
        for layer in self.layers:
            x = layer.blocks(x)
            outs.append(x)
            x = layer.downsample(x)
        return outs

    def forward(self, x):
        return self.classifier(self.forward_features(x)[-1])


def perturb_constants(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Adds N(0, std^2) noise to the parameters that start as constants (norms, biases, A_logs = log 1, Ds = 1),
    so a swapped or mis-shaped one shows in a parity test; the random weights are left at their init scale, which
    keeps float32 rounding (it grows with the activations) within the parity tolerances. Eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"norm|A_logs|Ds|bias", name):
                p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()
