"""Train state: trainable and frozen parameters apart, optimiser state, BatchNorm statistics, step, RNG.

Follows the split of :mod:`wimfris_jax.paths`: the optimiser state covers ``params`` (the trainable
split) alone and the frozen backbones are carried unchanged, so they receive no gradient and no Adam
moments (WIMFRIS Sec. 3: frozen CLIP text tower and DINOv2, tuned through MTA/MSA adapters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from wimfris_jax import paths
from wimfris_jax.train import sharding


@struct.dataclass
class TrainState:
    """All that changes during training; a pytree (jit argument, orbax item).

    Attributes:
      step: int32 () number of updates done.
      params: trainable parameters (nested dict).
      frozen: frozen parameters (nested dict; may be empty).
      batch_stats: BatchNorm running statistics (nested dict; empty if the model has none).
      opt_state: optax state of ``params``.
      rng: uint32 (2,) raw PRNG key; split once per step for dropout.
    """

    step: jax.Array
    params: Any
    frozen: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """Flax variables for ``model.apply`` (evaluation): all parameters merged, plus batch_stats."""
        out = {"params": paths.merge(self.params, self.frozen)}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def create_train_state(
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    trainable: Sequence[str],
    rng: jax.Array,
) -> TrainState:
    """Builds the state from flax ``variables`` ({"params", "batch_stats"?}); pure, usable under jit/eval_shape."""
    params, frozen = paths.split(variables["params"], trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        batch_stats=dict(variables.get("batch_stats", {})),
        opt_state=tx.init(params),
        rng=jnp.asarray(rng, jnp.uint32),
    )


def init_variables(model: nn.Module, batch: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
    """``model.init`` on a batch of the training shapes ("image" (B, S, S, 3), "ids" (B, L)); random weights."""
    p_rng, d_rng = jax.random.split(rng)
    images = jnp.zeros(jnp.shape(batch["image"]), jnp.float32)
    ids = jnp.zeros(jnp.shape(batch["ids"]), jnp.int32)
    return dict(model.init({"params": p_rng, "dropout": d_rng}, images, ids, train=False))


def init_train_state(
    init_fn: Callable[[jax.Array], Mapping[str, Any]],
    tx: optax.GradientTransformation,
    trainable: Sequence[str],
    seed: int,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE,
) -> tuple[TrainState, Any]:
    """Creates the state directly in its sharded layout; returns ``(state, state_shardings)``.

    ``init_fn(rng) -> variables`` (e.g. ``partial(init_variables, model, batch)``, or a function returning
    pretrained variables). It runs under ``jax.jit`` with the target out-shardings, so a model too big for one
    device is never materialised whole. ``seed`` gives the init key and the training key (independent).
    """
    build, init_rng = _builder(init_fn, tx, trainable, seed)
    _, shardings = train_state_shapes(init_fn, tx, trainable, seed, mesh, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
    state = jax.jit(build, out_shardings=shardings)(init_rng)
    return state, shardings


def _builder(init_fn: Callable, tx: optax.GradientTransformation, trainable: Sequence[str], seed: int):
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))

    def build(key: jax.Array) -> TrainState:
        return create_train_state(init_fn(key), tx, trainable, train_rng)

    return build, init_rng


def train_state_shapes(
    init_fn: Callable[[jax.Array], Mapping[str, Any]],
    tx: optax.GradientTransformation,
    trainable: Sequence[str],
    seed: int,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE,
) -> tuple[TrainState, Any]:
    """``(abstract state, state_shardings)`` of :func:`init_train_state`, nothing allocated: the state as
    ``jax.ShapeDtypeStruct`` leaves carrying their shardings (to compile a step without building the state)."""
    build, init_rng = _builder(init_fn, tx, trainable, seed)
    shapes = jax.eval_shape(build, init_rng)
    shardings = sharding.tree_shardings(shapes, mesh, fsdp=fsdp, min_size=fsdp_min_size)
    return abstract_state(shapes, shardings), shardings


def abstract_state(state_or_shapes: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree carrying target shardings (an orbax restore target)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), state_or_shapes, shardings
    )
