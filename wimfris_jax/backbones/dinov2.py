"""DINOv2 ViT (Oquab et al. 2023; with registers: Darcet et al. 2024), the frozen vision encoder of WIMFRIS (Fig. 2a).

Source: torch-hub ``dinov2/models/vision_transformer.py`` (as vendored by DETRIS) and transformers'
``Dinov2Model`` / ``Dinov2WithRegistersModel``; the three agree on everything but the position-embedding
resampling (see :func:`interpolate_pos_embed`).

    tokens = [cls + pos[0], registers, patch_embed(images) + resample(pos[1:])]        (B, 1 + R + h*w, C)
    block:   x = x + ls1 * attn(norm1(x))
             x = x + ls2 * (mlp(n2) [+ adapter_i(n2)]),  n2 = norm2(x)                   (adapter seam, MSA)
    out:     hidden_states = (tokens, block_0(...), ..., block_{depth-1}(...)); last_hidden_state = norm(last)

The adapter seam is DETRIS's vision-adapter placement (docs/detris_code.md "Where adapters sit"); WIMFRIS's MSA
(eq. 2-3) plugs in there, and the config picks which adapter (docs/ARCHITECTURE.md "Adapter schema"). The backbone
knows nothing about the adapter: it is any callable (B, T, C) -> (B, T, C), typically a bound submodule of the
parent model, so its parameters live in the parent's scope.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from wimfris_jax.backbones import vit
from wimfris_jax.backbones.vit import Adapter, Adapters, Array
from wimfris_jax.interpolate import resize_2d, resize_matrix
from wimfris_jax.layers import Mlp, cast, fusion_barrier, gelu_exact, layer_norm, remat

INTERPOLATIONS = ("torchhub", "hf", "hf_antialias")

_SIZES = {  # width, depth, heads, ffn  (torch-hub vit_small/base/large/giant2, patch 14, pos grid 37 = 518 / 14)
    "s14": (384, 12, 6, "mlp"),
    "b14": (768, 12, 12, "mlp"),
    "l14": (1024, 24, 16, "mlp"),
    "g14": (1536, 40, 24, "swiglu"),
}


def dinov2_config(name: str) -> dict[str, Any]:
    """:class:`DinoV2` fields of a torch-hub DINOv2 model: "s14", "b14", "l14", "g14", each optionally "_reg4".

    All use patch 14, a 37 x 37 position grid, LayerScale, LayerNorm eps 1e-6 and the torch-hub resampling rule
    (the checkpoints DETRIS loads); g14 uses the SwiGLU FFN.
    """
    base, _, reg = name.partition("_")
    if base not in _SIZES or reg not in ("", "reg4"):
        raise ValueError(f"unknown DINOv2 preset {name!r}; choose from {sorted(_SIZES)} with an optional '_reg4'")
    width, depth, heads, ffn = _SIZES[base]
    return dict(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        ffn=ffn,
        patch_size=14,
        num_registers=4 if reg else 0,
        pos_grid=37,
        layerscale=True,
        ln_eps=1e-6,
        interpolation="torchhub",
    )


def pos_embed_matrices(pos_grid: int, grid: tuple[int, int], rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(h, M) and (w, M) float64 matrices resampling an M x M position grid to (h, w) as ``rule``'s source does.

    - "torchhub": ``F.interpolate(bicubic, scale_factor=((h + 0.1) / M, (w + 0.1) / M))`` (Keys a = -0.75); the
      kernel then maps coordinates with 1 / scale_factor, not M / h (torch-hub DINOv2, DETRIS).
    - "hf": ``size=(h, w)``, bicubic, antialias off (transformers ``Dinov2Model``).
    - "hf_antialias": ``size=(h, w)``, bicubic, antialias on (transformers ``Dinov2WithRegistersModel``).
    """
    m = pos_grid
    if rule == "torchhub":
        mats = tuple(resize_matrix(m, scale_factor=(g + 0.1) / m) for g in grid)
    elif rule in ("hf", "hf_antialias"):
        mats = tuple(resize_matrix(m, g, antialias=rule == "hf_antialias") for g in grid)
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {rule!r}")
    got = tuple(a.shape[0] for a in mats)
    if got != tuple(grid):
        raise ValueError(f"{rule} resampling of the {m}x{m} position grid gives {got}, not the patch grid {grid}")
    return mats


