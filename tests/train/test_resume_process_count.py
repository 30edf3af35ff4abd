"""Resuming a training run on another process count (toy model): the data iterator continues the one global
stream, through the same restore path as the training loop (``wimfris_jax.train.checkpoint``)."""

import os

import jax
import numpy as np
import pytest
from toy_model import ToySource, identity_transform, run_toy_training, toy_config

from data_pipeline.loader import make_loader
from wimfris_jax.errors import UserError
from wimfris_jax.io import flatten
from wimfris_jax.train.checkpoint import _restore_data

STEPS = dict(epochs=1, steps_per_epoch=6, ckpt_every=3, lr_milestones=())


def _loader(k: int = 0, n: int = 1):
    return make_loader(ToySource(64, 16, 4), identity_transform, global_batch_size=8, seed=0, shard_index=k,
                       shard_count=n)  # fmt: skip


def _params(state):
    return {k: np.asarray(v) for k, v in flatten(jax.device_get(state.params)).items()}


def test_resume_on_another_process_count_continues_the_global_stream(tmp_path):
    straight = run_toy_training(str(tmp_path / "straight"), toy_config(**STEPS))  # 6 steps on 1 process

    # 2 processes -> 1: a run stopped at step 3 whose data position was saved by 2 processes
    run = tmp_path / "run"
    run_toy_training(str(run), toy_config(**{**STEPS, "steps_per_epoch": 3}))
    data = run / "checkpoints" / "3" / "data"
    assert [f for f in os.listdir(data) if f.startswith("process_")] == ["process_0-of-1.json"]
    os.remove(data / "process_0-of-1.json")
    for k in range(2):  # the files a 2-process run writes at step 3
        it = iter(_loader(k, 2))
        [next(it) for _ in range(3)]
        (data / f"process_{k}-of-2.json").write_bytes(it.get_state())
    with pytest.raises(UserError, match=r"cannot restore .*3: .*data order changed \(global_batch_size 8 -> 4\)"):
        run_toy_training(str(run), toy_config(resume=True, **{**STEPS, "global_batch_size": 4}))
    resumed = run_toy_training(str(run), toy_config(resume=True, **STEPS))
    assert int(resumed.step) == int(straight.step) == 6
    a, b = _params(straight), _params(resumed)
    for key in a:  # the same batches at steps 4..6, so the same parameters
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)

    # 1 process -> 2: each process continues with its half of the 1-process batches
    one = iter(_loader())
    expected = [next(one) for _ in range(5)][3:]
    halves = []
    for k in range(2):
        it = iter(_loader(k, 2))
        _restore_data(str(tmp_path / "straight" / "checkpoints" / "3" / "data"), it)
        halves.append([next(it) for _ in range(2)])
    for t in range(2):
        for key in ("image", "ids", "mask"):
            np.testing.assert_array_equal(np.concatenate([halves[0][t][key], halves[1][t][key]]), expected[t][key])
