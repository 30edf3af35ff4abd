"""The registry of model families: ``config.model.family`` ("wimfris", the default: WIMFRIS and DETRIS; "tfanet";
"vipa") picks a :class:`~wimfris_jax.families.Family` row, and everything that builds, trains, scores or summarises a
model reads that row here, with no per-family branch elsewhere.

    build_model(config.model, dtype, remat_mode) -> flax module      (the family's builder)
    loss_fn(config.model, outputs, mask) -> (loss, aux)               (the family's objective)
    training_model(config) -> (model with config.train.remat, loss bound to config.model): the one training wiring
    trainable_patterns(config) -> config.train.trainable + "!" exclusions of the family's untrainable parameters
    family(config.model) -> its Family row;  register_family(row) adds one (a new family: one package, one row)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.errors import ConfigError
from wimfris_jax.families import Family
from wimfris_jax.families.tfanet import FAMILY as TFANET
from wimfris_jax.families.vipa import FAMILY as VIPA
from wimfris_jax.families.wimfris import FAMILY as WIMFRIS
from wimfris_jax.layers import check_remat
from wimfris_jax.paths import DEFAULT_TRAINABLE

FAMILIES: dict[str, Family] = {f.name: f for f in (WIMFRIS, TFANET, VIPA)}


def register_family(row: Family) -> None:
    """Adds a family (or replaces the one of that name): ``config.model.family = row.name`` then builds, trains,
    evaluates and summarises it through the same commands."""
    FAMILIES[row.name] = row


def family(model_config: Any) -> Family:
    """The row of ``config.model.family`` (default "wimfris"); a one-line ConfigError for an unknown name."""
    name = (model_config or {}).get("family", "wimfris")
    if name not in FAMILIES:
        raise ConfigError(f"config.model.family={name!r}: choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_model(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> nn.Module:
    """The model of ``config.model``: its family's builder (``remat_mode`` checked first)."""
    return family(model_config).build(model_config, dtype=dtype, remat_mode=check_remat(remat_mode))


def loss_fn(model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """The training loss of ``config.model``'s family: (scalar, aux scalars); mask (B, Hm, Wm) at the logit size."""
    return family(model_config).loss(model_config, outputs, mask)


def training_model(config: Any, remat_mode: str | None = None) -> tuple[nn.Module, Callable[..., tuple]]:
    """The one training wiring of a config: the model ``config.model`` builds with ``config.train.remat`` (or
    ``remat_mode``) and its family's loss bound to it, ``(outputs, mask) -> (loss, aux)``. ``wimfris train``, the demo,
    :func:`wimfris_jax.train.loop.train` and the benchmarks take both from here."""
    remat = remat_mode if remat_mode is not None else config.train.get("remat", "auto")
    return build_model(config.model, remat_mode=remat), functools.partial(loss_fn, config.model)


def trainable_patterns(config: Any) -> tuple[str, ...]:
    """``config.train.trainable`` and, as ``"!regex"`` exclusions, the family's untrainable parameters (never trained:
    their gradient is zero or rounding noise, which Adam turns into steps of random sign; docs/ARCHITECTURE.md
    "Untrainable parameters"): the patterns every trainer passes to :func:`wimfris_jax.paths.split`."""
    row = family(config.get("model") or {})  # tests train toy models with no config.model
    return tuple(config.train.get("trainable", DEFAULT_TRAINABLE)) + tuple(f"!{p}" for p in row.untrainable)
