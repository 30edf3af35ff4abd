"""``wimfris demo --quick`` end to end, as a user runs it (a subprocess, one CPU device), then ``wimfris eval`` and
``wimfris predict`` on the checkpoint it leaves: the README's first-command path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from wimfris_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's machine: one CPU device
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    # the console script when installed (pip install -e ., as CI and the README do), else the module
    command = [shutil.which("wimfris")] if shutil.which("wimfris") else [sys.executable, "-m", "wimfris_jax.cli"]
    r = subprocess.run(
        [*command, "demo", "--quick", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir, r.stdout


@pytest.mark.slow
def test_demo_quick_writes_results_grid_and_checkpoint(demo_run):
    workdir, stdout = demo_run
    summary = json.loads((workdir / "demo_results.json").read_text())
    true, swapped = summary["results"]["val (true sentences)"], summary["results"]["val (swapped sentences)"]
    assert true["n"] == swapped["n"] == 16  # configs/demo.py quick: 16 validation scenes
    for r in (true, swapped):
        assert all(0.0 <= r[k] <= 1.0 for k in ("mIoU", "oIoU", "Prec@0.5", "Prec@0.9"))
    assert summary["steps"] == 10 and summary["target_met"] in (True, False)
    assert "val (true sentences)" in stdout and "val (swapped sentences)" in stdout and "wimfris predict" in stdout
    grid = np.asarray(Image.open(summary["grid"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] > 300 and grid.shape[1] > 500
    assert (workdir / "metrics.jsonl").is_file() and any(f.startswith("events.out") for f in os.listdir(workdir / "tb"))
    losses = [json.loads(line)["train/loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]  # fmt: skip
    assert len(losses) == 2 and all(np.isfinite(losses))

    # `wimfris eval` on the demo's checkpoint (config read from its config.json) reproduces the demo's scores
    out = workdir / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(workdir), "--split", "val", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["results"]["val"]
    assert scores["n"] == 16 and abs(scores["mIoU"] - true["mIoU"]) < 0.02


@pytest.mark.slow
def test_predict_on_demo_checkpoint(demo_run, tmp_path, capsys):
    workdir, _ = demo_run
    sample = json.loads((workdir / "demo_results.json").read_text())["samples"]
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sample[0]["image"], folder / "a.png")
    Image.open(sample[1]["image"]).resize((80, 48)).save(folder / "b.jpg")  # another size and aspect, a JPEG
    code = cli.main(["predict", "--checkpoint", str(workdir), "--image", str(folder), sample[2]["image"],
                     "--text", sample[0]["sentence"], "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png", "val_002_mask.png",
                       "val_002_overlay.png"]  # fmt: skip
    for stem, shape in (("a", (64, 64)), ("b", (48, 80)), ("val_002", (64, 64))):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png")).shape == (*shape, 3)
