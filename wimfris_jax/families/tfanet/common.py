"""A small helper shared by the TFANet modules: the word validity mask."""

from __future__ import annotations

import jax.numpy as jnp


def valid_words(pad_mask: jnp.ndarray | None, batch: int, length: int) -> jnp.ndarray:
    """(B, L) float32, 1 for a real word, 0 for padding. ``pad_mask`` follows the repository (True = padding,
    ``ids == 0`` in :mod:`wimfris_jax.model`); None means no padding."""
    if pad_mask is None:
        return jnp.ones((batch, length), jnp.float32)
    if pad_mask.shape != (batch, length):
        raise ValueError(f"pad_mask must be (B, L) = {(batch, length)}, got {pad_mask.shape}")
    return 1.0 - pad_mask.astype(jnp.float32)
