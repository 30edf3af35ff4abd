"""``read_checkpoint``: the variables of a converted weights file, a training run directory or one of its step
folders, never writing (:mod:`wimfris_jax.checkpoints.runs` reads runs)."""

from __future__ import annotations

import os
from typing import Any

from wimfris_jax.checkpoints.errors import CheckpointError, CheckpointMismatch
from wimfris_jax.io import load_params


def read_checkpoint(checkpoint: str | os.PathLike, which: str | int = "auto") -> tuple[dict[str, Any], dict]:
    """``(variables, meta)`` of a converted file, a training run directory or one of its step folders (module
    docstring); ``which``: "auto", "best", "latest" or a step number (run directories only). Never writes."""
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        from wimfris_jax.checkpoints.runs import load_variables  # lazy: orbax (~0.7 s) only for run directories

        variables, step = load_variables(path, which)
        return variables, {"step": step, "which": which}
    if which != "auto":
        raise CheckpointError(f"{path} is a converted weights file; step {which!r} applies to run directories")
    tree, meta = load_params(path)
    collections = meta.get("collections")
    if collections:
        missing = [c for c in collections if c not in tree]
        if missing:
            raise CheckpointMismatch(f"{path}: meta lists collections {collections} but {missing} are absent")
        return {c: tree[c] for c in collections}, meta
    return {"params": tree}, meta
