"""``wimfris predict`` and ``wimfris eval`` on a converted-format DETRIS checkpoint (a whole-model file holding
params and batch statistics, as ``python -m port_weights detris`` writes), at toy sizes with the real tokenizer:
the masks written are those of the model's logits taken through DETRIS's inverse warp and threshold."""

import json
import os
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from wimfris_jax import cli
from wimfris_jax.io import save_params

CONFIG = """
from configs import common
from configs.detris_b import model_config


def get_config():
    m = model_config(
        vision=dict(width=32, depth=3, num_heads=2, patch_size=8, num_registers=4, pos_grid=4),
        vision_layers=(1,),
        neck_taps=(0, 1),
    )
    m.image_size = 32
    m.text = dict(vocab_size=49408, width=32, depth=2, num_heads=2, context_length=77, proj_dim=32)
    m.text_adapter.layers, m.text_adapter.dim = (1,), 16
    m.vision_adapter.dim, m.vision_adapter.num_heads = 32, 4
    m.neck.dim, m.neck.num_heads = 32, 4
    m.decoder = dict(num_layers=1, d_model=32, num_heads=4, dim_ffn=32, dropout=0.1)
    config = common.ml_collections.ConfigDict()
    config.seed = 0
    config.model = m
    config.data = common.data_config(name="refer", image_size=32, word_len=17, patch_size=8, data_root={root!r})
    config.train = common.train_config(global_batch_size=2, lr=1e-4)
    return config
"""


@pytest.fixture(scope="module")
def detris_files(tmp_path_factory):
    """A fake RefCOCO, a toy DETRIS config file and a whole-model checkpoint with moved running statistics."""
    from fake_refcoco import write_fake_refcoco

    from wimfris_jax.checkpoints import expected_variables
    from wimfris_jax.config import load_config
    from wimfris_jax.model import build_model

    folder = tmp_path_factory.mktemp("detris_cli")
    write_fake_refcoco(str(folder / "refer"), num_images=4)
    config_path = folder / "detris_toy.py"
    config_path.write_text(textwrap.dedent(CONFIG.format(root=str(folder / "refer"))))
    config = load_config(str(config_path))
    model = build_model(config.model)
    shapes = expected_variables(model, config.model)
    assert set(shapes) == {"params", "batch_stats"}
    images, ids = np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 17), np.int32)
    variables = jax.device_get(model.init(jax.random.key(0), images, ids, train=False))
    rng = np.random.default_rng(0)  # running statistics away from (0, 1), so evaluation mode is visible
    variables["batch_stats"] = jax.tree.map(
        lambda x: (rng.uniform(0.5, 1.5, x.shape) if x.ndim else x).astype(np.float32), variables["batch_stats"]
    )
    checkpoint = folder / "detris_toy.msgpack"
    save_params(checkpoint, variables, {"family": "detris", "collections": ["params", "batch_stats"]})
    return dict(folder=folder, config=str(config_path), checkpoint=str(checkpoint), variables=variables)


def test_predict_writes_the_masks_of_the_model(detris_files, tmp_path, capsys):
    from data_pipeline.preprocess import inverse_letterbox_matrix, letterbox_image, normalize
    from data_pipeline.tokenizer import tokenize
    from wimfris_jax import load_model
    from wimfris_jax.metrics import postprocess

    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, (40, 56, 3), np.uint8), rng.integers(0, 256, (50, 30, 3), np.uint8)]
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / f"photo_{i}.png")
    out = tmp_path / "out"
    args = ["predict", "--config", detris_files["config"], "--checkpoint", detris_files["checkpoint"]]
    assert cli.main([*args, "--image", str(tmp_path), "--text", "the dog on the left", "--out", str(out)]) == 0
    assert "photo_1.png" in capsys.readouterr().out

    model, variables = load_model(detris_files["config"], detris_files["checkpoint"])
    ids = tokenize("the dog on the left", 17)
    for i, p in enumerate(pictures):
        logits = np.asarray(model.apply(variables, normalize(letterbox_image(p, 32))[None], ids))[0]
        assert logits.shape == (16, 16)
        want = postprocess(logits, inverse_letterbox_matrix(*p.shape[:2], 32), p.shape[:2], 32)
        got = np.asarray(Image.open(out / f"photo_{i}_mask.png")) > 127
        assert got.shape == p.shape[:2] and (got == want).all()
        assert np.asarray(Image.open(out / f"photo_{i}_overlay.png")).shape == p.shape


def test_eval_on_a_refer_layout_split(detris_files, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["eval", "--config", detris_files["config"], "--checkpoint", detris_files["checkpoint"]]
    assert cli.main([*args, "--split", "val,testA", "--json", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"val", "testA"} and "mIoU" in printed
    for r in results.values():
        assert r["n"] > 0 and all(0.0 <= r[k] <= 1.0 for k in ("mIoU", "oIoU", "Prec@0.5", "Prec@0.9"))


def test_checkpoint_that_does_not_fit_fails_in_one_line(detris_files, tmp_path, capsys):
    bad = dict(detris_files["variables"])
    bad["params"] = {k: v for k, v in bad["params"].items() if k != "dense_aligner_1"}
    path = tmp_path / "bad.msgpack"
    save_params(path, bad, {"collections": ["params", "batch_stats"]})
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    args = ["predict", "--config", detris_files["config"], "--checkpoint", str(path), "--image", str(image)]
    assert cli.main([*args, "--text", "a cat", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wimfris predict: error: ") and "dense_aligner_1" in err and "Traceback" not in err


def test_predict_writes_every_readable_image_and_names_every_unreadable_one(detris_files, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(folder / name)
    (folder / "b.png").write_text("not an image")
    (folder / "d.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["predict", "--config", detris_files["config"], "--checkpoint", detris_files["checkpoint"]]
    assert cli.main([*args, "--image", str(folder), "--text", "the dog", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png"]
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [str(folder / "a.png"), str(folder / "c.jpg")]
    errors = [line for line in captured.err.splitlines() if line.startswith("wimfris ")]
    assert [e.split(" is not a readable image (")[0] for e in errors] == [
        f"wimfris predict: error: {folder / 'b.png'}", f"wimfris predict: error: {folder / 'd.png'}"
    ]  # fmt: skip
    assert "Traceback" not in captured.err

    # every image unreadable: one line naming them all, nothing written
    for name in ("a.png", "c.jpg"):
        os.remove(folder / name)
    assert cli.main([*args, "--image", str(folder), "--text", "the dog", "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wimfris predict: error: none of the 2 images is readable: ")
    assert "b.png" in err[0] and "d.png" in err[0] and not (tmp_path / "out2").exists()
