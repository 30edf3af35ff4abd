"""The ``wimfris`` command line: argument errors, config overrides, and predict's one-line errors on bad input
(missing file, not an image, empty sentence, missing checkpoint), run as a user runs it, in a subprocess."""

import collections
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest
from helpers import ROOT, TESTS, python_path
from limits import limit

from wimfris_jax import cli
from wimfris_jax import config as config_lib
from wimfris_jax.errors import describe, is_user_error


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (not conftest's 8)
    command = [sys.executable, "-m", "wimfris_jax.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=limit(timeout), env=env)


def _config():
    return ml_collections.ConfigDict(
        {"seed": 0, "train": {"lr": 1e-4, "epochs": 50, "trainable": ("a",), "resume": False}, "data": {"name": "x"}}
    )


def test_overrides_parse_and_coerce():
    overrides = ["train.lr=2", "train.epochs=3", "train.trainable=['.*']", "data.name=refer", "train.resume=True"]
    overrides.append("seed=7")
    c = config_lib.apply_overrides(_config(), overrides)
    assert c.train.lr == 2.0 and isinstance(c.train.lr, float)
    assert c.train.epochs == 3 and c.train.trainable == (".*",) and c.data.name == "refer"
    assert c.train.resume is True and c.seed == 7
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'train.lrr'.*epochs, lr"):
        config_lib.apply_overrides(_config(), ["train.lrr=1"])
    with pytest.raises(config_lib.ConfigError, match="not KEY=VALUE"):
        config_lib.apply_overrides(_config(), ["train.lr"])
    with pytest.raises(config_lib.ConfigError, match=r"cannot set train.epochs='many'"):
        config_lib.apply_overrides(_config(), ["train.epochs=many"])


def test_config_flags_become_overrides():
    rest, found = cli._split_config_flags(["train", "--config", "c.py", "--config.train.lr=1e-3", "--config.seed", "3"])
    assert rest == ["train", "--config", "c.py"] and found == ["train.lr=1e-3", "seed=3"]


def test_console_script_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        scripts = f.read().split("[project.scripts]")[1].split("[")[0]  # tomllib is Python >= 3.11 only
    module, func = re.search(r'^wimfris\s*=\s*"([\w.]+):(\w+)"', scripts, re.M).groups()
    assert (module, func) == ("wimfris_jax.cli", "main")
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0


def _main(capsys, *args):
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_argument_errors_exit_2(capsys):
    code, err = _main(capsys)
    assert code == 2 and "usage: wimfris" in err and "COMMAND" in err
    code, err = _main(capsys, "eval", "--config", "configs/tiny.py")
    assert code == 2 and "--checkpoint" in err
    code, err = _main(capsys, "predict", "--checkpoint", "x", "--image", "a.png", "--out", "o")
    assert code == 2 and "--text" in err
    code, err = _main(capsys, "summary", "--config", "configs/tiny.py", "--config.train.lr=1")
    assert code == 2 and "summary takes no config overrides" in err


def test_bad_override_and_missing_config_fail_cleanly(capsys, tmp_path):
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    code, err = _main(capsys, "train", "--config", tiny, "--workdir", str(tmp_path), "--set", "train.nonsense=1")
    assert code == 1 and err.strip().splitlines() == [err.strip()]
    assert err.startswith("wimfris train: error: unknown config key 'train.nonsense'")
    code, err = _main(capsys, "train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path))
    assert code == 1 and "none.py" in err and len(err.strip().splitlines()) == 1
    code, err = _main(capsys, "train", "--config", tiny, "--workdir", str(tmp_path), "--init", "text_encoder")
    assert code == 1 and "is not SUBTREE=SOURCE" in err


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_inputs")
    (d / "notes.png").write_text("this is not an image")
    from PIL import Image

    Image.new("RGB", (20, 10), (200, 30, 30)).save(d / "ok.png")
    from fake_images import header_only_png

    (d / "bomb.png").write_bytes(header_only_png(50000, 50000))  # OpenCV: a traceback; 20000 x 20000: > 9 GB
    (d / "empty").mkdir()
    ckpt = d / "run"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize(
    "image, text, checkpoint, message",
    [
        ("missing.png", "the red circle", "run", "no such image file or folder: {d}/missing.png"),
        ("notes.png", "the red circle", "run", "{d}/notes.png is not a readable image"),
        ("bomb.png", "the red circle", "run", "{d}/bomb.png: 50000 x 50000 pixels (2500.0 Mpx) is above the limit"),
        ("ok.png", "   ", "run", "empty sentence '   '"),
        ("empty", "the red circle", "run", "folder {d}/empty holds no image file"),
        ("ok.png", "the red circle", "no_run", "no such checkpoint: {d}/no_run"),
    ],
)
def test_predict_bad_input_one_line(bad_inputs, tmp_path, image, text, checkpoint, message):
    d = str(bad_inputs)
    r = run_cli("predict", "--checkpoint", os.path.join(d, checkpoint), "--image", os.path.join(d, image),
                "--text", text, "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("wimfris predict: error: ") and message.format(d=d) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_train_init_refuses_a_file_that_does_not_fit(tmp_path, capsys):
    """``--init text_encoder=FILE`` with a converted file for another model fails naming the subtree and the
    mismatch, before the workdir is made (a run from files that fit: tests/commands/test_weights_cli.py)."""
    import jax
    import numpy as np

    from wimfris_jax.backbones.clip_text import ClipText
    from wimfris_jax.config import load_config
    from wimfris_jax.io import save_params

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    text_fields = dict(load_config(tiny).model.text)
    params = jax.eval_shape(ClipText(**text_fields).init, jax.random.key(7), np.zeros((1, 17), np.int32))["params"]
    bad = {k: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v) for k, v in params.items() if k != "ln_final"}
    save_params(tmp_path / "bad.msgpack", bad, {"family": "clip", "config": text_fields})
    init = f"text_encoder={tmp_path}/bad.msgpack"
    code, err = _main(capsys, "train", "--config", tiny, "--workdir", str(tmp_path / "run"), "--init", init)
    assert code == 1 and "model subtree 'text_encoder'" in err and "ln_final" in err
    assert not (tmp_path / "run").exists()


def _read_only_dir(tmp_path):
    """A folder in which nothing can be created: a chmod 500 folder, or /sys for root (who ignores the mode)."""
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").touch()
    except PermissionError:
        return d
    (d / "probe").unlink()
    try:
        os.makedirs("/sys/wimfris_probe")
    except OSError:
        return "/sys"
    os.rmdir("/sys/wimfris_probe")
    pytest.skip("no read-only folder on this machine")


@pytest.fixture(scope="module")
def user_error_inputs(tmp_path_factory):
    """Files for each kind of bad input: a tiny parameter file (never read: the errors come first), a truncated
    and a random-bytes .msgpack, an image, an empty folder, a refer layout whose refs pickle names a class."""
    import pickle

    import numpy as np
    from PIL import Image

    from wimfris_jax.io import save_params

    d = tmp_path_factory.mktemp("user_errors")
    save_params(d / "weights.msgpack", {"w": np.zeros((64, 64), np.float32)}, {})
    data = (d / "weights.msgpack").read_bytes()
    (d / "truncated.msgpack").write_bytes(data[: len(data) // 2])
    (d / "random.msgpack").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("RGB", (20, 10), (200, 30, 30)).save(d / "ok.png")
    from fake_images import header_only_png

    (d / "bomb.png").write_bytes(header_only_png(50000, 50000))  # OpenCV: a traceback; 20000 x 20000: > 9 GB
    (d / "foreign").mkdir()
    (d / "refer" / "images" / "mscoco" / "images" / "train2014").mkdir(parents=True)
    (d / "refer" / "refcoco").mkdir()
    (d / "refer" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=2))
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of the tiny config after 1 step (the worker of tests/checkpoints/test_checkpoint_reads.py: projector
    trainable)."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)
    worker = os.path.join(TESTS, "checkpoints", "test_checkpoint_reads.py")
    r = subprocess.run([sys.executable, worker, str(run), "1"], capture_output=True, text=True, timeout=limit(300),
                       env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


TINY = os.path.join(ROOT, "configs", "tiny.py")
TRAIN_SMALL = ["--set", "train.global_batch_size=2", "--set", "data.num_train=2", "--set", "train.eval_every_epochs=0",
               "--set", "train.log_every=1", "--set", "train.trainable=('^projector/',)"]  # fmt: skip
# name: (arguments, with {d} the inputs, {ro} a read-only folder, {run} a copy of tiny_run; exit status; message)
USER_ERRORS = {
    "non-finite loss": (["train", "--config", TINY, "--workdir", "{tmp}/run", *TRAIN_SMALL, "--set", "train.epochs=4",
                         "--set", "train.lr=1e30"], 1, r"non-finite loss=nan.* at step \d+; training stopped"),
    "truncated msgpack": (["predict", "--config", TINY, "--checkpoint", "{d}/truncated.msgpack", "--image",
                           "{d}/ok.png", "--text", "a cat", "--out", "{tmp}/out"], 1,
                          r"{d}/truncated.msgpack is not a parameter file written by save_params \(ValueError: "),
    "random-bytes msgpack": (["eval", "--config", TINY, "--checkpoint", "{d}/random.msgpack", "--split", "val"], 1,
                             r"{d}/random.msgpack is not a parameter file written by save_params \("),
    "read-only --workdir": (["train", "--config", TINY, "--workdir", "{ro}/run"], 1, r"{ro}/run: \w"),
    "read-only --out": (["predict", "--config", TINY, "--checkpoint", "{d}/weights.msgpack", "--image", "{d}/ok.png",
                         "--text", "a cat", "--out", "{ro}/out"], 1, r"--out {ro}/out is not a writable folder \(\w"),
    "read-only --json": (["eval", "--config", TINY, "--checkpoint", "{d}/weights.msgpack", "--split", "val", "--json",
                          "{ro}/scores.json"], 1, r"--json {ro}/scores.json cannot be written \(folder {ro}: \w"),
    "misspelt --split": (["eval", "--config", TINY, "--checkpoint", "{d}/weights.msgpack", "--split", "vall"], 1,
                         r"synthetic data: unknown split 'vall'; choose from \["),
    "refused refs pickle": (["eval", "--config", TINY, "--checkpoint", "{d}/weights.msgpack", "--split", "val",
                             "--set", "data.name=refer", "--set", "data.data_root={d}/refer"], 1,
                            r"{d}/refer/refcoco/refs\(unc\).p: refusing to load class collections.OrderedDict"),
    "not a run": (["predict", "--config", TINY, "--checkpoint", "{d}/foreign", "--image", "{d}/ok.png", "--text",
                   "a cat", "--out", "{tmp}/out"], 1, r"{d}/foreign is not a training run \(no checkpoints/ or best/"),
    "resume after a model change": (["train", "--config", TINY, "--workdir", "{run}", "--resume", *TRAIN_SMALL, "--set",
                                     "model.text_adapter.dim=24"], 1,
                                    r"{run}/checkpoints/1 does not fit the model \(.*\): \S*mta_1/\S+ is "
                                    r"\((\d+, )*32,?\) in the checkpoint, \((\d+, )*24,?\) in the model; \d+ more "
                                    r"array\(s\) differ$"),
    "--batch-size 0": (["predict", "--checkpoint", "{d}/weights.msgpack", "--image", "{d}/ok.png", "--text", "a cat",
                        "--out", "{tmp}/out", "--batch-size", "0"], 2,
                       r"argument --batch-size: must be a positive integer, got '0'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line(case, user_error_inputs, tmp_path, request):
    """Every kind of bad input ends the command with one ``wimfris <command>: error:`` line naming the file, key,
    step or value at fault, no traceback, status 1 (2 for argument errors), and nothing left in the inputs."""
    args, status, pattern = USER_ERRORS[case]
    d = str(user_error_inputs)
    names = {"d": d, "tmp": str(tmp_path), "ro": str(_read_only_dir(tmp_path)) if "{ro}" in " ".join(args) else ""}
    if "{run}" in " ".join(args):
        names["run"] = str(tmp_path / "run")
        shutil.copytree(request.getfixturevalue("tiny_run"), names["run"])
    before = sorted(os.walk(d))
    r = run_cli(*(a.format(**names) for a in args))
    assert r.returncode == status and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("wimfris ")]  # not tqdm's progress bars
    assert len(lines) == 1 and lines[0].startswith(f"wimfris {args[0]}: error: "), r.stderr[-3000:]
    assert re.search(pattern.format(**{k: re.escape(v) for k, v in names.items()}), lines[0]), lines[0]
    assert sorted(os.walk(d)) == before and not (tmp_path / "out").exists()  # nothing created


def test_debug_and_internal_errors_keep_their_traceback(monkeypatch, capsys, tmp_path):
    """Bad input is classified by exception type; ``--debug`` re-raises it; anything else (a bug) is re-raised."""
    from wimfris_jax.predict import PredictError

    assert is_user_error(PermissionError(13, "Permission denied", "/x")) and is_user_error(PredictError("x"))
    assert describe(IsADirectoryError(21, "Is a directory", "/x/out")) == "/x/out: Is a directory"
    assert not is_user_error(OSError("device lost")) and not is_user_error(RuntimeError("bug"))
    args = ["predict", "--checkpoint", str(tmp_path / "none"), "--image", os.path.join(ROOT, "README.md"), "--text",
            "a cat", "--out", str(tmp_path / "out")]  # fmt: skip
    code, err = _main(capsys, *args)
    assert code == 1 and err.startswith("wimfris predict: error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(PredictError, match="is not a readable image"):
        cli.main([*args, "--debug"])
    monkeypatch.setattr(cli, "cmd_summary", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["summary", "--config", TINY])
