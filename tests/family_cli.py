"""The command round trip every model family goes through (tests/families/tfanet/test_tfanet_model.py,
tests/families/vipa/test_vipa_model.py), as the README lists it: the family's quick demo in a fresh folder with its
default workdir (``wimfris demo --quick --config configs/<family>_tiny.py``: it trains, scores and says what it
proved), ``wimfris eval`` of that run on the validation split, ``wimfris predict`` on a fresh image."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from wimfris_jax.cli import main
from wimfris_jax.demo import default_workdir


def demo_eval_predict(config: str, tmp_path, capsys, monkeypatch, text: str) -> None:
    """Runs the three commands with ``config`` (a family's demo config file) in ``tmp_path`` and checks what each
    leaves: the smoke report with finite losses, 16 scored expressions (the quick demo's validation scenes), a mask."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--config", config]) == 0
    run = os.path.join(tmp_path, default_workdir(config, quick=True))
    assert os.path.basename(run) != "wimfris_demo_quick"  # the family's own workdir, beside WIMFRIS's
    out = capsys.readouterr().out
    assert "smoke run (no quality target at this size): trained 10 steps" in out and "target (" not in out
    with open(f"{run}/demo_results.json", encoding="utf-8") as f:
        smoke = json.load(f)["smoke"]
    assert np.isfinite(smoke["loss_first"]) and np.isfinite(smoke["loss_last"]) and smoke["checkpoint_step"] == 10
    assert main(["eval", "--checkpoint", run, "--split", "val", "--json", f"{tmp_path}/scores.json"]) == 0
    with open(f"{tmp_path}/scores.json", encoding="utf-8") as f:
        assert json.load(f)["results"]["val"]["n"] == 16
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    out_dir = tmp_path / "out"
    assert main(["predict", "--checkpoint", run, "--image", str(image), "--text", text, "--out", str(out_dir)]) == 0
    assert any(p.suffix == ".png" for p in out_dir.iterdir())
