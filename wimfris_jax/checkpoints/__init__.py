"""Checkpoints, read and checked: one home below training and the commands.

  errors  CheckpointMismatch, CheckpointError, CheckpointNotFound, CheckpointFallbackWarning
  fit     expected_variables (jax.eval_shape of a model's init), check_variables (every problem named at once)
  read    read_checkpoint: a converted weights file, a training run directory or one of its step folders
  runs    load_variables, committed_steps, check_fits, restore_target: reading a run's orbax checkpoints (even while
          it trains), never writing; imported on first use (orbax)

The writer (``Checkpoints``: last N + best, with the data iterator's position) is
:mod:`wimfris_jax.train.checkpoint`; ``load_model`` (:mod:`wimfris_jax.load`) builds a model and loads it through here.
"""

from wimfris_jax.checkpoints.errors import (
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointMismatch,
    CheckpointNotFound,
)
from wimfris_jax.checkpoints.fit import check_variables, expected_variables
from wimfris_jax.checkpoints.read import read_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointMismatch",
    "CheckpointNotFound",
    "check_variables",
    "expected_variables",
    "read_checkpoint",
]
