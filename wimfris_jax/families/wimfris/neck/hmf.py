"""Hierarchical Mamba Fusion (HMF) neck, WIMFRIS Section 2.3 and Fig. 3a, and the neck ablations (Table 1).

Feature aggregation: three DINOv2 maps f_v^1..3 (B, h, w, Cv) -- two intermediate blocks' outputs (pre-norm)
and the last block's output after the final norm, prefix tokens dropped (DETRIS's taps: blocks 4 and 8 for
B, 8 and 16 for L, 0-based; see ``neck_taps`` in configs/) -- are concatenated along channels and projected by
a 1x1 convolution to f_v^c (B, h, w, C), C = 512. Decision: the 1x1 convolution is DETRIS's ``conv_layer``
(conv without bias + BatchNorm + ReLU), the building block of the DETRIS neck WIMFRIS replaces: the
pre-norm intermediate maps and the post-norm last map have very different scales, and the BatchNorm
equalises them per output channel. Then the Window Mamba Fuser (:mod:`wimfris_jax.families.wimfris.neck.wmf`).

Every neck maps ``(maps: 3 x (B, h, w, Cv), state: (B, C), train) -> (out (B, h, w, C), window_logits)``,
window_logits (B, n_win) or None:
- "hmf": aggregation + WMF (window_logits unless the window is the whole map, where eq. (9)'s target is
  trivially "present"),
- "aggregate": aggregation only (HMF without WMF),
- "none": no neck (Table 1 "X"): the last map alone through conv 1x1 + BN + ReLU to C (a width change the
  decoder needs),
- "detris": the DETRIS neck (Table 1; the neck of DETRIS itself),
:class:`wimfris_jax.families.wimfris.neck.detris.DetrisNeck`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.families.wimfris.neck.detris import DetrisNeck
from wimfris_jax.families.wimfris.neck.wmf import WindowMambaFuser
from wimfris_jax.layers import ConvBNReLU

NECKS = ("hmf", "aggregate", "none", "detris")


class HMF(nn.Module):
    """Hierarchical Mamba Fusion: aggregation (concat + 1x1 conv/BN/ReLU) then the Window Mamba Fuser.

    Attributes:
      dim: output width C (512 = the decoder's width; must equal the sentence feature's width).
      use_wmf: False gives the "aggregate" ablation.
      wmf: keyword arguments of :class:`WindowMambaFuser` (window, gate_heads, d_state, ...); the model passes
        the window resolved once (:func:`wimfris_jax.model.model_window`).
      align: return the WMF's window logits (False: one window over the map, no alignment target, Table 3a).
      dtype: computation dtype.
    """

    dim: int = 512
    use_wmf: bool = True
    wmf: Any = None
    align: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(
        self, maps: Sequence[jnp.ndarray], state: jnp.ndarray, *, train: bool
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """maps: 3 x (B, h, w, Cv); state: (B, C) -> (B, h, w, C), window_logits (B, n_win) or None."""
        shapes = {m.shape[:3] for m in maps}
        if len(shapes) != 1:
            raise ValueError(f"HMF: feature maps differ in (B, h, w): {[m.shape for m in maps]}")
        x = ConvBNReLU(self.dim, dtype=self.dtype, name="aggregate")(jnp.concatenate(maps, axis=-1), train=train)
        if not self.use_wmf:
            return x, None
        out, logits = WindowMambaFuser(dtype=self.dtype, name="wmf", **dict(self.wmf or {}))(x, state)
        return out, (logits if self.align else None)


class NoNeck(nn.Module):
    """Table 1's "no neck": the last (post-norm) map through 1x1 conv + BN + ReLU to ``dim``."""

    dim: int = 512
    dtype: Any = None

    @nn.compact
    def __call__(self, maps: Sequence[jnp.ndarray], state: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, None]:
        return ConvBNReLU(self.dim, dtype=self.dtype, name="proj")(maps[-1], train=train), None


def build_neck(
    kind: str, *, dim: int, wmf: Any = None, align: bool = True, dtype: Any = None, **kwargs: Any
) -> nn.Module:
    """The neck module for ``kind`` in :data:`NECKS` (unbound; the model names it "neck"); ``wmf`` and ``align``
    are the HMF's (see :class:`HMF`)."""
    if kind == "hmf":
        return HMF(dim=dim, use_wmf=True, wmf=wmf, align=align, dtype=dtype)
    if kind == "aggregate":
        return HMF(dim=dim, use_wmf=False, dtype=dtype)
    if kind == "none":
        return NoNeck(dim=dim, dtype=dtype)
    if kind == "detris":
        return DetrisNeck(dim=dim, dtype=dtype, **kwargs)
    raise ValueError(f"unknown neck {kind!r}; choose one of {NECKS}")
