"""Helpers shared by the unit tests (the PyTorch-side ones, references and the one output comparison, are in
torch_ref/backbones.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

TESTS = os.path.dirname(os.path.abspath(__file__))  # the shared test helpers (conftest puts them on sys.path)
ROOT = os.path.dirname(TESTS)  # the repository


def normal(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """Standard normal float32 of ``shape`` from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def python_path() -> str:
    """``PYTHONPATH`` for a subprocess: this checkout and the shared test helpers first, then the caller's."""
    return os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])

