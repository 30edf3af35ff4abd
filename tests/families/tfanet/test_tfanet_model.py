"""TFANet as a configuration of the library: ``config.model.family = "tfanet"`` builds it, and it goes through the
same train / eval / predict commands as WIMFRIS (configs/tfanet_tiny.py, its quick variant)."""


import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_cli import demo_eval_predict
from helpers import ROOT

from wimfris_jax import summary
from wimfris_jax.config import ConfigError, apply_overrides, load_config
from wimfris_jax.families.tfanet.ablations import TransformerCrossAttention
from wimfris_jax.model import build_model, loss_fn, trainable_patterns
from wimfris_jax.normalization import MEAN, STD
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

    # the pipeline normalises with CLIP's statistics; VMamba was pretrained with ImageNet's: its stem sees those
    def stem_input(v, x):
        seen = []
        def record(f, args, kwargs, ctx):
            if ctx.method_name == "embed":
                seen.append(args[0])
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(v, x, ids, train=False)
        return seen[0]

    pixels = jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 64, 3))
    seen = jax.jit(stem_input)(variables, (pixels - MEAN) / STD)
    want = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(seen, want, atol=2e-6)


def test_tfanet_b_summary_counts_beside_the_paper():
    config = load_config("configs/tfanet_b.py")
    counts = count_params(abstract_params(config.model), trainable_patterns(config), config.model)
    assert 123e6 < counts["text backbone"] < 124e6  # CLIP ViT-L/14 text tower
    assert 87e6 < counts["vision backbone"] < 88e6  # VMamba-B v2 (0229) without its classifier
    # everything trains, as ReMamber, but CLIP's text_projection (768 x 768) and its 12 attention key biases
    assert counts["total"] - counts["trainable"] == 768 * 768 + 12 * 768
    assert abs(counts["total"] / config.model.paper_params - 1) < 0.15  # 268.46M in the paper
    assert round(counts["total"] / 1e6, 2) == 242.28  # docs/TFANET.md "Parameters"


def test_tfanet_b_second_cfsm_through_the_summary(capsys):
    """``--set model.level.cfsm_depth=2`` adds one CFSM per level, the size of the first (``--detail`` shows them):
    256.68M, the figure docs/TFANET.md "Parameters" gives."""
    summary.main(["--config", "configs/tfanet_b.py", "--set", "model.level.cfsm_depth=2", "--detail", "level_"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\S+)\s+([\d,]+)\s+[\d.]+$", out, re.M))
    count = {name: int(n.replace(",", "")) for name, n in rows.items()}
    assert "with model.level.cfsm_depth=2" in out
    for i in range(4):
        assert count[f"level_{i}/cfsm_1"] == count[f"level_{i}/cfsm"] > 0
    assert count["level_3/cfsm"] == 9_100_840  # C = 1024: 3C -> C reduce, SS2D at C, channel scan over 15 x 15
    added = sum(count[f"level_{i}/cfsm_1"] for i in range(4))
    assert added == 14_399_528 and count["total"] == 242_276_293 + added  # 256.68M against the paper's 268.46M


def test_bad_family_is_one_line():
    config = load_config(QUICK)
    config.model.family = "lavt"
    with pytest.raises(ConfigError, match=r"config.model.family='lavt': choose one of \['tfanet', 'vipa', 'wimfris'\]"):
        build_model(config.model)


@pytest.mark.slow  # ~2.5 min of compilation alone on 2 cores: in the slow set
def test_tfanet_demo_evaluates_and_predicts_through_the_cli(tmp_path, capsys, monkeypatch):
    demo_eval_predict(os.path.join(ROOT, "configs", "tfanet_tiny.py"), tmp_path, capsys, monkeypatch, "the red circle")


# Table 3's rows as overrides (configs/tfanet_b.py docstring): (level.attention, level.mixer, decoder.kind).
ROWS = {
    "a": ("none", "conv", "simple"),
    "b": ("none", "cfsm", "simple"),
    "c": ("transformer", "cfsm", "simple"),
    "d": ("mlam", "cfsm", "simple"),
    "e": ("mlam", "cfsm", "wfdm"),
}
IDS = jnp.array([[3, 5, 7, 0, 0], [4, 6, 0, 0, 0]], jnp.int32)


def _switched(attention, mixer, kind):
    config = load_config(QUICK)
    config.model.level.attention, config.model.level.mixer, config.model.decoder.kind = attention, mixer, kind
    return config, build_model(config.model)


def _abstract(model: nn.Module) -> tuple[dict, dict]:
    """(params, outputs) of ``model`` on 2 x 64 px images and IDS, as shapes (jax.eval_shape: nothing computed)."""
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, IDS, train=False), images)["params"]
    return params, jax.eval_shape(lambda p, x: model.apply({"params": p}, x, IDS, train=False), params, images)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_ablation_rows_build_with_their_parameters(row):
    attention, mixer, kind = ROWS[row]
    _, model = _switched(attention, mixer, kind)
    params, out = _abstract(model)
    assert out["logits"].shape == (2, 16, 16) and out["scores"].shape == (2, 16, 16, 2)
    expect = {"fusion", mixer} | ({attention} if attention != "none" else set())
    assert all(set(params[f"level_{i}"]) == expect for i in range(4))
    decoder = set(params["decoder"])
    assert {f"lateral_{i}" for i in range(4)} | {"score"} <= decoder
    assert (decoder >= {"kernel_0", "alpha_1"}) == (kind == "wfdm")
    assert decoder.isdisjoint({"kernel_0", "alpha_1"}) == (kind == "simple")


