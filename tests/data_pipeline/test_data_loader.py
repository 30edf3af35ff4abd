"""The Grain loader: one global order and randomness for any process count, exact resume (also through Orbax and
onto another process count), disjoint shards."""

import functools
import itertools
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipeline.loader import (
    iterator_checkpoint_args,
    iterator_restore_args,
    make_loader,
    per_host_batch_size,
    restore_iterator_state,
    steps_per_epoch,
)
from data_pipeline.order import DataOrderChanged
from data_pipeline.preprocess import preprocess_train
from data_pipeline.synthetic import SyntheticRefer
from wimfris_jax.errors import UserError


class Numbers:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": int(i)}

    def __repr__(self):
        return f"Numbers({self.n})"


def _transform(example, rng):
    return {"i": np.int64(example["i"]), "noise": rng.random(3)}  # per-record randomness


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["i"], y["i"])
        np.testing.assert_array_equal(x["noise"], y["noise"])


make = functools.partial(make_loader, Numbers(10), _transform, global_batch_size=4, seed=5)


def test_resume_mid_epoch_and_across_epoch_boundary():
    full = _take(iter(make()), 8)  # 32 records: 3.2 epochs of 10; batches 2, 4 and 7 straddle epochs
    first = iter(make())
    _assert_same(_take(first, 3), full[:3])
    state = first.get_state()
    resumed = iter(make())
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), full[3:])
    # each epoch is a fresh permutation of the records
    order = np.concatenate([b["i"] for b in full])
    epochs = [order[k * 10 : (k + 1) * 10] for k in range(3)]
    assert all(sorted(e.tolist()) == list(range(10)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_order_and_randomness_depend_on_seed_only():
    _assert_same(_take(iter(make()), 4), _take(iter(make()), 4))
    other = _take(iter(make_loader(Numbers(10), _transform, global_batch_size=4, seed=6)), 3)
    assert not all(np.array_equal(a["i"], b["i"]) for a, b in zip(other, _take(iter(make()), 3)))
    plain = np.concatenate([b["i"] for b in iter(make(shuffle=False, num_epochs=1, drop_remainder=False))])
    np.testing.assert_array_equal(plain, np.arange(10))


def test_orbax_checkpoint_roundtrip(tmp_path):
    full = _take(iter(make()), 6)
    it = iter(make())
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=iterator_checkpoint_args(it)))
        mngr.wait_until_finished()
    assert (tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json").exists()
    fresh = iter(make())
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(4, args=ocp.args.Composite(data=iterator_restore_args(fresh)))
    assert restored["data"] is fresh
    _assert_same(_take(fresh, 2), full[4:])


@pytest.mark.parametrize("n, drop", [(12, True), (11, False)])
def test_two_shards_are_disjoint_and_cover_the_epoch(n, drop):
    seen = []
    for k in range(2):
        loader = make_loader(
            Numbers(n), _transform, global_batch_size=4, seed=5, num_epochs=1, drop_remainder=drop,
            shard_index=k, shard_count=2,
        )  # fmt: skip
        batches = list(loader)
        assert all(len(b["i"]) <= 2 for b in batches) and len(batches[0]["i"]) == 2  # per-host batch 4 / 2
        seen.append(np.concatenate([b["i"] for b in batches]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))


def test_batch_size_and_shard_errors():
    with pytest.raises(ValueError, match="not a positive multiple of 3 hosts"):
        make_loader(Numbers(10), _transform, global_batch_size=4, seed=0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="shard_index and shard_count"):
        make_loader(Numbers(10), _transform, global_batch_size=4, seed=0, shard_index=0)
    with pytest.raises(ValueError, match="no global batch of 4"):
        make_loader(Numbers(3), _transform, global_batch_size=4, seed=0, num_epochs=1)
    assert per_host_batch_size(32, 4) == 8
    assert steps_per_epoch(42404, 32) == 1325 and steps_per_epoch(42404, 32, 4) == 1325
    assert steps_per_epoch(10, 4, 2) == steps_per_epoch(10, 4, 4) == 2


def test_synthetic_through_preprocess_batches():
    def transform(example, rng):
        return preprocess_train(example, image_size=56, word_len=17, mask_size=14, rng=rng)

    loader = make_loader(SyntheticRefer(6, image_size=64), transform, global_batch_size=3, seed=0)
    batch = next(iter(loader))  # default sharding: this JAX process (0 of 1)
    assert batch["image"].shape == (3, 56, 56, 3) and batch["image"].dtype == np.float32
    assert batch["ids"].shape == (3, 17) and batch["ids"].dtype == np.int32
    assert batch["mask"].shape == (3, 14, 14) and batch["mask"].sum() > 0


def _shard(k, n, **kw):
    return iter(make(shard_index=k, shard_count=n, **kw))


def _concat(batches):
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@pytest.mark.parametrize("n", [2, 4])
def test_processes_read_slices_of_the_one_process_batches(n):
    full = _take(iter(make()), 7)  # 28 records: 2.8 epochs of 10; batches 2, 4 straddle epoch boundaries
    shards = [_take(_shard(k, n), 7) for k in range(n)]
    assert all(len(b["i"]) == 4 // n for s in shards for b in s)
    _assert_same([_concat([s[t] for s in shards]) for t in range(7)], full)  # records and random choices
    np.testing.assert_array_equal(full[0]["i"], [4, 0, 5, 3])  # this seed's order, pinned
    np.testing.assert_array_equal(full[2]["i"], [2, 6, 2, 7])  # epoch 0 ends, epoch 1 begins


def test_records_are_not_paired_across_epochs():
    # the old contiguous shards: records i and i + N/2 shared every batch of every epoch on 2 processes
    m = functools.partial(make_loader, Numbers(8), _transform, global_batch_size=4, seed=5, num_epochs=2)
    full = np.concatenate([b["i"] for b in m()])
    halves = [list(m(shard_index=k, shard_count=2)) for k in range(2)]
    np.testing.assert_array_equal(np.concatenate([np.concatenate([a["i"], b["i"]]) for a, b in zip(*halves)]), full)
    epochs = full.reshape(2, 8)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and not np.array_equal(*epochs)
    together = [{frozenset(p) for b in e.reshape(2, 4) for p in itertools.combinations(b, 2)} for e in epochs]
    assert together[0] != together[1]
    assert not all(frozenset((i, i + 4)) in together[0] & together[1] for i in range(4))
    seen = np.concatenate([b["i"] for b in halves[0]])  # process 0 reads records of both halves
    assert (seen < 4).any() and (seen >= 4).any()


def test_resume_mid_epoch_on_two_processes():
    full = _take(_shard(1, 2), 6)
    it = _shard(1, 2)
    _take(it, 2)
    resumed = _shard(1, 2)
    resumed.set_state(it.get_state())
    _assert_same(_take(resumed, 4), full[2:])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_state_carries_over_to_another_process_count(before, after):
    full = _take(iter(make()), 6)
    saved = _shard(0, before)
    _take(saved, 3)  # 3 global batches: 12 records, mid-epoch 2
    state = saved.get_state()
    parts = []
    for k in range(after):
        it = _shard(k, after)
        restore_iterator_state(it, state)
        assert json.loads(it.get_state())["last_seen_indices"] == {"0": 3 * 4 // after - 1}
        parts.append(_take(it, 3))
    _assert_same([_concat([p[t] for p in parts]) for t in range(3)], full[3:])


def test_state_that_cannot_carry_over():
    it = _shard(0, 2)
    _take(it, 2)
    state = it.get_state()
    with pytest.raises(UserError, match=r"data order changed \(global_batch_size 4 -> 8\)"):
        restore_iterator_state(iter(make(global_batch_size=8)), state)
    with pytest.raises(UserError, match=r"seed 5 -> 6"):
        restore_iterator_state(iter(make(seed=6)), state)
    with pytest.raises(UserError, match="cannot carry over"):
        restore_iterator_state(iter(make(drop_remainder=False, num_epochs=1)), state)


def test_a_one_process_run_saved_before_the_global_order_resumes_at_its_step():
    old = grain.DataLoader(  # how make_loader read one process before data_pipeline.order
        data_source=Numbers(8),
        sampler=grain.samplers.IndexSampler(
            num_records=8, shard_options=grain.sharding.ShardOptions(0, 1, True), shuffle=True, num_epochs=None, seed=5
        ),  # fmt: skip
        operations=[grain.transforms.Batch(4, drop_remainder=True)],
        shard_options=grain.sharding.ShardOptions(0, 1, True),
    )
    it = iter(old)
    _take(it, 3)
    for k, count in ((0, 1), (1, 2)):
        resumed = _shard(k, count)
        with pytest.warns(DataOrderChanged, match="after 3 global batches"):
            restore_iterator_state(resumed, it.get_state())
        assert json.loads(resumed.get_state())["last_seen_indices"] == {"0": 3 * 4 // count - 1}
