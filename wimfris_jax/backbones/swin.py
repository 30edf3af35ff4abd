"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows").

Source semantics: transformers' ``SwinModel`` (``models/swin/modeling_swin.py``, v5.24), which computes what the
official ``microsoft/Swin-Transformer`` ``models/swin_transformer.py`` does, plus padding for any input size;
channels last::

    embed:      zero-pad H, W (bottom/right) to multiples of p -> conv p x p / p -> LN          (B, H/p, W/p, C0)
    block j:    x = x + attn(norm1(x));  x = x + mlp(norm2(x))       mlp: fc1 -> exact GELU -> fc2 (ratio 4)
      attn:     window w = W, shift s = W // 2 on odd j; if min(h, w) <= W: s = 0 and w = min(h, w).
                zero-pad (after norm1) to multiples of w, roll by (-s, -s), split into w x w windows; per
                window and head softmax(q k^T / sqrt(d) + B + M) v, then proj; windows back, roll by (s, s), crop.
                B: relative position bias, table ((2W-1)^2, heads) at (dy + W - 1) (2W - 1) + (dx + W - 1).
                M: -100 between tokens of different shift regions (the regions [0, P - w), [P - w, P - s),
                [P - s, P) of each padded side P; padding is not masked), only when s > 0.
    stage i:    depths[i] blocks at width C_i = C0 2^i on (B, h_i, w_i, C_i)
    downsample: zero-pad odd h, w by one; concat [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]]
                -> LN(4 C_i) -> Linear(4 C_i -> 2 C_i, no bias)                  (B, ceil(h/2), ceil(w/2), 2 C_i)
    output:     the stage outputs before merging; last_hidden_state = LN(last stage) ("layernorm")

A window smaller than W (min(h, w) < W) uses the central (2w-1)^2 entries of the table, which are the offsets
such a window has; transformers 5.24 raises there instead (its bias is always sized for W). Drop path
(stochastic depth, rates 0..``drop_path_rate`` linear over all blocks, per sample, ``"dropout"`` rng, only when
``train``) is on both residual branches as in the official code (transformers drops the attention branch only).
Every LayerNorm uses ``ln_eps`` (transformers: the embedding and merging norms 1e-5, the others
``layer_norm_eps``, 1e-5 by default). Absolute position embeddings (``ape``) are not implemented.

Parameter names (``port_weights/swin.py`` maps transformers' and the official names onto them):
``patch_embed/{conv,norm}``, ``layers_{i}/blocks_{j}/{norm1, attn/{q,k,v,proj,relative_position_bias_table},
norm2, mlp/{fc1,fc2}}``, ``layers_{i}/downsample/{norm,reduction}``, ``layernorm``.

A parent model calls the stages one at a time, as for :class:`~wimfris_jax.backbones.VMamba`::

    x = swin.embed(images)
    for i in range(4):
        x = swin.blocks(i, x)            # tap / fuse here
        if i < 3:
            x = swin.downsample(i, x)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wimfris_jax.attention import dot_product_attention
from wimfris_jax.layers import Mlp, gelu_exact, keep_mask, layer_norm, remat, vit_trunc_normal

Array = jax.Array

_PRESETS = {  # embed dim, depths, heads, window (official configs swin_{tiny,small}_patch4_window7_224, ..._384)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),  # swin_base_patch4_window12_384
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),  # swin_large_patch4_window12_384
}


def swin_config(name: str, window_size: int | None = None) -> dict[str, Any]:
    """:class:`Swin` fields of a Swin-T/S/B/L preset (patch 4, MLP ratio 4); ``name`` may end in ``_w{N}``
    (e.g. "base_w7") or ``window_size`` be given to override the preset's window."""
    base, _, suffix = name.partition("_w")
    if base not in _PRESETS or (suffix and not suffix.isdigit()):
        raise ValueError(f"unknown Swin preset {name!r}; choose from {sorted(_PRESETS)}, optionally with '_w<N>'")
    dim, depths, heads, window = _PRESETS[base]
    window = int(window_size or suffix or window)
    return dict(embed_dim=dim, depths=depths, num_heads=heads, window_size=window, patch_size=4, mlp_ratio=4.0,
                ln_eps=1e-5)  # fmt: skip


def relative_position_index(window: int, table_window: int) -> np.ndarray:
    """(w*w, w*w) int index into a ((2W-1)^2, heads) bias table for a w x w window (w <= W): the row of the
    offset (dy, dx) between two tokens (row-major in the window) is (dy + W - 1) (2W - 1) + (dx + W - 1)."""
    yy, xx = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([yy.ravel(), xx.ravel()])  # (2, T)
    rel = coords[:, :, None] - coords[:, None, :] + table_window - 1  # (2, T, T)
    return rel[0] * (2 * table_window - 1) + rel[1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w, w*w) float32 mask of the shifted windows of a padded (height, width) map: -100 between tokens of
    different shift regions, 0 elsewhere (windows in row-major order)."""

    def regions(n: int) -> np.ndarray:
        i = np.arange(n)
        return (i >= n - window).astype(np.int64) + (i >= n - shift)

    ids = regions(height)[:, None] * 3 + regions(width)[None, :]
    ids = ids.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    ids = ids.reshape(-1, window * window)
    return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


def window_and_shift(h: int, w: int, window_size: int, shifted: bool) -> tuple[int, int]:
    """transformers' rule: (window, shift) for a (h, w) map; no shift and window min(h, w) when min(h, w) <= W."""
    if min(h, w) <= window_size:
        return min(h, w), 0
    return window_size, window_size // 2 if shifted else 0


