"""The command round trip every model family goes through (tests/families/tfanet/test_tfanet_model.py,
tests/families/vipa/test_vipa_model.py): ``wimfris train`` for three logged steps, ``wimfris eval`` of the run on
the validation split, ``wimfris predict`` on a fresh image."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from wimfris_jax.cli import main


def train_eval_predict(config: str, tmp_path, capsys, text: str) -> None:
    """Runs the three commands with ``config`` (a quick demo config: 16 validation scenes) under ``tmp_path`` and
    checks what each leaves: three finite losses, 16 scored expressions, a written mask."""
    run = str(tmp_path / "run")
    sets = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--set", "train.log_every=1"]
    assert main(["train", "--config", config, "--workdir", run, *sets]) == 0
    with open(f"{run}/metrics.jsonl", encoding="utf-8") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", run, "--split", "val", "--json", f"{tmp_path}/scores.json"]) == 0
    with open(f"{tmp_path}/scores.json", encoding="utf-8") as f:
        assert json.load(f)["results"]["val"]["n"] == 16  # the quick demo's validation scenes
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", run, "--image", str(image), "--text", text, "--out", str(out)]) == 0
    assert any(p.suffix == ".png" for p in out.iterdir())
