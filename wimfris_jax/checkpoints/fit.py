"""Whether a checkpoint fits a model: the variables a model expects (:func:`expected_variables`, nothing allocated)
and every missing, unexpected or mis-shaped array named at once (:func:`check_variables`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wimfris_jax.checkpoints.errors import CheckpointMismatch
from wimfris_jax.io import flatten

MAX_LISTED = 40  # problems listed one per line before the rest is counted


def expected_variables(model: Any, model_config: Any) -> dict[str, Any]:
    """``jax.eval_shape`` of ``model.init`` for a batch of one (nothing allocated)."""
    s, n = int(model_config.image_size), int(model_config.word_len)
    images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, n), jnp.int32)
    return dict(jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t, train=False), images, ids))


def check_variables(variables: Any, expected: Any, checkpoint: str, config_name: str) -> None:
    """Raises :class:`CheckpointMismatch` naming every path that is missing, unexpected or mis-shaped; a
    top-level module (an adapter, the neck, ...) that is missing or unexpected as a whole is named once."""
    got, want = flatten(variables), flatten(expected)
    problems = []
    for kind, paths, side in (("missing", set(want) - set(got), want), ("unexpected", set(got) - set(want), got)):
        by_module: dict[str, list[str]] = {}
        for p in sorted(paths):
            by_module.setdefault(_module(p), []).append(p)
        for module, ps in by_module.items():
            if len(ps) > 1 and len(ps) == sum(_module(p) == module for p in side):
                example = f"{ps[0]} {tuple(np.shape(side[ps[0]]))}"
                problems.append(f"{kind}: all {len(ps)} arrays of {module!r} (e.g. {example})")
            else:
                problems += [f"{kind}: {p} {tuple(np.shape(side[p]))}" for p in ps]
    problems += [
        f"shape: {p} is {tuple(np.shape(got[p]))} in the checkpoint, the model has {tuple(want[p].shape)}"
        for p in sorted(set(got) & set(want))
        if tuple(np.shape(got[p])) != tuple(want[p].shape)
    ]
    if problems:
        more = len(problems) - MAX_LISTED
        listed = "\n  ".join(problems[:MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
        raise CheckpointMismatch(
            f"{checkpoint} does not fit the model of {config_name}: {len(problems)} problem(s)\n  {listed}"
        )


def _module(path: str) -> str:
    """'params/dense_aligner_3/D_fc1/kernel' -> 'dense_aligner_3' (the top-level module, any collection)."""
    parts = path.split("/")
    return parts[1] if len(parts) > 2 else parts[0]
