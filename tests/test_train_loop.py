"""Training loop on the toy model: exact resume after SIGKILL, last-N / best checkpoints, logs, Ctrl-C, NaN stop."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from toy_model import ToySource, run_toy_training, toy_config

from wimfris_jax.io import flatten
from wimfris_jax.train.checkpoint import Checkpoints, load_variables
from wimfris_jax.train.logging import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def _params(state):
    return {k: np.asarray(v) for k, v in flatten(jax.device_get(state.params)).items()}


def _wait_for(proc, predicate, timeout, what):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_sigkill_then_resume_equals_straight_run(tmp_path):
    n = 8  # 2 epochs of 4 steps, lr decayed after epoch 1, data reshuffled per epoch
    overrides = {"ckpt_every": n // 2, "eval_every": n // 2, "fsdp": True}
    workdir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "toy_model.py"), str(workdir), json.dumps(overrides), str(n // 2)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        straight = run_toy_training(str(tmp_path / "straight"), toy_config(**overrides))  # meanwhile, in-process
        # the worker hangs in its evaluation right after the step-4 checkpoint; wait until that is committed
        _wait_for(proc, lambda: os.path.isdir(workdir / "checkpoints" / str(n // 2)), 240, "checkpoint 4")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with Checkpoints(workdir) as ck:
        assert ck.all_steps() == [n // 2]

    resumed = run_toy_training(str(workdir), toy_config(resume=True, **overrides))
    assert int(resumed.step) == int(straight.step) == n
    a, b = _params(straight), _params(resumed)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(resumed.rng), np.asarray(straight.rng))
    # the resumed run logged steps 5..8 with the same losses as the straight run
    loss = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "straight")}
    resumed_rows = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in resumed_rows][-4:] == [5, 6, 7, 8]
    for r in resumed_rows[-4:]:
        assert r["train/loss"] == loss[r["step"]]


def test_logs_keep_last_and_best(tmp_path):
    scores = iter([0.2, 0.6, 0.4, 0.5])  # evaluated at steps 2, 4, 6, 8 -> best is step 4
    cfg = toy_config(ckpt_every=2, keep_last=2, eval_every=2)
    seen = {}

    def eval_fn(state):
        seen[int(state.step)] = jax.device_get(state.variables())
        return {"mIoU": next(scores), "oIoU": 0.1}

    final = run_toy_training(str(tmp_path), cfg, eval_fn=eval_fn)
    with Checkpoints(tmp_path) as ck:
        assert ck.all_steps() == [6, 8]
        assert ck.best() == (4, 0.6)
    # load_variables: all params merged (frozen included) + batch_stats, exactly as evaluated at that step
    for which, step in (("best", 4), ("latest", 8), (6, 6)):
        variables, got = load_variables(tmp_path, which)
        assert got == step
        want = flatten(seen[step])
        assert set(flatten(variables)) == set(want) and "params/image_encoder/conv/kernel" in want
        for k, v in flatten(variables).items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{which}: {k}")
    assert int(final.step) == 8
    rows = read_metrics(tmp_path)
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == list(range(1, 9))
    # lr x0.1 after epoch 1 (4 steps): updates 1-4 use 1e-2, 5-8 use 1e-3
    np.testing.assert_allclose([train[s]["train/lr"] for s in range(1, 9)], [1e-2] * 4 + [1e-3] * 4, rtol=1e-6)
    assert all(train[s]["train/images_per_s"] > 0 for s in train)
    val = [(r["step"], r["val/mIoU"]) for r in rows if "val/mIoU" in r]
    assert val == [(2, 0.2), (4, 0.6), (6, 0.4), (8, 0.5)]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["keep_last"] == 2
    with pytest.raises(FileExistsError, match="resume=True"):
        run_toy_training(str(tmp_path), cfg)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    def interrupt_at_3(state):
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return {"mIoU": 0.0}

    cfg = toy_config(ckpt_every=100, eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        run_toy_training(str(tmp_path), cfg, eval_fn=interrupt_at_3)
    with Checkpoints(tmp_path) as ck:
        assert ck.all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_config(lr=1e30, ckpt_every=1)  # diverges within a few steps
    with pytest.raises(FloatingPointError, match=r"at step \d+") as info:
        run_toy_training(str(tmp_path), cfg, train_source=ToySource(64, 16, 4))
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad >= 2
    with Checkpoints(tmp_path) as ck:
        assert ck.latest_step() == bad - 1
    # the kept checkpoint is finite (restored without a target: plain arrays)
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(bad - 1) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored["params"]))