def drop_path(x: Array, rate: float, rng: Array | None) -> Array:
    """Stochastic depth: zero each sample's ``x`` (B, ...) with probability ``rate`` (drawn from ``rng``), scale the
    rest by 1 / (1 - rate); identity when ``rng`` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = keep_mask(rng, rate, (x.shape[0], 1)).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class WindowAttention(nn.Module):
    """Windowed multi-head self-attention with relative position bias on a padded, rolled map
    (B, P, Q, C) -> (B, P, Q, C), P and Q multiples of ``window``; ``shift`` > 0 adds the shift mask."""

    num_heads: int
    window_size: int  # W: the bias table has (2W - 1)^2 rows
    window: int  # the window actually used (<= W)
    shift: int = 0
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, p, q, c = x.shape
        w, h = self.window, self.num_heads
        table = self.param("relative_position_bias_table", vit_trunc_normal, ((2 * self.window_size - 1) ** 2, h))
        win = x.reshape(b, p // w, w, q // w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
        n, t = win.shape[1], w * w
        qh, kh, vh = (dense(name)(win).reshape(b * n, t, h, c // h) for name in ("q", "k", "v"))  # windows as batch
        bias = table[relative_position_index(w, self.window_size)].transpose(2, 0, 1)[None]  # (1, heads, T, T)
        if self.shift > 0:  # + the shift mask of each window, (nW, 1, T, T), tiled over the batch
            bias = jnp.tile(bias + shift_mask(p, q, w, self.shift)[:, None], (b, 1, 1, 1))
        y = dot_product_attention(qh, kh, vh, bias=bias, implementation=self.attention)  # (B nW, T, heads, d)
        y = y.reshape(b, p // w, q // w, w, w, c)
        y = nn.Dense(c, dtype=self.dtype, name="proj")(y)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, p, q, c)


class SwinBlock(nn.Module):
    """One Swin block, (B, h, w, C) -> (B, h, w, C); ``shifted``: the shifted-window (odd) block of a pair."""

    num_heads: int
    window_size: int
    shifted: bool = False
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    drop_path: float = 0.0
    dtype: Any = None
    remat_mode: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _, h, w, c = x.shape
        win, shift = window_and_shift(h, w, self.window_size, self.shifted)
        y = layer_norm(self.ln_eps, self.dtype, "norm1")(x)
        y = jnp.pad(y, ((0, 0), (0, -h % win), (0, -w % win), (0, 0)))
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        attn = remat(WindowAttention, self.remat_mode)
        y = attn(self.num_heads, self.window_size, win, shift, self.dtype, self.attention, name="attn")(y)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        rng = (lambda: self.make_rng("dropout")) if train and self.drop_path > 0 else (lambda: None)
        x = x + drop_path(y[:, :h, :w], self.drop_path, rng())
        mlp = remat(Mlp, self.remat_mode)(int(c * self.mlp_ratio), gelu_exact, self.dtype, name="mlp")
        return x + drop_path(mlp(layer_norm(self.ln_eps, self.dtype, "norm2")(x)), self.drop_path, rng())


class PatchEmbed(nn.Module):
    """(B, H, W, 3) -> zero-pad to multiples of p -> conv p x p / p -> LN: (B, ceil(H/p), ceil(W/p), dim)."""

    dim: int
    patch_size: int = 4
    ln_eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % p), (0, -x.shape[2] % p), (0, 0)))
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="conv")(x)
        return layer_norm(self.ln_eps, self.dtype, "norm")(x)


class PatchMerging(nn.Module):
    """(B, h, w, C) -> (B, ceil(h/2), ceil(w/2), 2C): 2 x 2 neighbours concatenated, LN, Linear without bias."""

    ln_eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = jnp.concatenate([x[:, r::2, s::2] for s in range(2) for r in range(2)], axis=-1)
        x = layer_norm(self.ln_eps, self.dtype, "norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class Stage(nn.Module):
    """Stage i: ``len(drop_paths)`` Swin blocks (``blocks_{j}``, odd ones shifted) and, unless it is the last stage,
    the ``downsample`` (patch merging) after them."""

    num_heads: int
    window_size: int
    drop_paths: Sequence[float]
    merge: bool
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    dtype: Any = None
    remat_mode: str = "none"
    attention: str = "auto"

    def setup(self):
        self.blocks = [
            SwinBlock(self.num_heads, self.window_size, j % 2 == 1, self.mlp_ratio, self.ln_eps, rate, self.dtype,
                      self.remat_mode, self.attention)
            for j, rate in enumerate(self.drop_paths)
        ]  # fmt: skip
        if self.merge:
            self.downsample = PatchMerging(self.ln_eps, self.dtype)

    def run_blocks(self, x: Array, train: bool = False) -> Array:
        for blk in self.blocks:
            x = blk(x, train)
        return x

    def run_downsample(self, x: Array) -> Array:
        if not self.merge:
            raise ValueError("the last stage has no downsample")
        return self.downsample(x)


class Swin(nn.Module):
    """Swin Transformer backbone; see the module docstring for the computation and :func:`swin_config` for presets.

    Methods (all channels last; a parent model may call them one by one):
      ``embed(images (B, H, W, 3)) -> (B, ceil(H/p), ceil(W/p), C0)``;
      ``blocks(i, x, train) -> x``: stage i's Swin blocks (same shape, C_i = C0 2^i);
      ``downsample(i, x) -> (B, ceil(h/2), ceil(w/2), 2 C_i)``, i < len(depths) - 1;
      ``__call__(images, train) -> {"hidden_states": the patch embedding, then each stage's blocks output before
      merging (B, h_i, w_i, C_i), "last_hidden_state": layernorm of the last stage (B, h, w, C_last)}``.

    Attributes:
      embed_dim, depths, num_heads: C0, blocks per stage, heads per stage.
      window_size: W (the bias tables are (2W-1)^2 x heads); patch_size: p.
      mlp_ratio: MLP hidden = int(C_i * mlp_ratio); ln_eps: every LayerNorm's epsilon.
      drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks; used when ``train``).
      dtype: computation dtype (None: float32); parameters stay float32, the softmax runs in float32.
      remat_mode: rematerialisation of each block's attention and MLP, "none" | "block" | "dots"
        (:func:`wimfris_jax.layers.remat`).
      attention: the windows' softmax attention, relative-position bias and shift mask as its bias
        (:func:`wimfris_jax.attention.dot_product_attention`: "auto" | "xla" | "cudnn" | "chunked").
    """

    embed_dim: int = 128
    depths: Sequence[int] = (2, 2, 18, 2)
    num_heads: Sequence[int] = (4, 8, 16, 32)
    window_size: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    drop_path_rate: float = 0.0
    dtype: Any = None
    remat_mode: str = "none"
    attention: str = "auto"

    def setup(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"Swin: {len(self.depths)} depths but {len(self.num_heads)} num_heads")
        n, total = len(self.depths), sum(self.depths)
        rates = [self.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.ln_eps, self.dtype)
        self.layers = [
            Stage(heads, self.window_size, tuple(rates[sum(self.depths[:i]) : sum(self.depths[: i + 1])]), i < n - 1,
                  self.mlp_ratio, self.ln_eps, self.dtype, self.remat_mode, self.attention)
            for i, heads in enumerate(self.num_heads)
        ]  # fmt: skip
        self.layernorm = layer_norm(self.ln_eps, self.dtype)

    def embed(self, images: Array) -> Array:
        """images (B, H, W, 3) normalised -> (B, ceil(H/p), ceil(W/p), embed_dim)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Swin expects images (B, H, W, 3), got {images.shape}")
        return self.patch_embed(images)

    def blocks(self, i: int, x: Array, train: bool = False) -> Array:
        """Stage ``i``'s Swin blocks: (B, h, w, C_i) -> same shape."""
        self._check(i, x, len(self.depths))
        return self.layers[i].run_blocks(x, train)

    def downsample(self, i: int, x: Array) -> Array:
        """Stage ``i``'s patch merging (i < last): (B, h, w, C_i) -> (B, ceil(h/2), ceil(w/2), 2 C_i)."""
        self._check(i, x, len(self.depths) - 1)
        return self.layers[i].run_downsample(x)

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """images (B, H, W, 3) -> {"hidden_states": the patch embedding then each stage's output before merging
        (1 + stages arrays (B, h_i, w_i, C_i)), "last_hidden_state": the final LayerNorm of the last stage's output}
        (the backbones' one output convention, :mod:`wimfris_jax.backbones`)."""
        x = self.embed(images)
        hidden = [x]
        for i in range(len(self.depths)):
            x = self.blocks(i, x, train)
            hidden.append(x)
            if i < len(self.depths) - 1:
                x = self.downsample(i, x)
        return {"hidden_states": tuple(hidden), "last_hidden_state": self.layernorm(x)}

    def _check(self, i: int, x: Array, n: int) -> None:
        if not 0 <= i < n:
            raise ValueError(f"Swin: stage index {i} out of range 0..{n - 1}")
        c = self.embed_dim * 2**i
        if x.ndim != 4 or x.shape[-1] != c:
            raise ValueError(f"Swin stage {i} expects (B, h, w, {c}), got {x.shape}")
