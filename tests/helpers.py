"""Helpers shared by the unit tests (the PyTorch-side ones, references and the one output comparison, are in
tests/torch_ref/backbones.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normal(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """Standard normal float32 of ``shape`` from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
