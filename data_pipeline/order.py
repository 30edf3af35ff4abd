"""One global training order fixed by the seed, independent of the process count, and its resume.

The stream: positions p = 0, 1, 2, ... (endless, or ``num_epochs * N`` long); epoch e = p // N is a permutation
of the N records seeded by (seed, e) (Grain's index shuffle with seed + e), so record(p) = perm_e[p % N], and
the stream runs across epoch boundaries. Global batch t is positions [t*G, (t+1)*G); process k of n reads
positions [t*G + k*B, t*G + (k+1)*B), B = G / n: its slice of the same global batch, and only those records
are read and transformed. A record's random choices come from a Philox generator keyed by (seed, p). So the
concatenation over k of the n per-process batches is the 1-process batch, bit for bit, for every n.

:class:`GlobalOrderSampler` is that order as a Grain sampler (used with ``grain.sharding.NoSharding()``: the
sharding is in the sampler), so Grain's DataLoader, worker processes and ``get_state``/``set_state`` work as
with Grain's own sampler. Grain hands worker w of W the local indices w, w+W, ... and interleaves the workers'
batches round robin; local index j is mapped so that worker w's batch m is global batch m*W + w.

Resume: Grain's iterator state counts the records each worker has read; :func:`restore_iterator_state` moves an
iterator to a saved state, and a state saved by another process count (or worker count) to the same point of the
global stream: the saved state gives the number of global batches consumed, from which every process's position
follows.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from typing import Any

import grain
import numpy as np

from wimfris_jax.errors import UserError

# fields of the sampler's repr that may differ between a saved state and the iterator it is restored into
_PER_RUN = ("shard_index", "shard_count", "worker_count")
_REPR = re.compile(r"GlobalOrderSampler\((.*)\)")
# the sampler of runs saved before the global order (one process: a plain Grain IndexSampler over all records)
_OLD_ONE_PROCESS = re.compile(r"IndexSampler\(.*shard_options=ShardOptions\(shard_index=0, shard_count=1, .*\)")


class DataOrderChanged(UserWarning):
    """A run saved before the global order resumes at the same step in the new order (other records follow)."""


class GlobalOrderSampler:
    """Grain sampler of process ``shard_index`` of ``shard_count`` in the global order (module docstring).

    Local index j (the j-th record this process reads) -> ``RecordMetadata(index=j, record_key=record(p),
    rng=Philox keyed by (seed, p))`` with p its global stream position. ``len``: ``sys.maxsize`` when
    ``num_epochs`` is None, else the records of the ``num_epochs * N // G`` full global batches (rounded down to
    a multiple of the worker count, so that every worker ends on a full batch).
    """

    def __init__(
        self,
        num_records: int,
        global_batch_size: int,
        *,
        shard_index: int,
        shard_count: int,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        worker_count: int = 0,
    ):
        if num_records <= 0 or global_batch_size <= 0 or global_batch_size % shard_count:
            raise ValueError(f"{num_records} records, global batch {global_batch_size} on {shard_count} processes")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.num_records, self.global_batch_size, self.seed = num_records, global_batch_size, seed
        self.shard_index, self.shard_count, self.worker_count = shard_index, shard_count, worker_count
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.batch = global_batch_size // shard_count  # B, this process's slice of a global batch
        self._workers = max(1, worker_count)
        self.num_batches: int | None = None  # global batches in the stream (None: endless)
        if num_epochs is not None:
            total = num_epochs * num_records // global_batch_size
            self.num_batches = total - total % self._workers
            if self.num_batches <= 0:
                raise ValueError(
                    f"{num_records} records: {num_epochs} epoch(s) give no global batch of {global_batch_size}"
                    + (f" for each of {self._workers} workers" if total else "")
                )
        keys = grain.MapDataset.range(num_records)  # indexing past N wraps into the next epoch
        self._keys = keys.shuffle(seed=seed) if shuffle else keys

    def position(self, index: int) -> int:
        """Global stream position p of this process's local index ``index``."""
        worker, q = index % self._workers, index // self._workers
        m, r = divmod(q, self.batch)
        t = m * self._workers + worker  # the global batch
        return t * self.global_batch_size + self.shard_index * self.batch + r

    def __len__(self) -> int:
        return sys.maxsize if self.num_batches is None else self.num_batches * self.batch

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} not in [0, {len(self)})")
        p = self.position(index)
        rng = np.random.Generator(np.random.Philox(key=(self.seed << 64) | p))
        return grain.RecordMetadata(index=index, record_key=int(self._keys[p]), rng=rng)

    def __repr__(self) -> str:  # Grain validates a restored state against it; _fields parses it
        return (
            f"GlobalOrderSampler(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
            f"shard_index={self.shard_index}, shard_count={self.shard_count}, worker_count={self.worker_count}, "
            f"shuffle={self.shuffle}, num_epochs={self.num_epochs}, seed={self.seed})"
        )


