"""The checkpoint errors, for readers and the writer alike (all :class:`~wimfris_jax.errors.UserError`: one line)."""

from __future__ import annotations

from wimfris_jax.errors import UserError


class CheckpointMismatch(UserError, ValueError):
    """The checkpoint's variables do not fit the model the config builds."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read (damaged, unfinished, not a parameter file), or a directory holding none."""


class CheckpointNotFound(UserError, FileNotFoundError):
    """No checkpoint of the kind asked for (no best, no such step, nothing committed yet)."""


class CheckpointFallbackWarning(UserWarning):
    """A damaged checkpoint was skipped for an older intact one; the message names both and why."""
