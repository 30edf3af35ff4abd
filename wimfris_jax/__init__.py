"""WIMFRIS (and DETRIS, as a configuration of the same parts), TFANet and VIPA in JAX/Flax.

``model, variables = wimfris_jax.load_model(config_path, checkpoint)`` builds a config's model and loads a
converted or trained checkpoint into it (:mod:`wimfris_jax.load`). The export is resolved on first access, so
importing a core module (``wimfris_jax.errors``, ``wimfris_jax.io``) loads nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        return importlib.import_module("wimfris_jax.load").load_model
    raise AttributeError(f"module 'wimfris_jax' has no attribute {name!r}")