def interpolate_pos_embed(pos_embed: Array, grid: tuple[int, int], rule: str, square_pixels: bool) -> Array:
    """Position table (1, 1 + M*M, C) -> (1, 1 + h*w, C) for a (h, w) patch grid, cls entry first.

    The table is returned unchanged when h * w == M * M and the input image is square in pixels — the exact
    condition of torch-hub (``npatch == N and w == h``) and transformers (``num_patches == num_positions and
    height == width``). Otherwise it is resampled (in float32, as the sources do) with :func:`pos_embed_matrices`.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    h, w = grid
    if h * w == n and square_pixels:
        return pos_embed
    mh, mw = pos_embed_matrices(m, (h, w), rule)
    table = pos_embed[:, 1:].astype(jnp.float32).reshape(1, m, m, -1)
    table = resize_2d(table, mh, mw).reshape(1, h * w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], table], axis=1)


class Block(nn.Module):
    """DINOv2 block (LayerScale, exact GELU or SwiGLU FFN) with the MSA adapter seam; (B, T, C) -> (B, T, C)."""

    num_heads: int
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    layerscale: bool = True
    ln_eps: float = 1e-6
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, x: Array, adapter: Adapter | None = None) -> Array:
        c = x.shape[-1]

        def scale(name: str, y: Array) -> Array:
            return y * cast(self.param(name, nn.initializers.ones, (c,)), self.dtype) if self.layerscale else y

        y = vit.self_attention(self.num_heads, c, self.dtype, "attn", self.attention, self.remat_mode)(
            layer_norm(self.ln_eps, self.dtype, "norm1")(x)
        )
        x = x + scale("ls1", y)
        n2 = layer_norm(self.ln_eps, self.dtype, "norm2")(x)
        if self.ffn == "swiglu":
            y = remat(vit.SwiGLU, self.remat_mode)(vit.swiglu_hidden(c, self.mlp_ratio), self.dtype, name="mlp")(n2)
        elif self.ffn == "mlp":
            y = remat(Mlp, self.remat_mode)(int(c * self.mlp_ratio), gelu_exact, self.dtype, name="mlp")(n2)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if adapter is not None:
            y = y + adapter(n2)
        return x + scale("ls2", y)


class DinoV2(nn.Module):
    """DINOv2 ViT with optional register tokens and per-block adapters.

    Attributes:
      width, depth, num_heads, mlp_ratio: transformer sizes; ffn: "mlp" (exact GELU) or "swiglu" (DINOv2-g).
      patch_size: side of the square patches; images whose sides are not multiples are cropped (VALID conv).
      num_registers: register tokens R (0 for plain DINOv2).
      pos_grid: side M of the stored position grid (37 for the 518-pixel pretraining size).
      layerscale: per-channel scales ls1, ls2 on both residual branches.
      ln_eps: LayerNorm epsilon.
      interpolation: how the M x M position grid is resampled for other grids: "torchhub", "hf" or
        "hf_antialias" — the rule of the checkpoint's source (see :func:`pos_embed_matrices`).
      dtype: computation dtype (None: float32); parameters stay float32.
      attention: attention implementation, "auto" | "xla" | "cudnn" | "chunked" (:mod:`wimfris_jax.attention`).
      remat_mode: rematerialisation of each block's attention and MLP, "none" | "block" | "dots"
        (:func:`wimfris_jax.layers.remat`).
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    num_registers: int = 4
    pos_grid: int = 37
    layerscale: bool = True
    ln_eps: float = 1e-6
    interpolation: str = "torchhub"
    ffn: str = "mlp"
    dtype: Any = None
    attention: str = "auto"
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, images: Array, adapters: Adapters | None = None) -> dict[str, Any]:
        """images (B, H, W, 3) normalised -> {"hidden_states": depth + 1 arrays (B, T, C) before the final norm,
        "last_hidden_state": (B, T, C) after it, "grid": (h, w)}; T = 1 + R + h*w, tokens [cls, registers, patches].

        ``adapters``: {block index: callable (B, T, C) -> (B, T, C)} called on norm2(x) inside that block.
        """
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"DinoV2 expects images (B, H, W, 3), got {images.shape}")
        adapters = dict(adapters or {})
        bad = [i for i in adapters if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"adapters for blocks {bad}; DinoV2 has blocks 0..{self.depth - 1}")
        b, hp, wp, _ = images.shape
        p, c = self.patch_size, self.width
        grid = (hp // p, wp // p)
        if min(grid) < 1:
            raise ValueError(f"images {hp}x{wp} are smaller than one {p}x{p} patch")
        std = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", std, (1, 1, c))
        pos_embed = self.param("pos_embed", std, (1, 1 + self.pos_grid**2, c))
        x = nn.Conv(c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(images)
        x = x.reshape(b, grid[0] * grid[1], c)
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, c)).astype(x.dtype), x], axis=1)
        x = x + cast(interpolate_pos_embed(pos_embed, grid, self.interpolation, hp == wp), x.dtype)
        if self.num_registers:
            reg = self.param("register_tokens", nn.initializers.zeros, (1, self.num_registers, c))
            x = jnp.concatenate(
                [x[:, :1], jnp.broadcast_to(reg, (b, self.num_registers, c)).astype(x.dtype), x[:, 1:]], 1
            )
        hidden = [x]
        for i in range(self.depth):
            blk = Block(
                self.num_heads,
                self.mlp_ratio,
                self.ffn,
                self.layerscale,
                self.ln_eps,
                self.dtype,
                self.attention,
                self.remat_mode,
                name=f"blocks_{i}",
            )
            x = fusion_barrier(blk(x, adapters.get(i)))
            hidden.append(x)
        out = layer_norm(self.ln_eps, self.dtype, "norm")(x)
        return {"hidden_states": tuple(hidden), "last_hidden_state": out, "grid": grid}