def _fields(sampler_repr: str) -> dict[str, str] | None:
    """The fields of a :class:`GlobalOrderSampler` repr as strings; None for another sampler."""
    match = _REPR.fullmatch(sampler_repr)
    return dict(kv.split("=", 1) for kv in match.group(1).split(", ")) if match else None


def batches_consumed(state: dict[str, Any], batch: int) -> int:
    """Global batches an iterator in Grain state ``state`` has yielded, ``batch`` records each (per process)."""
    workers = max(1, int(state["worker_count"]))
    total = 0
    for w in range(workers):  # worker w has read records w, w + W, ..., the last one at last_seen_indices[w]
        read = (int(state["last_seen_indices"][str(w)]) + workers - w) // workers
        if read % batch:
            raise UserError(f"the saved data position is not on a batch boundary ({read} records, batches of {batch})")
        total += read // batch
    return total


def state_at(state: dict[str, Any], batches: int, batch: int) -> dict[str, Any]:
    """``state`` (a Grain state of the target iterator) moved to after ``batches`` global batches."""
    workers = max(1, int(state["worker_count"]))
    seen = {str(w): w - workers + max(0, (batches - w + workers - 1) // workers) * batch * workers
            for w in range(workers)}  # fmt: skip
    return {**state, "last_seen_indices": seen, "last_worker_index": batches % workers - 1}


def restore_iterator_state(iterator: Any, saved: bytes | str) -> None:
    """Moves a Grain ``DataLoaderIterator`` to ``saved`` (its ``get_state()``, as Orbax stores it).

    Exact when the state was saved by the same sampler and worker count; a state of :class:`GlobalOrderSampler`
    saved by another process or worker count continues the same global stream (module docstring). Raises a
    :class:`UserError` naming what differs when the order itself changed (batch size, seed, records, ...).
    """
    saved = saved.encode() if isinstance(saved, str) else saved
    old, new = json.loads(saved), json.loads(iterator.get_state())
    if old["sampler"] == new["sampler"] and old["worker_count"] == new["worker_count"]:
        iterator.set_state(saved)
        return
    a, b = _fields(old["sampler"]), _fields(new["sampler"])
    if a is None and b is not None and _OLD_ONE_PROCESS.fullmatch(old["sampler"]) and old["worker_count"] == 0:
        done = (int(old["last_seen_indices"]["0"]) + 1) // int(b["global_batch_size"])
        warnings.warn(DataOrderChanged(
            f"the run was saved before data_pipeline.order: it resumes after {done} global batches, in the new "
            "order (the records it sees next differ from those the old order had next)"), stacklevel=2)  # fmt: skip
        iterator.set_state(
            json.dumps(state_at(new, done, int(b["global_batch_size"]) // int(b["shard_count"]))).encode()
        )
        return
    if a is None or b is None:
        raise UserError(f"the saved data position of {old['sampler']} cannot carry over to {new['sampler']}")
    changed = [
        f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if k not in _PER_RUN and a.get(k) != b.get(k)
    ]
    if old["data_source"] != new["data_source"]:
        changed.append(f"data source {old['data_source']} -> {new['data_source']}")
    if changed:
        raise UserError(f"the saved data position cannot carry over: the data order changed ({'; '.join(changed)})")
    done = batches_consumed(old, int(a["global_batch_size"]) // int(a["shard_count"]))
    moved = state_at(new, done, int(b["global_batch_size"]) // int(b["shard_count"]))
    iterator.set_state(json.dumps(moved, indent=4).encode())
