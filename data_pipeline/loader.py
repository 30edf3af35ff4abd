"""Grain input pipeline: one global order, per-process slices of each global batch, exact resume.

Source: the Grain `DataLoader` recipe (sampler + RandomMap + Batch) and its Orbax checkpoint handler.

Training (`drop_remainder=True`): one global stream of records fixed by the seed alone
(`data_pipeline.order`): epoch e is a permutation of all records seeded by (seed, e), global batch t is
stream positions [t*G, (t+1)*G), and process k of n reads and transforms only its slice
[t*G + k*G/n, t*G + (k+1)*G/n). A transform's random choices (DETRIS draws one sentence per object at random)
come from a `np.random.Generator` keyed by (seed, stream position). So the global batches, bytes included, do
not depend on the process count: a 4-process run trains on the batches of the 1-process run, and a checkpoint
resumes on another process count at the same point of the stream (`order.restore_iterator_state`). With
`num_epochs=None` the stream is endless and batches run across epoch boundaries.

Evaluation (`drop_remainder=False`): process k of n reads the k-th contiguous block of the records (Grain's
IndexSampler over an uneven shard view, so that every record is read exactly once).
`jax.process_index()/process_count()` are the default process and count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from data_pipeline.order import GlobalOrderSampler, restore_iterator_state

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, np.ndarray]]


class _RandomTransform(grain.transforms.RandomMap):
    """Adapts `transform(example, rng)` to Grain's RandomMap (rng: per-record Philox generator)."""

    def __init__(self, transform: Transform):
        self._transform = transform

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self._transform(element, rng)


class _ShardView:
    """Records [start, end) of a source (uneven host shards, which Grain's own sharding truncates)."""

    def __init__(self, source: Any, start: int, end: int):
        self.source, self.start, self.end = source, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int) -> Any:
        return self.source[self.start + int(index)]

    def __repr__(self) -> str:
        return f"_ShardView({self.source!r}, start={self.start}, end={self.end})"


def _host(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (then the JAX process is used)")
    if shard_index is None:
        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def per_host_batch_size(global_batch_size: int, shard_count: int) -> int:
    """global_batch_size / shard_count; an error if it does not divide."""
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of {shard_count} hosts")
    return global_batch_size // shard_count


def steps_per_epoch(num_records: int, global_batch_size: int, shard_count: int = 1) -> int:
    """Full global batches in one epoch: ``num_records // global_batch_size`` for any ``shard_count`` (which
    must divide the batch)."""
    per_host_batch_size(global_batch_size, shard_count)
    return num_records // global_batch_size


def make_loader(
    source: Any,
    transform: Transform,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
) -> grain.DataLoader:
    """A Grain DataLoader over a random-access `source` yielding dicts of per-process batched arrays.

    `transform(example, rng) -> dict of fixed-shape arrays`. Batches have a leading axis of
    global_batch_size / shard_count. With `drop_remainder=True` (training) process `shard_index` reads its slice
    of each global batch of the one global order (module docstring); with `drop_remainder=False` (evaluation)
    every record is read once, the processes' blocks may differ by one record and the last batch may be short.
    `iter(loader)` gives an iterator with get_state()/set_state(); see `iterator_checkpoint_args` for Orbax and
    `restore_iterator_state` to resume on another process count. The source needs a stable `repr` (Grain
    validates it on restore).
    """
    index, count = _host(shard_index, shard_count)
    batch = per_host_batch_size(global_batch_size, count)
    if len(source) == 0:
        raise ValueError(f"empty data source {source!r}")
    # Grain's worker processes read absl flags; outside absl.app nothing parsed them
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    if drop_remainder:
        sampler: Any = GlobalOrderSampler(
            len(source), global_batch_size, shard_index=index, shard_count=count, seed=seed, shuffle=shuffle,
            num_epochs=num_epochs, worker_count=worker_count,
        )  # fmt: skip
    else:  # every record once: the first len % count processes read one more record
        base, extra = divmod(len(source), count)
        start = index * base + min(index, extra)
        source = _ShardView(source, start, start + base + (index < extra))
        sampler = grain.samplers.IndexSampler(
            num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed
        )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[_RandomTransform(transform), grain.transforms.Batch(batch, drop_remainder=drop_remainder)],
        worker_count=worker_count,
        shard_options=grain.sharding.NoSharding(),
    )


def iterator_checkpoint_args(iterator: grain.DataLoaderIterator) -> Any:
    """Orbax save args for the iterator's position: use as an item of `ocp.args.Composite(...)`.

    Example: `mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
    data=iterator_checkpoint_args(it)))`. Writes `process_<i>-of-<n>.json` (one file per JAX process).
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DataLoaderIterator) -> Any:
    """Orbax restore args: `mngr.restore(step, args=ocp.args.Composite(..., data=iterator_restore_args(it)))`
    moves `it` (a fresh iterator of an identically built loader) to the saved position, in place. Exact for the
    same process count only; `restore_iterator_state(it, saved_json)` also maps a state onto another count."""
    return grain.checkpoint.CheckpointRestore(iterator)


__all__ = [
    "iterator_checkpoint_args",
    "iterator_restore_args",
    "make_loader",
    "per_host_batch_size",
    "restore_iterator_state",
    "steps_per_epoch",
]
