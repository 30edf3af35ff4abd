"""Device mesh, parameter/batch shardings (data parallel and FSDP) and multi-host start-up.

One 1-D mesh with axis ``"data"`` spans every device of every host. The batch is split along its leading
axis over ``"data"``; parameters, optimiser moments and BatchNorm statistics are either replicated
(plain data parallelism) or, with ``config.train.fsdp``, each large array is split along its largest axis
divisible by the mesh size (ZeRO-3 style; XLA's GSPMD inserts the all-gathers and reduce-scatters). The
train step is one ``jax.jit`` with these in/out shardings; no ``pmap``.

Multi-host (``maybe_initialize_distributed``), read before JAX touches any device:

  * ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``:
    explicit start-up, one process per host (``JAX_LOCAL_DEVICE_IDS``, optional, is read by JAX itself);
  * ``WIMFRIS_DISTRIBUTED=auto``: let ``jax.distributed.initialize()`` detect the cluster (Cloud TPU pods,
    SLURM, Open MPI, GKE);
  * neither: single process, nothing is done.

``WIMFRIS_HEARTBEAT_TIMEOUT`` (seconds, default :data:`HEARTBEAT_TIMEOUT_S`; JAX's own default is 100): how long the
coordination service waits for a silent process before declaring it dead and stopping the others (JAX's abort,
status 134); the bound on how long a run outlives a host that vanished without closing its connections.

Each host then feeds its own slice of the global batch (``data_pipeline.loader.make_loader`` reads process
``jax.process_index()``'s slice of each batch of one global order, the same for any process count);
:func:`shard_batch` assembles the global array from the per-host pieces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
HEARTBEAT_TIMEOUT_S = 30  # a dead process stops the others after this long at most (module docstring)
DEFAULT_FSDP_MIN_SIZE = 2**18  # elements; smaller arrays stay replicated (gathering them costs more than it saves)

_log = logging.getLogger(__name__)


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool | None = None,
) -> bool:
    """Starts ``jax.distributed`` when arguments or the environment (module docstring) ask for it.

    Must run before the first JAX computation. Returns whether a multi-process runtime was started.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    if auto is None:
        auto = env.get("WIMFRIS_DISTRIBUTED", "").lower() in ("auto", "1", "true")
    explicit = (coordinator_address, num_processes, process_id)
    heartbeat = _env_int("WIMFRIS_HEARTBEAT_TIMEOUT") if env.get("WIMFRIS_HEARTBEAT_TIMEOUT") else HEARTBEAT_TIMEOUT_S
    if heartbeat < 1:
        raise ValueError(f"WIMFRIS_HEARTBEAT_TIMEOUT={heartbeat}: must be a positive number of seconds")
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "multi-host start-up needs all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; "
                f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat)
    elif auto:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    else:
        return False
    _log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PartitionSpec:
    """Partition of one array: its largest axis divisible by ``num_shards`` goes over ``"data"``.

    Arrays with fewer than ``min_size`` elements, or with no divisible axis, are replicated (``P()``).
    Ties between equal axes go to the last one (the output features of a kernel).
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    best = None
    for axis, size in enumerate(shape):
        if size % num_shards == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*([None] * best + [DATA_AXIS]))


def tree_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``): replicated, or FSDP.

    The rule depends on shapes alone, so Adam's moments land exactly where their parameters do.
    """
    n = mesh.shape[DATA_AXIS]

    def one(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        spec = fsdp_spec(shape, n, min_size) if fsdp else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``"data"``, every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host batch (dict of numpy arrays, leading axis = global batch / process count) -> global arrays.

    Raises:
      ValueError: naming the key whose global batch does not split evenly over the mesh.
    """
    sharding = batch_sharding(mesh)
    n = mesh.shape[DATA_AXIS]
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_b = value.shape[0] * jax.process_count()
        if global_b % n:
            raise ValueError(
                f"batch[{key!r}] has global batch {global_b}, not divisible by the {n} devices of the mesh"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
