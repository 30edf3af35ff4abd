"""One writer per run, readers that outlast a fast writer, SIGTERM, disk trouble (issue 20).

A second trainer on a locked workdir refuses in one line and changes nothing, not even a save in flight; the lock is
released when a run ends or crashes and a dead process's lock file blocks nothing; ``wimfris train`` saves and exits
143 on SIGTERM and resumes from there; a save that fails for a full disk, ``ulimit -f`` or a read-only folder ends
the run with one ``wimfris train: error:`` line naming the workdir and the last good checkpoint, which stays intact;
a reader whose step the run deletes while it reads gets the run's newest step instead."""

import errno
import fcntl
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, python_path
from limits import limit
from toy_model import run_toy_training, toy_config

from wimfris_jax import cli
from wimfris_jax.checkpoints import CheckpointError, CheckpointNotFound
from wimfris_jax.checkpoints import runs as checkpoint_reads
from wimfris_jax.checkpoints.runs import committed_steps, load_variables
from wimfris_jax.io import flatten
from wimfris_jax.train.hosts import StopAgreement, lost_process_error
from wimfris_jax.train.logging import read_metrics
from wimfris_jax.train.signals import StopSignals, TrainingInterrupted
from wimfris_jax.train.workdir import WorkdirInUse, WorkdirWriteError, hold_workdir, lock_path, write_failure

