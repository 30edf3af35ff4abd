"""Optimiser and learning-rate schedule of every family's recipe: DETRIS / WIMFRIS's, and the peers' variants below.

DETRIS (config/*.yaml, train.py; docs/detris_code.md "Loss and training") and WIMFRIS Sec. 4.1: Adam
(b1 0.9, b2 0.999, eps 1e-8), no weight decay, no gradient clipping, base lr 1e-4 (B) / 2e-4 (L),
multiplied by 0.1 at each milestone epoch (PyTorch ``MultiStepLR`` stepped once per epoch). Here the
schedule is per update: the update with optimiser count ``c`` (0-based) uses
``lr * lr_decay ** #{m : c >= m * steps_per_epoch}``.

The peers' recipes add: AdamW with decoupled weight decay (TFANet, VIPA), a polynomial decay per update (VIPA, as
CrossVLT), weight decay spared on some parameters (``no_decay``) and per-group learning rates (``lr_scale``), the
last two selected by path regexes as the trainable set is (:mod:`wimfris_jax.paths`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from wimfris_jax.config_fields import choice
from wimfris_jax.paths import check_patterns, key_path, path_selected, tree_paths

LR_SCHEDULES = ("step", "poly")  # config.train.lr_schedule


def lr_schedule(lr: float, milestones: Sequence[int], decay: float, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant lr: ``lr`` times ``decay`` at each milestone epoch."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    boundaries: dict[int, float] = {}
    for m in milestones:
        step = int(m) * steps_per_epoch
        boundaries[step] = boundaries.get(step, 1.0) * decay
    return optax.piecewise_constant_schedule(init_value=lr, boundaries_and_scales=boundaries)


def poly_schedule(lr: float, total_steps: int, power: float = 0.9) -> optax.Schedule:
    """``lr * (1 - c / total_steps) ** power`` for update ``c`` (CrossVLT's / VIPA's per-iteration LambdaLR)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return optax.polynomial_schedule(init_value=lr, end_value=0.0, power=power, transition_steps=total_steps)


def make_optimizer(train_config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from ``config.train`` (lr, ``lr_schedule`` "step" (lr_milestones, lr_decay) or "poly"
    (lr_power over ``epochs``), weight_decay). Adam (PyTorch's defaults), or AdamW with decoupled ``weight_decay``
    when it is > 0 (TFANet, VIPA), sparing the parameters whose paths match a ``no_decay`` regex; ``lr_scale``:
    ``(regex, factor)`` pairs scaling the rate of the matching parameters (:func:`scale_by_path`). Applied to
    trainable params only."""
    kind = choice(train_config, "lr_schedule", "step", LR_SCHEDULES, section="train")
    if kind == "poly":
        total = int(train_config.epochs) * steps_per_epoch
        schedule = poly_schedule(float(train_config.lr), total, float(train_config.get("lr_power", 0.9)))
    else:
        schedule = lr_schedule(
            float(train_config.lr),
            tuple(train_config.get("lr_milestones", ())),
            float(train_config.get("lr_decay", 0.1)),
            steps_per_epoch,
        )
    weight_decay = float(train_config.get("weight_decay", 0.0))
    no_decay = tuple(train_config.get("no_decay", ()))
    if weight_decay > 0:
        mask = path_mask(no_decay, "train.no_decay", negate=True) if no_decay else None
        tx = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask)
    else:
        tx = optax.adam(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8)
    lr_scale = tuple((str(p), float(f)) for p, f in train_config.get("lr_scale", ()))
    if lr_scale:
        tx = optax.chain(tx, scale_by_path(lr_scale))
    return tx, schedule


def path_mask(patterns: Sequence[str], what: str, negate: bool = False) -> Callable[[Any], Any]:
    """``params -> tree of bools``: True where a parameter's path ('a/b/kernel') matches one of the regexes
    (``negate``: where none does), e.g. optax's weight-decay mask. A pattern matching nothing is a ConfigError."""

    def mask(params: Any) -> Any:
        check_patterns(patterns, tree_paths(params), what, "trainable parameter")
        return jax.tree_util.tree_map_with_path(lambda k, _: path_selected(key_path(k), patterns) != negate, params)

    return mask


def scale_by_path(factors: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each update by the factor of the first ``(regex, factor)`` its path matches (else 1): per-group
    learning rates (PyTorch param groups), e.g. ``(("^(text|image)_encoder/", 0.5),)`` for backbones at half
    the rate. With AdamW the decoupled decay is scaled too, as a PyTorch group's lr scales both."""
    patterns = [p for p, _ in factors]

    def factor(path: str) -> float:
        return next((f for p, f in factors if re.search(p, path)), 1.0)

    def init_fn(params: Any) -> optax.EmptyState:
        check_patterns(patterns, tree_paths(params), "train.lr_scale", "trainable parameter")
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree_util.tree_map_with_path(lambda k, u: u * factor(key_path(k)), updates), state

    return optax.GradientTransformation(init_fn, update_fn)
