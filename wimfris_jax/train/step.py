"""The train step: loss, gradient w.r.t. the trainable split, Adam update, BatchNorm statistics, RNG split.

WIMFRIS Sec. 3.4 / eq. 10 (total loss, computed by the injected ``loss_fn``) optimised as in Sec. 4.1;
frozen backbones are split off (:mod:`wimfris_jax.paths`) so ``jax.value_and_grad`` never
differentiates them. With a sharded batch (``"data"`` mesh axis) BatchNorm's batch mean/variance are
global means, i.e. synchronised BN as in DETRIS (``sync_bn: True``).

Mixed precision (``compute_dtype="bfloat16"``): floating parameters and images are cast to bfloat16 inside
the step (the cast is differentiated, so gradients and the Adam update stay float32 against float32
master parameters); model outputs are cast back and the loss is computed in float32; BatchNorm statistics
are stored in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from wimfris_jax import paths
from wimfris_jax.platform import for_devices
from wimfris_jax.train.sharding import batch_sharding
from wimfris_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
# loss_fn(outputs, mask) -> (scalar loss, dict of scalar aux metrics)
LossFn = Callable[[Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_DTYPES = tuple(_DTYPES)  # config.train.compute_dtype


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``dtype``; other leaves unchanged."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    *,
    compute_dtype: str = "float32",
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure ``step(state, batch) -> (state, metrics)`` (not jitted; see :func:`jit_train_step`).

    ``batch``: "image" float32 (B, S, S, 3), "ids" int32 (B, L), "mask" float32 (B, Hm, Wm).
    ``metrics``: float32 scalars "loss", "grad_norm", "lr" (of this update) and every entry of loss_fn's aux.
    """
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {compute_dtype!r}")
    cdtype = _DTYPES[compute_dtype]

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, dropout_rng = jax.random.split(state.rng)

        def loss_of(params: Any) -> tuple[jax.Array, tuple[Mapping[str, jax.Array], Any]]:
            all_params = paths.merge(params, state.frozen)
            variables = {"params": cast_floats(all_params, cdtype)}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            outputs, updates = model.apply(
                variables,
                batch["image"].astype(cdtype),
                batch["ids"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats"],
            )
            outputs = cast_floats(outputs, jnp.float32)
            loss, aux = loss_fn(outputs, batch["mask"].astype(jnp.float32))
            return loss.astype(jnp.float32), (aux, updates.get("batch_stats", {}))

        (loss, (aux, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_stats, state.batch_stats)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state, rng=rng
        )
        return new_state, metrics

    return step


def jit_train_step(
    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]],
    state_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` with GSPMD shardings: state as ``state_shardings``, batch over "data", metrics replicated; the
    kernels (attention, remat "auto", scan) are chosen for the mesh's platform (:func:`wimfris_jax.platform.
    for_devices`), so an ahead-of-time compile for a GPU or TPU mesh from a CPU host chooses as that device would."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        for_devices(step, mesh),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
