"""``wimfris demo --quick`` end to end, as a user runs it (a subprocess, one CPU device, in a fresh folder with the
default workdir), run again (refused with the ways on) and resumed, then ``wimfris eval`` and ``wimfris predict`` on
the checkpoint it leaves: the README's first-command path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import python_path
from limits import limit
from PIL import Image

from wimfris_jax import cli
from wimfris_jax.demo import default_workdir


def wimfris(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """The ``wimfris`` console script as a user runs it (the module when not installed), one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's machine: one CPU device
    env["PYTHONPATH"] = python_path()
    command = [shutil.which("wimfris")] if shutil.which("wimfris") else [sys.executable, "-m", "wimfris_jax.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=limit(300), env=env,
                          cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    r = wimfris("demo", "--quick", cwd=str(folder))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return folder / "wimfris_demo_quick", r.stdout


@pytest.mark.slow
def test_demo_quick_writes_results_grid_and_checkpoint(demo_run):
    workdir, stdout = demo_run
    summary = json.loads((workdir / "demo_results.json").read_text())
    true, swapped = summary["results"]["val (true sentences)"], summary["results"]["val (swapped sentences)"]
    assert true["n"] == swapped["n"] == 16  # configs/demo.py quick: 16 validation scenes
    for r in (true, swapped):
        assert all(0.0 <= r[k] <= 1.0 for k in ("mIoU", "oIoU", "Prec@0.5", "Prec@0.9"))
    assert summary["steps"] == 10 and summary["target_met"] is None  # a smoke run has no target: it says what it proved
    smoke = summary["smoke"]
    assert smoke["checkpoint_step"] == 10 and smoke["loss_fell"] == (smoke["loss_last"] < smoke["loss_first"])
    assert "smoke run (no quality target at this size): trained 10 steps, training loss" in stdout
    assert "target" not in stdout.replace("no quality target", "")
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


def test_default_workdirs_differ_per_demo():
    """The README's demo commands (WIMFRIS, then TFANet and VIPA with --config) each get their own workdir."""
    names = [default_workdir(c, q) for c in (None, "configs/tfanet_tiny.py", "configs/vipa_tiny.py:quick")
             for q in (False, True)]  # fmt: skip
    assert names == ["wimfris_demo", "wimfris_demo_quick", "wimfris_demo_tfanet", "wimfris_demo_tfanet_quick",
                     "wimfris_demo_vipa", "wimfris_demo_vipa_quick"]  # fmt: skip


@pytest.mark.slow
def test_rerun_says_how_to_go_on_and_resume_scores_again(demo_run):
    workdir, _ = demo_run
    before = json.loads((workdir / "demo_results.json").read_text())
    r = wimfris("demo", "--quick", cwd=str(workdir.parent))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("wimfris demo")]
    assert lines == [
        "wimfris demo: error: wimfris_demo_quick already holds a demo run (checkpoint at step 10): `wimfris demo "
        "--quick --workdir wimfris_demo_quick --resume` continues it (or scores it again), `rm -r wimfris_demo_quick` "
        "starts over, `--workdir NEW_DIR` runs beside it"
    ], r.stderr[-3000:]
    r = wimfris("demo", "--quick", "--resume", cwd=str(workdir.parent))  # finished: nothing trains, scores again
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = json.loads((workdir / "demo_results.json").read_text())
    assert after["results"] == before["results"] and after["smoke"]["checkpoint_step"] == 10

