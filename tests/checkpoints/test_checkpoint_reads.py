"""Reading checkpoints never writes: a run is loaded (``load_model``, ``wimfris predict``) while it trains and saves
every step, and the training finishes with all its checkpoints; read commands on foreign directories create
nothing; a damaged newest (or best) checkpoint falls back to the newest intact one with a one-line warning, an
explicitly asked step does not; resuming after a model change names the first mismatching array."""

import os
import re
import shutil
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest
from helpers import ROOT, python_path
from limits import limit
from PIL import Image
from toy_model import run_toy_training, toy_config

from wimfris_jax import cli
from wimfris_jax.checkpoints import CheckpointError, CheckpointFallbackWarning, CheckpointMismatch, CheckpointNotFound
from wimfris_jax.checkpoints.runs import committed_steps, load_variables
from wimfris_jax.io import flatten

TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 24  # of the watched run: a checkpoint each step, the last 2 kept, a new best every 3 steps


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)  # one CPU device: the batch of 2 is not split over conftest's 8
    return env


def _tree(root) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of everything under ``root``: equal before and after a read that wrote nothing."""
    out = []
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(d, name))
            out.append((os.path.relpath(os.path.join(d, name), root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _train_tiny(workdir: str, steps: int) -> None:
    """Subprocess worker: the tiny model (projector alone trainable, so it compiles in seconds), batch 2, a
    checkpoint every step and an evaluation every 3 steps that always improves (a new best/ each time)."""
    from wimfris_jax.config import load_config
    from wimfris_jax.train.loop import train

    config = load_config(TINY)
    config.data.num_train = 8
    config.train.update(global_batch_size=2, epochs=1, steps_per_epoch=steps, ckpt_every=1, keep_last=2,
                        eval_every=3, log_every=1, trainable=("^projector/",))  # fmt: skip
    state = train(config, workdir, eval_fn=lambda s: {"mIoU": int(s.step) / 100})
    print("TRAINED", int(state.step), flush=True)


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A tiny run trained in a subprocess while this process loads it with ``load_model`` in a loop and a
    ``wimfris predict`` subprocess reads it; returns what each of them did."""
    from wimfris_jax import load_model
    from wimfris_jax.predict import find_config

    d = tmp_path_factory.mktemp("watched")
    run, image = d / "run", d / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(image)
    trainer = subprocess.Popen([sys.executable, __file__, str(run), str(STEPS)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_env())  # fmt: skip
    predictor, loads, log = None, [], []
    try:
        t0 = time.time()
        while not (committed_steps(run / "checkpoints") and (run / "config.json").is_file()):
            assert trainer.poll() is None, trainer.stdout.read()
            assert time.time() - t0 < 180, "no checkpoint after 180 s"
            time.sleep(0.1)
        predictor = subprocess.Popen(
            [sys.executable, "-m", "wimfris_jax.cli", "predict", "--checkpoint", str(run), "--image", str(image),
             "--text", "the red circle", "--out", str(d / "out")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )  # fmt: skip
        config = find_config(str(run))
        while trainer.poll() is None:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                model, variables = load_model(config, str(run))
            loads.append(trainer.poll() is None)  # whether the training was still running after this load
            log += [str(w.message) for w in seen]
        out, _ = trainer.communicate(timeout=limit(120))
        p_out, p_err = predictor.communicate(timeout=limit(300))
    finally:
        for proc in (trainer, predictor):
            if proc is not None and proc.poll() is None:
                proc.kill()
    return types.SimpleNamespace(run=run, out=d / "out", trainer=(trainer.returncode, out), loads=loads,
                                 warnings=log, predict=(predictor.returncode, p_out, p_err))  # fmt: skip


def test_training_saves_every_step_while_read(watched_run):
    code, out = watched_run.trainer
    assert code == 0 and f"TRAINED {STEPS}" in out and "Traceback" not in out, out[-3000:]
    run = watched_run.run
    assert committed_steps(run / "checkpoints") == [STEPS - 1, STEPS]
    assert committed_steps(run / "best") == [STEPS // 3 * 3]
    assert not [n for sub in ("checkpoints", "best") for n in os.listdir(run / sub) if not n.isdigit()]
    assert sum(watched_run.loads) >= 2, watched_run.loads  # loaded while it trained
    code, p_out, p_err = watched_run.predict
    assert code == 0 and "Traceback" not in p_err, p_err[-3000:]
    assert (watched_run.out / "photo_mask.png").is_file() and "photo.png: mask" in p_out


def _cli(capsys, *args):
    """``wimfris ARGS`` in this process: (exit status, stdout, the stderr lines of wimfris itself)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, [line for line in err.splitlines() if line.startswith("wimfris ")]


def test_cli_reads_a_step_folder_and_falls_back_from_damage(watched_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(watched_run.run, run)
    image = watched_run.out.parent / "photo.png"
    best, last = committed_steps(run / "best")[0], STEPS
    predict = ["predict", "--image", image, "--text", "the red circle", "--out", tmp_path / "out"]

    before = _tree(run)  # a step folder is read as the one checkpoint it holds; nothing is written into the run
    code, out, err = _cli(capsys, *predict, "--checkpoint", run / "checkpoints" / str(last - 1))
    assert code == 0 and err == [] and "photo.png: mask" in out
    assert _tree(run) == before

    shutil.rmtree(run / "best" / str(best) / "state" / "d")  # best and latest damaged: the older one is read
    os.remove(run / "checkpoints" / str(last) / "state" / "_METADATA")
    code, out, err = _cli(capsys, *predict, "--checkpoint", run)
    assert code == 0 and "photo.png: mask" in out and len(err) == 1, err
    assert err[0].startswith(f"wimfris predict: warning: skipped 2 damaged checkpoint(s), loaded {run}/checkpoints/"
                             f"{last - 1} instead; {run}/best/{best} is damaged or incomplete (")  # fmt: skip
    code, out, err = _cli(capsys, *predict, "--checkpoint", run, "--step", last)  # asked for: no fallback
    assert code == 1 and err == [f"wimfris predict: error: {run}/checkpoints/{last} is damaged or incomplete "
                                 f"(FileNotFoundError: Metadata file (named _METADATA) does not exist at "
                                 f"{run}/checkpoints/{last}/state.)"]  # fmt: skip
    code, out, err = _cli(capsys, "eval", "--checkpoint", run, "--step", "latest", "--split", "val",
                          "--max-examples", 2, "--batch-size", 2)  # fmt: skip
    assert code == 0 and "mIoU" in out and len(err) == 1 and f"loaded {run}/checkpoints/{last - 1} instead" in err[0]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished toy run: checkpoints/6 and /8 (the last 2 of a save every 2 steps), best/4 (mIoU 0.6)."""
    d = tmp_path_factory.mktemp("toy") / "run"
    scores = iter([0.2, 0.6, 0.4, 0.5])
    run_toy_training(str(d), toy_config(ckpt_every=2, eval_every=2), eval_fn=lambda s: {"mIoU": next(scores)})
    return d


def _assert_same(a, b):
    assert flatten(a).keys() == flatten(b).keys()
    for k, v in flatten(a).items():
        np.testing.assert_array_equal(v, flatten(b)[k], err_msg=k)


def test_damaged_checkpoints_fall_back_to_the_newest_intact(toy_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    intact = {s: load_variables(toy_run, s)[0] for s in (4, 6, 8)}
    unfinished = run / "checkpoints" / "9.orbax-checkpoint-tmp"  # a save in progress: never read, never removed
    shutil.copytree(run / "checkpoints" / "8", unfinished)
    before, unfinished_before = _tree(run), _tree(unfinished)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact checkpoints: no warning
        assert [load_variables(run, w)[1] for w in ("auto", "best", "latest", 6, "8")] == [4, 4, 8, 6, 8]
        assert load_variables(run / "best" / "4")[1] == 4 and load_variables(run / "checkpoints" / "6", 6)[1] == 6
    assert _tree(run) == before

    shutil.rmtree(run / "best" / "4" / "state" / "d")  # damaged best -> the latest intact
    r = re.escape(str(run))
    message = rf"^skipped 1 damaged .*, loaded {r}/checkpoints/8 instead; {r}/best/4 is damaged or incomplete \(ValueE"
    with pytest.warns(CheckpointFallbackWarning, match=message):
        variables, step = load_variables(run)
    assert step == 8
    _assert_same(variables, intact[8])
    with pytest.raises(CheckpointError, match=rf"^{r}/best/4 is damaged or incomplete \(ValueError: [^\n]*\)$"):
        load_variables(run, "best")  # best asked for: not replaced by another series

    shutil.rmtree(run / "checkpoints" / "8" / "state" / "ocdbt.process_0")  # damaged latest -> the older one
    for which in ("auto", "latest"):
        with pytest.warns(CheckpointFallbackWarning, match=rf"loaded {r}/checkpoints/6 instead"):
            variables, step = load_variables(run, which)
        assert step == 6
        _assert_same(variables, intact[6])
    with pytest.raises(CheckpointError, match=rf"^{r}/checkpoints/8 is damaged or incomplete \(Exception: "):
        load_variables(run, 8)  # a step asked for by number: an error, not a silent fallback
    assert _tree(unfinished) == unfinished_before  # the save in progress was neither read nor cleaned up

    os.remove(run / "checkpoints" / "6" / "state" / "_METADATA")
    with pytest.raises(CheckpointError, match=rf"^no intact checkpoint 'auto' in {r}: {r}/best/4 is damaged"):
        load_variables(run)


def test_a_checkpoint_deleted_while_read_is_not_damage(toy_run, tmp_path, monkeypatch):
    """The run deletes its old checkpoints (keep-last, a new best) while a reader may be reading one: the reader
    lists the run again and reads what is there now, without a warning."""
    from wimfris_jax.checkpoints import runs as checkpoint_reads

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    read = checkpoint_reads._read

    def read_while_the_run_deletes(fn, folder):
        if folder.endswith("best/4"):
            shutil.rmtree(folder)
        return read(fn, folder)

    monkeypatch.setattr(checkpoint_reads, "_read", read_while_the_run_deletes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_variables(run)[1] == 8


def test_foreign_directories_are_refused_and_left_untouched(toy_run, tmp_path):
    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    (half / "checkpoints" / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    before = _tree(tmp_path), _tree(toy_run)
    for path, error, message in [
        (empty, CheckpointError, f"{empty} is not a training run (no checkpoints/ or best/ in it) nor a step folder"),
        (toy_run / "checkpoints", CheckpointError, "is not a training run"),
        (half, CheckpointNotFound, f"no checkpoint 'auto' in {half}; committed steps: []"),
        (half / "checkpoints" / "3.orbax-checkpoint-tmp", CheckpointError, "is an unfinished checkpoint"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            load_variables(path)
    with pytest.raises(CheckpointNotFound, match=r"no checkpoint 7 in .*; committed steps: \[6, 8\]"):
        load_variables(toy_run, 7)
    with pytest.raises(CheckpointError, match="expected 'auto', 'best', 'latest' or a step number"):
        load_variables(toy_run, "newest")
    with pytest.raises(CheckpointError, match="is a single checkpoint; step 'best' applies to a run directory"):
        load_variables(toy_run / "checkpoints" / "6", "best")
    assert (_tree(tmp_path), _tree(toy_run)) == before and os.listdir(empty) == []


def test_resume_after_a_model_change_names_the_first_mismatching_array(toy_run, tmp_path):
    from toy_model import ToyModel, ToySource, identity_transform, toy_loss

    from wimfris_jax.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    with pytest.raises(CheckpointMismatch) as info:
        train(toy_config(resume=True, epochs=3), run, model=ToyModel(width=8), loss_fn=toy_loss,
              train_source=ToySource(64, 16, 4), transform=identity_transform)  # fmt: skip
    message = str(info.value)
    assert message.startswith(f"{run}/checkpoints/8 does not fit the model (was the model config changed")
    assert message.endswith("batch_stats/neck_bn/mean is (16,) in the checkpoint, (8,) in the model; "
                            "16 more array(s) differ")  # fmt: skip
    assert "\n" not in message and committed_steps(run / "checkpoints") == [6, 8]


if __name__ == "__main__":
    _train_tiny(sys.argv[1], int(sys.argv[2]))
