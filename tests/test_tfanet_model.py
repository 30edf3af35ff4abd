"""TFANet as a configuration of the library: ``config.model.family = "tfanet"`` builds it, and it goes through the
same train / eval / predict commands as WIMFRIS (configs/tfanet_tiny.py, its quick variant)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from wimfris_jax.cli import main
from wimfris_jax.config import ConfigError, load_config
from wimfris_jax.model import build_model, loss_fn
from wimfris_jax.summary import abstract_params, count_params

QUICK = "configs/tfanet_tiny.py:quick"


def test_tfanet_outputs_parameters_and_loss():
    config = load_config(QUICK)
    model = build_model(config.model)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    ids = jnp.array([[3, 5, 7, 0, 0], [4, 6, 0, 0, 0]], jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids, train=False)
    assert set(variables["params"]) == {"text_encoder", "image_encoder", "decoder"} | {f"level_{i}" for i in range(4)}
    out = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))(variables, images, ids)
    assert out["logits"].shape == (2, 16, 16) and out["scores"].shape == (2, 16, 16, 2)
    np.testing.assert_allclose(out["logits"], out["scores"][..., 1] - out["scores"][..., 0], rtol=1e-6)
    assert float(jnp.std(out["logits"])) > 1e-4  # not a constant map
    loss, aux = loss_fn(config.model, out, jnp.zeros((2, 64, 64)))
    assert np.isfinite(float(loss)) and float(loss) > 0 and set(aux) == {"loss_bce_dice"}


def test_tfanet_b_summary_counts_beside_the_paper():
    config = load_config("configs/tfanet_b.py")
    counts = count_params(abstract_params(config.model), tuple(config.train.trainable))
    assert 123e6 < counts["text backbone"] < 124e6  # CLIP ViT-L/14 text tower
    assert 87e6 < counts["vision backbone"] < 88e6  # VMamba-B v2 (0229) without its classifier
    assert counts["trainable"] == counts["total"]  # everything trains, as ReMamber
    assert abs(counts["total"] / config.model.paper_params - 1) < 0.15  # 268.46M in the paper


def test_bad_family_is_one_line():
    config = load_config(QUICK)
    config.model.family = "lavt"
    with pytest.raises(ConfigError, match=r"config.model.family='lavt': choose one of \['tfanet', 'wimfris'\]"):
        build_model(config.model)


def test_tfanet_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    sets = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--set", "train.log_every=1"]
    assert main(["train", "--config", QUICK, "--workdir", run, *sets]) == 0
    with open(f"{run}/metrics.jsonl", encoding="utf-8") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", run, "--split", "val", "--json", f"{tmp_path}/scores.json"]) == 0
    with open(f"{tmp_path}/scores.json", encoding="utf-8") as f:
        assert json.load(f)["results"]["val"]["n"] == 16  # the quick demo's validation scenes
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    assert main(["predict", "--checkpoint", run, "--image", str(image), "--text", "the red circle",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert any(p.suffix == ".png" for p in (tmp_path / "out").iterdir())