HOLDER = """import sys
from wimfris_jax.train.workdir import hold_workdir
with hold_workdir(sys.argv[1]):
    print("LOCKED", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return env


def _tree(root) -> list[tuple[str, int, int, bytes]]:
    """(path, size, mtime, content of files) of everything under ``root``: equal when nothing was changed."""
    out = []
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            st = os.stat(path)
            data = pathlib.Path(path).read_bytes() if name in files else b""
            out.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns, data))
    return sorted(out)


def _lock_info(workdir) -> dict:
    return json.loads(pathlib.Path(lock_path(workdir)).read_text())


def _is_free(workdir) -> bool:
    """Whether the OS lock of ``workdir`` is free (a new open file description: independent of this process's
    bookkeeping of the locks it holds)."""
    fd = os.open(lock_path(workdir), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.fixture
def holder():
    """``holder(workdir)``: a subprocess holding the workdir's lock (returned once it holds it)."""
    procs = []

    def start(workdir):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=_env())  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "LOCKED"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished toy run of 4 steps saved every 2: checkpoints/2 and /4."""
    d = tmp_path_factory.mktemp("safety") / "run"
    run_toy_training(str(d), toy_config(epochs=1, ckpt_every=2))
    return d


# -- the lock ---------------------------------------------------------------------------------------------------
def test_lock_is_reentrant_in_its_thread_and_refuses_others(tmp_path):
    workdir = tmp_path / "run"
    with hold_workdir(workdir):
        info = _lock_info(workdir)
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", info["since"])
        with hold_workdir(workdir):  # wimfris demo holds it around train(), which takes it again
            assert not _is_free(workdir)
        assert not _is_free(workdir)  # still held by the outer block
        refused = []

        def other_thread():
            try:
                with hold_workdir(workdir):
                    pass
            except WorkdirInUse as e:
                refused.append(str(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert refused == [f"{workdir} is in use by another training run (pid {os.getpid()} on host "
                           f"{socket.gethostname()} since {info['since']}); wait for it to end or use another "
                           "--workdir"]  # fmt: skip
    assert _is_free(workdir) and pathlib.Path(lock_path(workdir)).read_text() == ""  # released and emptied
    assert lock_path(workdir, 3) == f"{workdir}/.lock.3"  # multi-host: one lock file per process


def test_a_lock_file_of_a_dead_process_blocks_nothing(tmp_path, holder):
    workdir = tmp_path / "run"
    proc = holder(workdir)
    assert not _is_free(workdir)
    proc.kill()  # SIGKILL: no clean-up; the lock file keeps its details
    proc.wait(30)
    assert _lock_info(workdir)["pid"] == proc.pid
    with hold_workdir(workdir):  # the OS dropped the dead process's lock
        assert _lock_info(workdir)["pid"] == os.getpid()
    with open(lock_path(workdir), "w") as f:  # the details of a dead process, left by a crash before its release
        json.dump({"pid": proc.pid, "host": socket.gethostname(), "since": "2020-01-01 00:00:00"}, f)
    with hold_workdir(workdir):
        pass


def test_a_second_trainer_refuses_and_changes_nothing(toy_run, tmp_path, holder, capsys):
    """A live run (its lock held by another process) with a save in flight: neither a fresh run, a resume nor
    ``wimfris train`` touch a file; each refuses in one line naming the workdir and the live run."""
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    in_flight = run / "checkpoints" / "6.orbax-checkpoint-tmp-1733333333"  # orbax cleans those up when it opens
    shutil.copytree(run / "checkpoints" / "4", in_flight)
    proc = holder(run)
    before = _tree(run)
    since = _lock_info(run)["since"]
    message = (f"{run} is in use by another training run (pid {proc.pid} on host {socket.gethostname()} since "
               f"{since}); wait for it to end or use another --workdir")  # fmt: skip
    for resume in (False, True):
        with pytest.raises(WorkdirInUse) as info:
            run_toy_training(str(run), toy_config(epochs=2, ckpt_every=2, resume=resume))
        assert str(info.value) == message
        assert _tree(run) == before
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    capsys.readouterr()
    assert cli.main(["train", "--config", tiny, "--workdir", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"wimfris train: error: {message}"]
    assert _tree(run) == before

    proc.stdin.close()  # the live run ends: the lock is free, the workdir can be resumed
    proc.wait(30)
    assert int(run_toy_training(str(run), toy_config(epochs=2, ckpt_every=2, resume=True)).step) == 8
    assert committed_steps(run / "checkpoints") == [6, 8] and not in_flight.exists()
    assert _is_free(run)


def test_the_lock_is_released_when_a_run_crashes(tmp_path):
    def crash_at_2(state):
        if int(state.step) == 2:
            raise RuntimeError("evaluation crashed")
        return {"mIoU": 0.0}

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_toy_training(str(tmp_path), toy_config(epochs=1, ckpt_every=2, eval_every=2), eval_fn=crash_at_2)
    assert _is_free(tmp_path)
    assert committed_steps(tmp_path / "checkpoints") == [2]
    assert int(run_toy_training(str(tmp_path), toy_config(epochs=1, resume=True)).step) == 4
    assert _is_free(tmp_path)


# -- SIGTERM ----------------------------------------------------------------------------------------------------
def _wait_for_a_logged_step(proc, run) -> None:
    t0 = time.time()
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300, "no step logged after 300 s"
        time.sleep(0.05)


def _terminated(proc, run) -> tuple[int, str]:
    """Sends SIGTERM to ``wimfris train`` once it logged a step; checks its one line and exit status 143 and the
    checkpoint it saved; returns the step it stopped at and its stderr."""
    try:
        _wait_for_a_logged_step(proc, run)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=limit(120))
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in err.splitlines() if line.startswith("wimfris ")]
    assert proc.returncode == 143 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    step = int(re.fullmatch(rf"wimfris train: terminated \(SIGTERM\) at step (\d+); checkpoint saved in "
                            rf"{re.escape(str(run))}/checkpoints", lines[0]).group(1))  # fmt: skip
    assert step >= 1 and committed_steps(run / "checkpoints") == [step] and _is_free(run)
    return step, err


def test_sigterm_saves_and_exits_143_in_one_line(tmp_path):
    """The toy model through ``wimfris train``'s error handling; then the run resumes from the step saved."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, __file__, "sigterm", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    step, err = _terminated(proc, run)
    assert [line for line in err.splitlines() if line.strip() and not line.startswith("train:")] == [
        f"wimfris train: terminated (SIGTERM) at step {step}; checkpoint saved in {run}/checkpoints"
    ]  # nothing else but the progress bar
    run_toy_training(str(run), toy_config(epochs=1, steps_per_epoch=step + 2, resume=True))
    assert [row["step"] for row in read_metrics(run) if "train/loss" in row] == list(range(1, step + 3))
    assert committed_steps(run / "checkpoints")[-1] == step + 2


