"""WIMFRIS (and DETRIS, as a configuration of the same parts) in JAX/Flax.

``model, variables = wimfris_jax.load_model(config_path, checkpoint)`` builds a config's model and loads a
converted or trained checkpoint into it (:mod:`wimfris_jax.load`).
"""

from wimfris_jax.load import load_model

__all__ = ["load_model"]