def test_ablation_switches_run_forward():
    """One real forward through all three stand-ins (transformer attention, conv fusion, simple decoder)."""
    config, model = _switched("transformer", "conv", "simple")
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images, IDS, train=False)
    assert set(variables["params"]["level_0"]) == {"transformer", "fusion", "conv"}
    apply = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))
    out = apply(variables, images, IDS)
    assert out["logits"].shape == (2, 16, 16) and float(jnp.std(out["logits"])) > 1e-4
    loss, _ = loss_fn(config.model, out, jnp.zeros((2, 64, 64)))
    assert np.isfinite(float(loss))


@pytest.mark.parametrize(
    "where, key, value, choices",
    [
        ("level", "attention", "linear", "['mlam', 'none', 'transformer']"),
        ("level", "mixer", "mamba", "['cfsm', 'conv']"),
        ("decoder", "kind", "fpn", "['simple', 'wfdm']"),
    ],
)
def test_bad_ablation_switch_is_one_line(where, key, value, choices):
    config = load_config(QUICK)
    config.model[where][key] = value
    with pytest.raises(ConfigError) as err:
        build_model(config.model)
    assert str(err.value) == f"config.model.{where}.{key}={value!r}: choose one of {choices}"


def test_cfsm_depth_stacks_blocks_named_after_the_first():
    """``level.cfsm_depth`` n: "cfsm", "cfsm_1", ... per level, each shaped as the first; nothing else changes."""
    config = load_config(QUICK)
    one, _ = _abstract(build_model(config.model))
    config.model.level.cfsm_depth = 3
    three, out = _abstract(build_model(config.model))
    assert out["logits"].shape == (2, 16, 16)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    for i in range(4):
        level = three[f"level_{i}"]
        assert set(level) == {"mlam", "fusion", "cfsm", "cfsm_1", "cfsm_2"}
        assert shapes(level["cfsm_1"]) == shapes(level["cfsm_2"]) == shapes(one[f"level_{i}"]["cfsm"])
        assert shapes({k: level[k] for k in ("mlam", "fusion", "cfsm")}) == shapes(one[f"level_{i}"])
    cfsms = sum(size(one[f"level_{i}"]["cfsm"]) for i in range(4))
    assert size(three) - size(one) == 2 * cfsms > 0


@pytest.mark.parametrize(
    "level, message",
    [
        (dict(cfsm_depth=0), "config.model.level.cfsm_depth=0: must be a positive integer"),
        (dict(mixer="conv", cfsm_depth=2),
         "config.model.level.cfsm_depth=2: must be 1 with level.mixer='conv' (one conv layer)"),
    ],
)  # fmt: skip
def test_bad_cfsm_depth_is_one_line(level, message):
    """The builder refuses it, and so does ``--set`` (config validation) with the same line."""
    config = load_config(QUICK)
    config.model.level.update(level)
    with pytest.raises(ConfigError) as err:
        build_model(config.model)
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_config(QUICK), [f"model.level.{k}={v}" for k, v in level.items()])
    assert str(err.value) == message


def test_transformer_attention_ignores_padded_words():
    """Table 3c's stand-in: padded words are masked as keys and zeroed as queries, whatever their content."""
    visual = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
    words = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    pad = IDS == 0
    attend = TransformerCrossAttention(num_heads=2)
    variables = attend.init(jax.random.PRNGKey(2), visual, words, pad)
    f_lv, f_vl = attend.apply(variables, visual, words, pad)
    assert f_lv.shape == visual.shape and f_vl.shape == words.shape
    noisy = jnp.where(pad[..., None], 100.0 * jax.random.normal(jax.random.PRNGKey(3), words.shape), words)
    g_lv, g_vl = attend.apply(variables, visual, noisy, pad)
    np.testing.assert_allclose(f_lv, g_lv, atol=1e-5)
    np.testing.assert_allclose(f_vl, g_vl, atol=1e-5)
    assert float(jnp.abs(f_vl * pad[..., None]).max()) == 0.0