@pytest.mark.slow
def test_wimfris_train_sigterm_then_resume(tmp_path):
    """``wimfris train`` (the quick demo config, projector alone trainable) gets SIGTERM after its first logged step:
    it ends the step in flight, saves it, prints one line, exits 143; ``--resume`` goes on from that step."""
    run = tmp_path / "run"
    config = os.path.join(ROOT, "configs", "demo.py") + ":quick"
    sets = [a for kv in ("train.global_batch_size=2", "train.log_every=1", "train.ckpt_every=1000",
                         "train.trainable=('^projector/',)", "data.num_val=1", "train.eval_batch_size=1")
            for a in ("--set", kv)]  # fmt: skip
    command = [sys.executable, "-m", "wimfris_jax.cli", "train", "--config", config, "--workdir", str(run), *sets]
    proc = subprocess.Popen([*command, "--set", "train.steps_per_epoch=1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    step, _ = _terminated(proc, run)
    r = subprocess.run([*command, "--resume", "--set", f"train.steps_per_epoch={step + 1}"], capture_output=True,
                       text=True, timeout=limit(600), env=_env())  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [row["step"] for row in read_metrics(run) if "train/loss" in row] == list(range(1, step + 2))
    assert committed_steps(run / "checkpoints")[-1] == step + 1


def test_training_interrupted_carries_the_exit_status():
    e = TrainingInterrupted(signal.SIGTERM)
    assert isinstance(e, KeyboardInterrupt) and e.exit_status == 143 and str(e) == "terminated (SIGTERM)"
    assert TrainingInterrupted(signal.SIGINT, "interrupted (SIGINT) at step 3").exit_status == 130


def test_stop_signals_forward_the_first_signal_and_raise_the_second_at_once():
    """The first SIGINT sets the flag and runs ``on_first`` (a multi-process run forwards it to JAX's preemption
    notifier); ``check`` raises it between steps (orderly); a second one raises at once (not orderly); the handler in
    place before is back afterwards. One process: :class:`StopAgreement` is plain StopSignals, and a lost-process
    error is never reported (no other process)."""
    forwarded = []
    before = signal.getsignal(signal.SIGINT)
    with StopAgreement() as agreement:
        assert not agreement.multi and agreement.signals.signals == (signal.SIGINT, signal.SIGTERM)
    with StopSignals((signal.SIGINT,), on_first=forwarded.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert forwarded == [signal.SIGINT] and stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted) as first:
            stop.check()
        assert first.value.orderly and first.value.exit_status == 130
        with pytest.raises(TrainingInterrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert not second.value.orderly and forwarded == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
    assert lost_process_error(RuntimeError("Gloo all-reduce failed: Connection closed by peer"), "/nowhere") is None


# -- disk trouble -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_save_stops_in_one_line_with_the_last_good_checkpoint(code, tmp_path, monkeypatch, caplog, capfd):
    """A save that fails in orbax's writer thread (the "meta" item of the step-4 save here; a full disk, a folder
    turned read-only, a permission taken away) stops the run with one error naming the workdir, the reason and the
    last good step; nothing is logged with a traceback, the failed save is removed, the lock released."""
    save = ocp.JsonCheckpointHandler._save_fn
    calls = []

    async def failing_save(self, x, directory):
        calls.append(directory)
        if len(calls) > 1:  # the first save (step 2) succeeds
            raise OSError(code, os.strerror(code), os.path.join(str(directory), "meta"))
        return await save(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing_save)
    with pytest.raises(WorkdirWriteError) as info:
        run_toy_training(str(tmp_path), toy_config(epochs=2, ckpt_every=2))
    assert str(info.value) == (f"cannot write to {tmp_path} ({os.strerror(code)}); training stopped, the last good "
                               f"checkpoint: step 2 ({tmp_path}/checkpoints/2)")  # fmt: skip
    assert os.listdir(tmp_path / "checkpoints") == ["2"] and _is_free(tmp_path)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40], caplog.text[-3000:]
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.undo()
    variables, step = load_variables(tmp_path, "latest")
    assert step == 2 and all(np.isfinite(v).all() for v in flatten(variables).values())


def test_a_file_size_limit_during_a_save_is_one_line(toy_run, tmp_path):
    """``ulimit -f`` (EFBIG, in a real orbax save: TensorStore reports it in a ValueError) in a resumed run: exit
    status 1, one ``wimfris train: error:`` line, no traceback; checkpoint 4 intact, and the run resumes from it."""
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    r = subprocess.run([sys.executable, __file__, "efbig", str(run), "4096"], capture_output=True, text=True,
                       timeout=limit(300), env=_env())  # fmt: skip
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("train:")]  # no bar
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines == [f"wimfris train: error: cannot write to {run} (File too large); training stopped, the last good "
                     f"checkpoint: step 4 ({run}/checkpoints/4)"]  # fmt: skip
    assert committed_steps(run / "checkpoints") == [2, 4] and _is_free(run)
    assert int(run_toy_training(str(run), toy_config(epochs=2, ckpt_every=2, resume=True)).step) == 8


def test_write_failure_tells_a_failed_write_into_the_workdir():
    w = "/runs/a"
    wrapped = ValueError(f'OUT_OF_RANGE: Error writing "x" in OCDBT database at local file "{w}/checkpoints/3": '
                         "Failed to write 687304 bytes to file 8: File too large [os_error_code='27']")  # fmt: skip
    assert write_failure(wrapped, w) == "File too large"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("finalize failed") from e
    except RuntimeError as e:
        chained = e
    assert write_failure(chained, w) == "No space left on device"
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", f"{w}/best/4"), w) == "Permission denied"
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", "/data/img.png"), w) is None  # a read
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", "/runs/ab/x"), w) is None
    assert write_failure(ValueError("NOT_FOUND: no such file"), w) is None and write_failure(None, w) is None


# -- readers of a run that deletes what they read ---------------------------------------------------------------
def _race(run, monkeypatch, rounds):
    """Makes the next ``rounds`` reads race the writer: as each starts, the run commits a newer step (a copy of
    the newest) and deletes the one being read: its files at once, its folders 0.2 s later (as orbax's deleter)."""
    read, folders = checkpoint_reads._read, []

    def racing_read(fn, folder):
        folders.append(folder)
        if len(folders) <= rounds:
            newest = max(committed_steps(run / "checkpoints"))
            shutil.copytree(run / "checkpoints" / str(newest), run / "checkpoints" / str(newest + 2))
            for d, _, files in os.walk(folder):
                for name in files:
                    os.remove(os.path.join(d, name))
            threading.Timer(0.2, shutil.rmtree, [folder]).start()
        return read(fn, folder)

    monkeypatch.setattr(checkpoint_reads, "_read", racing_read)
    return folders


def test_a_reader_whose_step_vanishes_reads_the_newest_intact_one(toy_run, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    want = load_variables(toy_run, 4)[0]
    folders = _race(run, monkeypatch, rounds=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a step the run deleted is not a damaged checkpoint: no warning
        variables, step = load_variables(run, "latest")
    assert step == 8 and folders == [f"{run}/checkpoints/{s}" for s in (4, 6, 8)]
    for k, v in flatten(variables).items():
        np.testing.assert_array_equal(v, flatten(want)[k], err_msg=k)  # step 8 is a copy of 4

    _race(run, monkeypatch, rounds=1)  # a step asked for by number is never replaced by another
    with pytest.raises(CheckpointNotFound, match=rf"^{run}/checkpoints/8 was deleted by its training run while read"):
        load_variables(run, 8)

    monkeypatch.setattr(checkpoint_reads, "VANISHED_RETRIES", 3)
    _race(run, monkeypatch, rounds=3)  # bounded: a run that always deletes the step being read
    with pytest.raises(CheckpointError, match=rf"^the newest checkpoint of {run} was deleted .* 3 times in a row"):
        load_variables(run)
    time.sleep(0.3)  # the last racing deletion
    gc.collect()  # the abandoned reads of the failed ones are reported when collected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-3000:]


def _toy_cli_worker(mode: str, workdir: str, limit: int = 0) -> None:
    """Subprocess: ``wimfris train`` with the toy model in place of the config's (``cmd_train`` replaced, the rest
    of the command as it is). "sigterm": a long run from scratch, logging every step. "efbig": ``--resume`` for 4 more
    steps saved every 2 under a file size limit of ``limit`` bytes (SIGXFSZ ignored: writes fail with EFBIG)."""
    if mode == "efbig":
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    config = toy_config(epochs=2, ckpt_every=2, resume=True) if mode == "efbig" else toy_config(epochs=10_000)
    cli.cmd_train = lambda args: run_toy_training(args.workdir, config)
    sys.exit(cli.main(["train", "--config", "toy", "--workdir", workdir] + (["--resume"] if mode == "efbig" else [])))


if __name__ == "__main__":
    _toy_cli_worker(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
