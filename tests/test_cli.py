"""The ``wimfris`` command line: argument errors, config overrides, and predict's one-line errors on bad input
(missing file, not an image, empty sentence, missing checkpoint), run as a user runs it, in a subprocess."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from wimfris_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "wimfris_jax.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _config():
    return ml_collections.ConfigDict(
        {"seed": 0, "train": {"lr": 1e-4, "epochs": 50, "trainable": ("a",), "resume": False}, "data": {"name": "x"}}
    )


def test_overrides_parse_and_coerce():
    c = cli.apply_overrides(_config(), ["train.lr=2", "train.epochs=3", "train.trainable=['.*']", "data.name=refer",
                                        "train.resume=True", "seed=7"])  # fmt: skip
    assert c.train.lr == 2.0 and isinstance(c.train.lr, float)
    assert c.train.epochs == 3 and c.train.trainable == (".*",) and c.data.name == "refer"
    assert c.train.resume is True and c.seed == 7
    with pytest.raises(cli.ConfigError, match=r"unknown config key 'train.lrr'.*epochs, lr"):
        cli.apply_overrides(_config(), ["train.lrr=1"])
    with pytest.raises(cli.ConfigError, match="not KEY=VALUE"):
        cli.apply_overrides(_config(), ["train.lr"])
    with pytest.raises(cli.ConfigError, match=r"cannot set train.epochs='many'"):
        cli.apply_overrides(_config(), ["train.epochs=many"])


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
    assert code == 1 and "is not PREFIX=FILE" in err


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_inputs")
    (d / "notes.png").write_text("this is not an image")
    from PIL import Image

    Image.new("RGB", (20, 10), (200, 30, 30)).save(d / "ok.png")
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


def test_train_init_loads_pretrained_backbone(tmp_path, capsys):
    """``--init text_encoder=FILE`` puts a converted text tower into the model before training; the tower is
    frozen, so after a step the run's checkpoint still holds exactly the file's values."""
    import jax
    import numpy as np

    from wimfris_jax.backbones.clip_text import ClipText
    from wimfris_jax.io import flatten, save_params
    from wimfris_jax.load import read_checkpoint
    from wimfris_jax.summary import load_config

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    text_fields = dict(load_config(tiny).model.text)
    tower = ClipText(**text_fields)
    params = jax.device_get(tower.init(jax.random.key(7), np.zeros((1, 17), np.int32))["params"])
    save_params(tmp_path / "clip.msgpack", params, {"family": "clip", "config": text_fields})
    workdir = tmp_path / "run"
    sets = ["train.epochs=1", "train.global_batch_size=8", "data.num_train=16",
            "train.eval_every_epochs=0", "train.log_every=1"]  # fmt: skip
    args = ["train", "--config", tiny, "--workdir", str(workdir), "--init", f"text_encoder={tmp_path / 'clip.msgpack'}"]
    assert cli.main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    trained = flatten(read_checkpoint(str(workdir), "latest")[0]["params"]["text_encoder"])
    want = flatten(params)
    assert trained.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(trained[k]), want[k], err_msg=k)

    # a file for another model fails naming the subtree and the mismatch
    bad = {k: v for k, v in params.items() if k != "ln_final"}
    save_params(tmp_path / "bad.msgpack", bad, {})
    args[-1] = f"text_encoder={tmp_path / 'bad.msgpack'}"
    code, err = _main(capsys, *args, "--workdir", str(tmp_path / "run2"))
    assert code == 1 and "model subtree 'text_encoder'" in err and "ln_final" in err
