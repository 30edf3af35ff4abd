"""Window Mamba Fuser (WMF), WIMFRIS eq. (4) and Fig. 3b, with the window alignment logits of eq. (9).

The fused visual map f (B, h, w, C) is cut into n_win = (h / wh) * (w / ww) non-overlapping windows of
M = wh * ww pixels, windows ordered row-major, j = (r // wh) * (w // ww) + (c // ww), pixels row-major inside a
window (the order of :func:`wimfris_jax.families.wimfris.losses.window_targets`). ``window=None`` is one window over
the whole
map (Table 3a's "no partition" row). With s (B, C) the text class token (the sentence feature):

    x_j = [s, f_win[j], s]                           (B * n_win, M + 2, C)   all windows batched
    Y   = Mamba(LayerNorm(x_j))                      one Mamba, applied to every window in parallel
    y_i = Y[:, 1 + i]   (pixel i of window j),   c_j = Y[:, M + 1]   (the updated class token of window j)
    g_i = sigmoid(<q(c_j), k(y_i)>_head / sqrt(C / heads))           per head, broadcast over its channels
    out_i = f_i + g_i * y_i                          windows reassembled to (B, h, w, C)
    l_j = <cls_proj(c_j), s> / sqrt(C)               window alignment logits (B, n_win), eq. (9)

Gap (a), the causal scan. The paper prepends the class token and reads "the updated class token" per window,
but a causal scan's output at position 0 has seen nothing but the token itself. Reading: the class token is
prepended (so the scan state that every pixel of the window reads is conditioned on the text, as the paper
wants) AND a copy is appended; the appended copy's output, which has scanned the text and all M pixels, is the
window's updated class token c_j (sequence length M + 2). The output at position 0 is dropped. This keeps ONE
unidirectional Mamba (a bidirectional scan would double it) and makes c_j a function of its own window only,
which is what the per-window alignment loss needs (tested: changing a window's pixels changes that window's
outputs and c_j and nothing else).

Gap (b), "reassembles the fused outputs through attentional gating". Design: a multi-head sigmoid gate scores
each fused pixel y_i against its window's class token c_j (scaled dot product of learned projections q, k,
as attention logits, but squashed by a sigmoid instead of a softmax over pixels, so each pixel is kept or
suppressed independently of the others); the gated pixel is added back to the aggregated feature f_i. The
residual and the pre-norm are the standard way a Mamba block is stacked (Mamba, Vim), and keep the neck
close to its input at initialisation. The alignment loss trains c_j to say whether window j holds the
referred object, and the gate lets that decision modulate the window's pixels.

l_j: eq. (9) writes l_j = <c_j, s>; c_j is first passed through a learned linear map (eq. 9: "project each of
the class token outputs ... against the global textual prior") and the product is scaled by 1/sqrt(C) so
the logits start O(1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.layers import remat
from wimfris_jax.ssm.mamba import Mamba


def window_partition(x: jnp.ndarray, window: tuple[int, int]) -> jnp.ndarray:
    """(B, h, w, C) -> (B, n_win, wh * ww, C), windows and pixels row-major."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"window {window} does not tile the feature grid ({h}, {w})")
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x: jnp.ndarray, grid: tuple[int, int], window: tuple[int, int]) -> jnp.ndarray:
    """Inverse of :func:`window_partition`: (B, n_win, wh * ww, C) -> (B, h, w, C)."""
    b, _, _, c = x.shape
    (h, w), (wh, ww) = grid, window
    x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def normalize_window(window: Any) -> int | tuple[int, int] | None:
    """A config's window value: k (int) or (wh, ww); None, 0 or "none" mean one window over the whole map."""
    if (
        window is None
        or (isinstance(window, str) and window.lower() == "none")
        or (isinstance(window, int) and window == 0)
    ):
        return None
    if isinstance(window, int):
        if window < 0:
            raise ValueError(f"window size must be positive, got {window}")
        return window
    if isinstance(window, (tuple, list)) and len(window) == 2:
        return (int(window[0]), int(window[1]))
    raise ValueError(f"window must be an int, a (wh, ww) pair, None/0 or 'none'; got {window!r}")


def resolve_window(window: Any, grid: tuple[int, int]) -> tuple[int, int]:
    """Window size (wh, ww) for a config value: int k -> (k, k), None / 0 / "none" -> the whole grid."""
    window = normalize_window(window)
    if window is None:
        return tuple(grid)
    if isinstance(window, int):
        return (window, window)
    return window


class WindowMambaFuser(nn.Module):
    """WMF: (B, h, w, C) visual map + (B, C) text class token -> fused map and window logits.

    Attributes:
      window: window side (4: 4x4, the paper's best), a (wh, ww) pair, or None / 0 / "none" for one window
        over the whole map.
      gate_heads: heads of the attentional gate (C must be divisible by it).
      d_state, d_conv, expand, scan_impl: Mamba sizes and scan implementation.
      dtype: computation dtype (None: float32).
      remat_mode: rematerialisation of the Mamba (:func:`wimfris_jax.layers.remat`).
    """

    window: int | tuple[int, int] | None = 4
    gate_heads: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_impl: str | None = None
    dtype: Any = None
    remat_mode: str = "none"

    @nn.compact
    def __call__(self, f: jnp.ndarray, cls: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Fuses the map with the text class token window by window.

        Args:
          f: (B, h, w, C) aggregated visual features f_v^c.
          cls: (B, C) text class token (the sentence feature f_s).

        Returns:
          (out (B, h, w, C), window_logits (B, n_win)).
        """
        b, h, w, c = f.shape
        if cls.shape != (b, c):
            raise ValueError(f"WindowMambaFuser: class token {cls.shape} does not fit the map {f.shape}; want {(b, c)}")
        if c % self.gate_heads:
            raise ValueError(f"WindowMambaFuser: width {c} is not divisible by gate_heads {self.gate_heads}")
        window = resolve_window(self.window, (h, w))
        f = jnp.asarray(f, self.dtype)
        cls = jnp.asarray(cls, f.dtype)
        win = window_partition(f, window)  # (B, n, M, C)
        n, m = win.shape[1:3]
        tok = jnp.broadcast_to(cls[:, None, None, :], (b, n, 1, c))
        seq = jnp.concatenate([tok, win, tok], axis=2).reshape(b * n, m + 2, c)

        seq = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(seq)
        y = remat(Mamba, self.remat_mode)(
            d_model=c,
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            scan_impl=self.scan_impl,
            dtype=self.dtype,
            name="mamba",
        )(seq)
        y = jnp.asarray(y, f.dtype).reshape(b, n, m + 2, c)
        pix, c_out = y[:, :, 1 : m + 1], y[:, :, m + 1]  # (B, n, M, C), (B, n, C)

        hd = c // self.gate_heads
        q = nn.Dense(c, dtype=self.dtype, name="gate_q")(c_out).reshape(b, n, 1, self.gate_heads, hd)
        k = nn.Dense(c, dtype=self.dtype, name="gate_k")(pix).reshape(b, n, m, self.gate_heads, hd)
        gate = nn.sigmoid(jnp.sum(q * k, axis=-1) / jnp.sqrt(hd).astype(q.dtype))  # (B, n, M, heads)
        gated = (pix.reshape(b, n, m, self.gate_heads, hd) * gate[..., None]).reshape(b, n, m, c)
        out = f + window_reverse(gated, (h, w), window)

        proj = nn.Dense(c, dtype=self.dtype, name="cls_proj")(c_out)  # (B, n, C)
        logits = jnp.einsum("bnc,bc->bn", proj, cls) / jnp.sqrt(c).astype(proj.dtype)
        return out, logits
