"""Training loop on the toy model: exact resume after SIGKILL, last-N / best checkpoints, logs, Ctrl-C, NaN stop."""

import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import TESTS, python_path
from toy_model import ToySource, run_toy_training, toy_config

from wimfris_jax.checkpoints.runs import load_variables
from wimfris_jax.errors import UserError
from wimfris_jax.io import flatten
from wimfris_jax.train.checkpoint import Checkpoints
from wimfris_jax.train.logging import read_metrics
from wimfris_jax.train.loop import NonFiniteLossError


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
    env = dict(os.environ, PYTHONPATH=python_path())
    proc = subprocess.Popen(
        [sys.executable, os.path.join(TESTS, "toy_model.py"), str(workdir), json.dumps(overrides), str(n // 2)],
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
    assert [r["step"] for r in resumed_rows] == list(range(1, n + 1))  # each step once
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


def _tb_scalars_as_shown(logdir):
    """{(tag, step): value} that TensorBoard shows for the event files in ``logdir``, oldest file first.

    Reads the TFRecord framing (u64 length, u32 crc, data, u32 crc) and applies TensorBoard's purge rule: a
    SessionLog START event at step s hides every earlier event with step >= s.
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data, pos = f.read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {k: v for k, v in shown.items() if k[1] < event.step}
            for value in event.summary.value:
                assert (value.tag, event.step) not in shown, (value.tag, event.step)
                shown[value.tag, event.step] = value.simple_value
    return shown


def test_resume_logs_each_step_once(tmp_path):
    run_toy_training(str(tmp_path), toy_config(epochs=1, eval_every=2), eval_fn=lambda s: {"mIoU": 0.5})
    first = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r}
    assert sorted(first) == [1, 2, 3, 4]
    # a crash after the checkpoint at 4 left rows for steps 5-6 and a torn line; TensorBoard has them too
    stale = [{"step": 5, "train/loss": -1.0}, {"step": 6, "train/loss": -1.0}, {"step": 6, "val/mIoU": -1.0}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in stale)
        f.write('{"step": 7, "train/lo')
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb"), filename_suffix=f".{time.time_ns()}") as tb:  # named as MetricWriter
        for row in stale:
            for k, v in row.items():
                if k != "step":
                    tb.add_scalar(k, v, row["step"])

    run_toy_training(str(tmp_path), toy_config(resume=True, eval_every=2), eval_fn=lambda s: {"mIoU": 0.25})
    rows = read_metrics(tmp_path)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in train] == list(range(1, 9)) and all(v > 0 for _, v in train)
    assert [(s, v) for s, v in train if s <= 4] == sorted(first.items())  # rows up to the checkpoint kept as they were
    assert [(r["step"], r["val/mIoU"]) for r in rows if "val/mIoU" in r] == [(2, 0.5), (4, 0.5), (6, 0.25), (8, 0.25)]
    assert not os.path.exists(str(tmp_path / "metrics.jsonl") + ".tmp")
    shown = _tb_scalars_as_shown(tmp_path / "tb")
    assert sorted(s for tag, s in shown if tag == "train/loss") == list(range(1, 9))
    assert {s: shown["train/loss", s] for s in range(1, 9)} == pytest.approx(dict(train))
    assert sorted((s, v) for (tag, s), v in shown.items() if tag == "val/mIoU") == [(2, 0.5), (4, 0.5), (6, 0.25),
                                                                                      (8, 0.25)]  # fmt: skip


def test_ctrl_c_saves_a_checkpoint_and_restores_the_previous_handler(tmp_path):
    def interrupt_at_3(state):
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return {"mIoU": 0.0}

    calls = []

    def previous(signum, frame):
        calls.append(signum)

    cfg = toy_config(ckpt_every=100, eval_every=1)
    original = signal.signal(signal.SIGINT, previous)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_toy_training(str(tmp_path), cfg, eval_fn=interrupt_at_3)
        assert signal.getsignal(signal.SIGINT) is previous and calls == []  # the loop's handler took the Ctrl-C
    finally:
        signal.signal(signal.SIGINT, original)
    with Checkpoints(tmp_path) as ck:
        assert ck.all_steps() == [3]


def test_sigint_ignored_at_start_stays_ignored(tmp_path):
    """A background process (``pytest &``, nohup) starts with SIGINT ignored: no handler, training completes."""
    seen = []

    def interrupt_at_3(state):
        seen.append(signal.getsignal(signal.SIGINT))
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return {"mIoU": 0.0}

    original = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        final = run_toy_training(str(tmp_path), toy_config(ckpt_every=100, eval_every=1), eval_fn=interrupt_at_3)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, original)
    assert int(final.step) == 8 and seen == [signal.SIG_IGN] * 8
    with Checkpoints(tmp_path) as ck:
        assert ck.all_steps() == [8]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_config(lr=1e30, ckpt_every=1)  # diverges within a few steps
    with pytest.raises(FloatingPointError, match=r"at step \d+") as info:
        run_toy_training(str(tmp_path), cfg, train_source=ToySource(64, 16, 4))
    assert isinstance(info.value, NonFiniteLossError) and isinstance(info.value, (UserError, ValueError))  # CLI
    assert "\n" not in str(info.value)
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad >= 2
    with Checkpoints(tmp_path) as ck:
        assert ck.latest_step() == bad - 1
    # the kept checkpoint is finite (restored without a target: plain arrays)
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(bad - 1) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored["params"]))
