"""Optimiser and learning-rate schedule of the DETRIS / WIMFRIS recipe.

DETRIS (config/*.yaml, train.py; docs/detris_code.md "Loss and training") and WIMFRIS Sec. 4.1: Adam
(b1 0.9, b2 0.999, eps 1e-8), no weight decay, no gradient clipping, base lr 1e-4 (B) / 2e-4 (L),
multiplied by 0.1 at each milestone epoch (PyTorch ``MultiStepLR`` stepped once per epoch). Here the
schedule is per update: the update with optimiser count ``c`` (0-based) uses
``lr * lr_decay ** #{m : c >= m * steps_per_epoch}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

from wimfris_jax.config import ConfigError


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
    when it is > 0 (TFANet, VIPA). Applied to trainable params only."""
    kind = train_config.get("lr_schedule", "step")
    if kind == "poly":
        total = int(train_config.epochs) * steps_per_epoch
        schedule = poly_schedule(float(train_config.lr), total, float(train_config.get("lr_power", 0.9)))
    elif kind == "step":
        schedule = lr_schedule(
            float(train_config.lr),
            tuple(train_config.get("lr_milestones", ())),
            float(train_config.get("lr_decay", 0.1)),
            steps_per_epoch,
        )
    else:
        raise ConfigError(f"config.train.lr_schedule={kind!r}: choose 'step' or 'poly'")
    weight_decay = float(train_config.get("weight_decay", 0.0))
    if weight_decay > 0:
        tx = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    else:
        tx = optax.adam(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8)
    return tx, schedule
