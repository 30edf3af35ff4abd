"""A 2-process run (``wimfris train`` as two JAX processes on this machine, gloo collectives) survives its hosts.

One run, three acts, each a module-scoped fixture resuming the previous one's workdir (so each act also proves the
previous checkpoint resumable), sharing a persistent compilation cache (only the first act compiles):

1. ``sigterm_run``: a fresh run; SIGTERM to process 1 alone (a preemption notice) once step 2 is logged: both
   processes stop at the same step, save one checkpoint, print one line and exit 143;
2. ``sigint_run``: ``--resume``; SIGINT to both processes (a terminal's Ctrl-C) after a new step: both save at the
   same step and exit 130;
3. ``killed_run``: ``--resume``; process 1 killed (SIGKILL): process 0 exits with one error line, status 1, within
   :data:`LOST_BOUND_S`.

Tests of multi-process training itself (equal losses of 2 processes and 1 at one global batch, a 2-process
checkpoint evaluated by one process) take ``sigterm_run``: its workdir holds the metrics of steps 1..N and a
2-process checkpoint at step N, recorded in :class:`Run` before the later acts add to them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import python_path
from limits import limit
from multihost import ROOT, Processes, Result, sets
from small_model import SMALL_MODEL

from wimfris_jax.checkpoints.runs import committed_steps, load_variables
from wimfris_jax.train.logging import read_metrics
from wimfris_jax.train.sharding import HEARTBEAT_TIMEOUT_S

pytestmark = pytest.mark.multihost

LOST_BOUND_S = HEARTBEAT_TIMEOUT_S + 15  # the survivor of a killed process stops within this (measured: < 1 s)
# FSDP (arrays of >= 4096 elements split over the 2 processes' devices): the layout no other process count has
TRAIN = ("train.global_batch_size=4", "train.epochs=1", "train.steps_per_epoch=1000", "train.log_every=1",
         "train.ckpt_every=0", "train.eval_every_epochs=0", "train.fsdp=True", "train.fsdp_min_size=4096")  # fmt: skip


@dataclasses.dataclass
class Run:
    """One act: the workdir, the last step logged when the signal was sent, how the processes ended, and the
    checkpoints and metrics rows of the workdir right after."""

    workdir: str
    signalled_after: int
    signalled_at: float
    results: list[Result]
    checkpoints: list[int]
    metrics: list[dict]

    def train_steps(self) -> list[int]:
        return [row["step"] for row in self.metrics if "train/loss" in row]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def _act(workdir: str, cache: str, logs: str, *, resume: bool, after: int, signum: int, which: list[int] | None) -> Run:
    """Trains ``workdir`` with 2 processes until step ``after`` is logged, sends ``signum`` to ``which``, waits."""
    argv = ["train", "--config", "configs/tiny.py", "--workdir", workdir, *sets(*SMALL_MODEL, *TRAIN)]
    with Processes([*argv, *(["--resume"] if resume else [])], 2, logs, env={"JAX_COMPILATION_CACHE_DIR": cache}) as ps:
        logged = ps.wait_for_step(workdir, after)
        at = ps.signal(signum, which)
        results = ps.finish(timeout=300)  # scaled for the machine by Processes.finish
    for r in results:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return Run(workdir, logged, at, results, committed_steps(os.path.join(workdir, "checkpoints")),
               read_metrics(workdir))  # fmt: skip


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory, cache_dir) -> Run:
    root = tmp_path_factory.mktemp("multihost")
    return _act(str(root / "run"), cache_dir, str(root / "logs_sigterm"), resume=False, after=2,
                signum=signal.SIGTERM, which=[1])  # fmt: skip


@pytest.fixture(scope="module")
def sigint_run(sigterm_run, cache_dir) -> Run:
    step = sigterm_run.checkpoints[-1]
    return _act(sigterm_run.workdir, cache_dir, sigterm_run.workdir + "_logs_sigint", resume=True, after=step + 1,
                signum=signal.SIGINT, which=None)  # fmt: skip


@pytest.fixture(scope="module")
def killed_run(sigint_run, cache_dir) -> Run:
    step = sigint_run.checkpoints[-1]
    return _act(sigint_run.workdir, cache_dir, sigint_run.workdir + "_logs_kill", resume=True, after=step + 1,
                signum=signal.SIGKILL, which=[1])  # fmt: skip


def _stopped_together(run: Run, status: int, what: str) -> int:
    """Asserts that both processes exited ``status`` with the same one line ("<what> at step N; checkpoint saved"),
    N being a step after the signal and the run's one new checkpoint; returns N."""
    assert [r.returncode for r in run.results] == [status, status]
    lines = [r.lines() for r in run.results]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    step = int(lines[0][0].split(" at step ")[1].split(";")[0])
    assert lines[0] == [f"wimfris train: {what} at step {step}; checkpoint saved in {run.workdir}/checkpoints"]
    assert run.signalled_after <= step <= run.signalled_after + 30  # the steps run while the notice travels (~1 s)
    assert run.checkpoints[-1] == step
    assert run.train_steps() == list(range(1, step + 1))  # each step logged once, resumed where it stopped
    return step


