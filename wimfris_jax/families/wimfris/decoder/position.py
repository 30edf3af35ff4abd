"""Fixed sine/cosine position encodings of the DETRIS task decoder (docs/detris_code.md "Decoder";
DETRIS ``model/layers.py`` ``Decoder.pos1d`` / ``Decoder.pos2d``; the 1-D form is Vaswani et al. 2017, eq. in §3.5).

Both are constants of the shapes, built in numpy (float64, cast to float32 like PyTorch's float32 tables).
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _inv_freq(dim: int) -> np.ndarray:
    """``exp(-(2i) * ln(10000) / dim)`` for i = 0 .. dim/2 - 1, computed in float32 as PyTorch does."""
    return np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))


@functools.lru_cache(maxsize=32)
def pos1d(length: int, dim: int) -> np.ndarray:
    """Word-position table (L, C): channel 2i = sin(l * f_i), channel 2i+1 = cos(l * f_i), f_i = 10000^(-2i/C).

    Raises:
      ValueError: when ``dim`` is odd.
    """
    if dim % 2:
        raise ValueError(f"pos1d needs an even channel count, got {dim}")
    angle = np.arange(length, dtype=np.float32)[:, None] * _inv_freq(dim)[None, :]  # (L, C/2)
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    pe.setflags(write=False)
    return pe


@functools.lru_cache(maxsize=32)
def pos2d(height: int, width: int, dim: int) -> np.ndarray:
    """Pixel-position table (H, W, C), channels-last.

    Channels [0, C/2) encode the column x and [C/2, C) the row y, each half as interleaved sin/cos with
    frequencies 10000^(-2i/(C/2)): pe[y, x, 2i] = sin(x f_i), pe[y, x, 2i+1] = cos(x f_i),
    pe[y, x, C/2 + 2i] = sin(y f_i), pe[y, x, C/2 + 2i + 1] = cos(y f_i).

    Raises:
      ValueError: when ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"pos2d needs a channel count divisible by 4, got {dim}")
    half = dim // 2
    f = _inv_freq(half)
    ax = np.arange(width, dtype=np.float32)[:, None] * f[None, :]  # (W, C/4)
    ay = np.arange(height, dtype=np.float32)[:, None] * f[None, :]  # (H, C/4)
    pe = np.zeros((height, width, dim), np.float32)
    pe[:, :, 0:half:2] = np.sin(ax)[None, :, :]
    pe[:, :, 1:half:2] = np.cos(ax)[None, :, :]
    pe[:, :, half::2] = np.sin(ay)[:, None, :]
    pe[:, :, half + 1 :: 2] = np.cos(ay)[:, None, :]
    pe.setflags(write=False)
    return pe
