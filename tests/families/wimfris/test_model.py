"""The assembled WIMFRIS network: tiny forward / gradient / training steps, ablation switches, full-size counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ROOT

from configs import common, tiny, wimfris_b, wimfris_l
from wimfris_jax import paths, summary
from wimfris_jax.model import build_model, loss_fn

SOT, EOT = 49406, 49407
BACKBONES = {"text_encoder", "image_encoder"}


def _ids(lengths, word_len=17):
    """Token ids [SOT, words..., EOT, 0...] with arbitrary word ids, one row per length (words incl. SOT/EOT)."""
    ids = np.zeros((len(lengths), word_len), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = [SOT] + [320 + 37 * r + 11 * i for i in range(n - 2)] + [EOT]
    return jnp.asarray(ids)


def _batch(cfg, b=2, seed=0):
    s, m = cfg.model.image_size, 4 * (cfg.model.image_size // 8)
    images = jax.random.normal(jax.random.PRNGKey(seed), (b, s, s, 3))
    mask = jnp.zeros((b, m, m)).at[:, m // 4 : m // 2, m // 8 : m // 2].set(1.0)
    return images, _ids([5, 8, 3, 6][:b]), mask


def _init(model, images, ids):
    rngs = {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
    return model.init(rngs, images, ids, train=False)


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = tiny.get_config()
    model = build_model(cfg.model)
    images, ids, mask = _batch(cfg)
    return cfg, model, _init(model, images, ids), (images, ids, mask)


def test_tiny_forward(tiny_setup):
    cfg, model, variables, (images, ids, _) = tiny_setup
    from data_pipeline.tokenizer import tokenize  # the real CLIP tokenizer feeds the real-vocabulary tiny tower

    ids = jnp.asarray(tokenize(["the red circle on the left", "a small blue square"], cfg.model.word_len))
    out = model.apply(variables, images, ids, train=False)
    assert out["logits"].shape == (2, 64, 64)  # 4x the 16x16 patch grid = config.data.mask_size
    assert cfg.data.mask_size == 64
    assert out["window_logits"].shape == (2, 16)  # 4x4 windows on the 16x16 grid
    assert out["state"].shape == (2, 64)
    np.testing.assert_allclose(out["alphas"], [0.2, 0.2], rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
    assert set(variables["params"]) == BACKBONES | {"mta_1", "mta_3", "msa_1", "msa_3", "neck", "decoder", "projector"}
    assert set(variables["batch_stats"]) == {"neck", "projector"}


def test_tiny_gradients_and_training(tiny_setup):
    """Frozen backbones get no gradient at all; every trainable leaf gets a non-zero one; the loss falls."""
    cfg, model, variables, (images, ids, mask) = tiny_setup
    trainable, frozen = paths.split(variables["params"], common.TRAINABLE)
    assert set(frozen) == BACKBONES and not BACKBONES & set(trainable)

    def loss_of(params, frozen, batch_stats, rng, images, ids, mask):
        out, upd = model.apply(
            {"params": paths.merge(params, frozen), "batch_stats": batch_stats},
            images,
            ids,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return loss_fn(cfg.model, out, mask)[0], upd["batch_stats"]

    value_and_grad = jax.jit(jax.value_and_grad(loss_of, has_aux=True))  # everything as arguments: no constants
    grad_fn = lambda p, stats, rng: value_and_grad(p, frozen, stats, rng, images, ids, mask)
    (loss0, stats), grads = grad_fn(trainable, variables["batch_stats"], jax.random.PRNGKey(3))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0.0, f"zero gradient at {jax.tree_util.keystr(path)}"

    tx = optax.adam(1e-3)
    opt = tx.init(trainable)
    params, losses = trainable, [float(loss0)]
    for i in range(6):
        updates, opt = tx.update(grads, opt)
        params = optax.apply_updates(params, updates)
        (loss, stats), grads = grad_fn(params, stats, jax.random.PRNGKey(4 + i))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


def test_padding_does_not_matter(tiny_setup):
    """Causal text tower and MTA + key-padding masks (MSA, decoder): more trailing padding, same prediction."""
    cfg, model, variables, (images, ids, _) = tiny_setup
    longer = jnp.pad(ids, ((0, 0), (0, 7)))
    a = model.apply(variables, images, ids, train=False)
    b = model.apply(variables, images, longer, train=False)
    for key in ("logits", "window_logits", "state"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4)  # summation order differs only


def _ablation(changes):
    cfg = tiny.get_config()
    for key, value in changes.items():
        node = cfg.model
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


ABLATIONS = {
    # Table 3a "no partition" + Table 4 kernels + Table 3b EP off
    "window_none": ({"neck.window": None, "vision_adapter.kernels": (1, 1, 1), "vision_adapter.emphasis": False}, None),
    # Table 3a window 2 + Table 5 placement
    "window_2": ({"neck.window": 2, "vision_adapter.layers": (0, 1), "text_adapter.layers": (0, 1)}, 64),
    # Table 3b: no MSA, no MTA; window 16 = the whole 16x16 grid (still one class token)
    "no_adapters": ({"vision_adapter.kind": "none", "text_adapter.kind": "none", "neck.window": 16}, 1),
    "neck_aggregate": ({"neck.kind": "aggregate"}, None),  # HMF without WMF
    "neck_none": ({"neck.kind": "none"}, None),  # Table 1 "X"
    "neck_detris": ({"neck.kind": "detris"}, None),  # Table 1 "DETRIS"
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_switches(name):
    changes, n_win = ABLATIONS[name]
    cfg = _ablation(changes)
    model = build_model(cfg.model)
    images, ids, mask = _batch(cfg)  # the fixture's shapes: the backbones' compiled ops are reused
    variables = _init(model, images, ids)
    out = model.apply(variables, images, ids, train=False)
    params = variables["params"]
    assert out["logits"].shape == (2, 64, 64)
    if n_win is None:
        assert "window_logits" not in out
    else:
        assert out["window_logits"].shape == (2, n_win)
    loss, aux = loss_fn(cfg.model, out, mask)
    assert np.isfinite(float(loss))
    if n_win is None:
        assert float(aux.get("loss_align", 0.0)) == 0.0
    adapters = sorted(k for k in params if k.startswith(("mta_", "msa_")))
    if name == "window_none":
        assert params["msa_1"]["rfmixer"]["branch2_kx1"]["kernel"].shape == (1, 1, 1, 16)
        assert "emphasis_logit" not in params["msa_1"]
        np.testing.assert_allclose(out["alphas"], [0.2, 0.2])
    if name == "window_2":
        assert adapters == ["msa_0", "msa_1", "mta_0", "mta_1"]
    if name == "no_adapters":
        assert adapters == [] and "alphas" not in out
    if name == "neck_aggregate":
        assert set(params["neck"]) == {"aggregate"}
    if name == "neck_none":
        assert params["neck"]["proj"]["conv"]["kernel"].shape == (1, 1, 64, 64)  # the last map only
    if name == "neck_detris":
        assert {"f3_proj_0", "fusion4", "aggr_0", "coordconv_1_0", "txt_proj"} <= set(params["neck"])
        assert "batch_stats" in variables and "neck" in variables["batch_stats"]


def test_config_errors():
    with pytest.raises(ValueError, match="vision_adapter.layers"):
        build_model(_ablation({"vision_adapter.layers": (1, 4)}).model)
    with pytest.raises(ValueError, match="widths disagree"):
        build_model(_ablation({"decoder.d_model": 32}).model)
    with pytest.raises(ValueError, match="unknown neck|choose one of"):
        build_model(_ablation({"neck.kind": "fpn"}).model)


@pytest.mark.slow
def test_full_size_parameter_counts(capsys):
    """WIMFRIS-B via eval_shape (nothing allocated): PET counts within 15% of Table 3b (MSA 0.8M, MTA 2.2M)."""
    cfg = wimfris_b.get_config()
    params = summary.abstract_params(cfg.model)
    assert set(params) == BACKBONES | {f"mta_{i}" for i in range(1, 12, 2)} | {f"msa_{i}" for i in range(1, 12, 2)} | {
        "neck",
        "decoder",
        "projector",
    }
    counts = summary.count_params(params, tuple(cfg.train.trainable))
    assert abs(counts["MSA"] / 0.8e6 - 1) < 0.15, counts
    assert abs(counts["MTA"] / 2.2e6 - 1) < 0.15, counts
    assert (
        counts["trainable"] == counts["total"] - counts["text backbone"] - counts["vision backbone"]
    )
    assert 85e6 < counts["vision backbone"] < 88e6  # DINOv2-B/14 + registers
    assert 63e6 < counts["text backbone"] < 64e6  # CLIP B/16 text tower
    summary.main(["--config", os.path.join(ROOT, "configs", "tiny.py")])
    assert "MSA" in capsys.readouterr().out

    large = summary.abstract_params(wimfris_l.get_config().model)
    assert {f"msa_{i}" for i in (2, 6, 10, 14, 18, 22)} <= set(large)
    assert large["neck"]["aggregate"]["conv"]["kernel"].shape == (1, 1, 3 * 1024, 512)