def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint(sigterm_run):
    step = _stopped_together(sigterm_run, 143, "terminated (SIGTERM)")
    assert sigterm_run.checkpoints == [step]


def _one_process(*argv: str) -> subprocess.CompletedProcess:
    """``wimfris ARGV`` as one process with one CPU device (no jax.distributed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=python_path())
    return subprocess.run([sys.executable, "-m", "wimfris_jax.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=limit(600))  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(sigterm_run, tmp_path_factory) -> tuple[str, list[dict]]:
    """The same run as ``sigterm_run``'s first act in one process (one device), to its stop step: workdir, metrics."""
    step = sigterm_run.checkpoints[0]
    workdir = str(tmp_path_factory.mktemp("one_process") / "run")
    train = [t for t in TRAIN if "steps_per_epoch" not in t] + [f"train.steps_per_epoch={step}"]
    r = _one_process("train", "--config", "configs/tiny.py", "--workdir", workdir,
                     *sets(*SMALL_MODEL, *train, "train.eval_max_examples=4"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, read_metrics(workdir)


def test_two_processes_train_as_one(sigterm_run, one_process_run):
    # one global order (data_pipeline/order.py): the same batches, so the same losses and the same weights
    step = sigterm_run.checkpoints[0]
    two = {r["step"]: r for r in sigterm_run.metrics if "train/loss" in r}
    one = {r["step"]: r for r in one_process_run[1] if "train/loss" in r}
    assert sorted(one) == list(range(1, step + 1))
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        np.testing.assert_allclose([one[s][key] for s in one], [two[s][key] for s in one], rtol=2e-5, err_msg=key)
    # the 2-process FSDP checkpoint restores here (one device, not its writers' layout) and equals the 1-process one
    mine, at = load_variables(os.path.join(sigterm_run.workdir, "checkpoints", str(step)))
    ref, ref_at = load_variables(one_process_run[0], "latest")
    assert at == ref_at == step
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves_with_path(ref)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat] and len(flat) > 100
    for (path, a), (_, b) in zip(flat, ref_flat):
        if "['key']['bias']" in jax.tree_util.keystr(path):  # softmax ignores it: its gradient is rounding noise,
            continue  # which Adam scales to full steps of either sign
        # within a fifth of one Adam step (lr 1e-3): rounding that flips a near-zero gradient's sign moves an
        # element by up to lr; a different batch would move most of them
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_a_two_process_fsdp_checkpoint_evaluates_in_one_process(sigterm_run):
    r = _one_process("eval", "--checkpoint", sigterm_run.workdir, "--step", str(sigterm_run.checkpoints[0]),
                     "--split", "val", "--max-examples", "8", "--batch-size", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mIoU" in r.stdout and "Traceback" not in r.stderr


def test_ctrl_c_to_every_process_saves_a_resumable_checkpoint(sigterm_run, sigint_run):
    step = _stopped_together(sigint_run, 130, "interrupted (SIGINT)")
    assert sigint_run.checkpoints == [sigterm_run.checkpoints[-1], step]


def test_a_killed_process_stops_the_other_in_one_line(sigint_run, killed_run):
    survivor, killed = killed_run.results
    assert killed.returncode == -signal.SIGKILL
    assert survivor.returncode == 1
    assert len(survivor.lines()) == 1, survivor.stderr[-3000:]
    assert survivor.lines()[0].startswith("wimfris train: error: another process of this run is gone (")
    assert survivor.lines()[0].endswith(f"this one stops too; last checkpoint: step {sigint_run.checkpoints[-1]}")
    assert survivor.ended - killed_run.signalled_at < LOST_BOUND_S
    assert killed_run.checkpoints == sigint_run.checkpoints  # nothing half-saved
    assert killed_run.train_steps()[: sigint_run.checkpoints[-1] + 1] == list(range(1, sigint_run.checkpoints[-1] + 2))
