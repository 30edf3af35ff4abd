"""VIPA as a configuration of the library: ``config.model.family = "vipa"`` builds it (configs/vipa_tiny.py, its quick
variant), its ablation switches change exactly the parts they name, WordPiece ids reach it through the data
pipeline, and it goes through the same train / eval / predict commands as WIMFRIS."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_cli import demo_eval_predict
from helpers import ROOT

from data_pipeline.preprocess import preprocess_eval
from data_pipeline.synthetic import SyntheticRefer
from data_pipeline.tokenizers import check_tokenizer
from wimfris_jax.cli import main
from wimfris_jax.config import ConfigError, load_config
from wimfris_jax.evaluate import data_settings
from wimfris_jax.model import build_model, loss_fn, trainable_patterns
from wimfris_jax.normalization import to_imagenet
from wimfris_jax.summary import abstract_params, count_params

QUICK = "configs/vipa_tiny.py:quick"
IDS = jnp.array([[2, 5, 7, 9, 3, 0], [2, 6, 3, 0, 0, 0]], jnp.int32)  # [CLS] words [SEP] [PAD]...
SHAPE = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)


def _set(config, overrides):
    """config.model[key] = value for each item; "veg.ratio" names a field of the group config.model.veg."""
    for key, value in overrides.items():
        group, _, leaf = key.rpartition(".")
        (config.model[group] if group else config.model)[leaf] = value
    return config


def _abstract(**overrides):
    config = _set(load_config(QUICK), overrides)
    model = build_model(config.model)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, IDS, train=False), SHAPE)["params"]
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, IDS, train=False), params, SHAPE)
    return params, out


@pytest.fixture(scope="module")
def quick_vipa():
    """(images (2, 64, 64, 3), variables, the default model's jitted eval forward); the variables are the
    "advanced_le" model's, every switch's here and "le_proj" (which the others ignore): one init for the file."""
    config = load_config(QUICK)
    config.model.key_value = "advanced_le"
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = jax.jit(lambda r: build_model(config.model).init(r, images, IDS, train=False))(jax.random.PRNGKey(0))
    model = build_model(load_config(QUICK).model)
    return images, variables, jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))


def test_vipa_outputs_and_loss(quick_vipa):
    images, variables, evaluate = quick_vipa
    config = load_config(QUICK)
    model = build_model(config.model)
    train = jax.jit(lambda v, x, t, r: model.apply(v, x, t, train=True, rngs={"dropout": r}))
    out = train(variables, images, IDS, jax.random.PRNGKey(2))
    assert out["logits"].shape == (2, 16, 16) and out["global_logits"].shape == (2, 2, 2)
    assert out["state"].shape == (2, 64) and float(jnp.std(out["logits"])) > 1e-4
    scale = float(jnp.exp(variables["params"]["veg"]["log_scale"]))  # eq. (4)'s logits: the scaled cosines
    np.testing.assert_allclose(out["global_logits"], out["relevance"] * scale, rtol=1e-6)
    assert float(jnp.abs(out["relevance"]).max()) <= 1.0 + 1e-6
    parts = {"contrastive": "loss_pixel_contrast", "threshold": "loss_relevance_threshold", "none": None}
    for kind, part in parts.items():  # Table VIII
        config.model.relevance_loss = kind
        loss, aux = loss_fn(config.model, out, jnp.zeros((2, 16, 16)))
        assert np.isfinite(float(loss)) and set(aux) == {"loss_bce", "loss_dice"} | ({part} - {None}), kind
    # evaluation: no Gumbel noise, so two calls agree and no rng is needed
    np.testing.assert_array_equal(
        evaluate(variables, images, IDS)["logits"], evaluate(variables, images, IDS)["logits"]
    )


def test_default_parameters_per_part():
    params, out = _abstract()
    assert set(params) == {
        "text_encoder", "image_encoder", "veg", "decoder", "text_cross_1", "text_cross_2",  # quick: 2 text stages used
        "text_cross_3", *(f"vision_fusion_{i}" for i in range(4)), *(f"stage_norm_{i}" for i in range(4)),
    }  # fmt: skip
    assert out["logits"].shape == (2, 16, 16)


@pytest.mark.parametrize(
    "overrides, absent, present",
    [
        ({"fusion": "none"}, {"vision_fusion_0", "text_cross_1", "vision_fusion_3"}, set()),
        ({"fusion": "late"}, {"vision_fusion_0", "text_cross_1"}, {"vision_fusion_3", "text_cross_late"}),
        ({"veg.refine": False}, {"veg/refine_attn", "veg/share_attn"}, {"veg/aggregate"}),
        ({"veg.share": False}, {"veg/share_attn", "veg/share_mlp"}, {"veg/refine_attn", "veg/refine_mlp"}),
    ],
)
def test_fusion_switches_change_only_their_parts(overrides, absent, present):
    params, out = _abstract(**overrides)
    names = set(params) | {f"veg/{k}" for k in params["veg"]}
    assert absent.isdisjoint(names) and present <= names
    assert out["logits"].shape == (2, 16, 16)


def test_skip_ids_drop_those_words_as_cues(quick_vipa):
    """Table IX "w/o articles": skip_ids (here "the", id 5 of the synthetic vocabulary, in sentence 0 only) change
    that sentence's logits with the same weights, and only that sentence's."""
    images, variables, evaluate = quick_vipa
    config = load_config(QUICK)
    config.model.veg.skip_ids = (5,)
    model = build_model(config.model)
    skipped = np.asarray(jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))(variables, images, IDS)["logits"])
    logits = np.asarray(evaluate(variables, images, IDS)["logits"])
    assert np.abs(skipped - logits)[0].max() > 1e-5
    np.testing.assert_allclose(skipped[1], logits[1], atol=1e-6)  # sentence 1 has no "the"


def test_key_value_switch_changes_the_logits(quick_vipa):
    """Table V: the decoder reads the visual expression, or the words (projected to its width) after the fusion
    ("advanced") or before it ("vanilla"); the two word sets share every weight, so only the switch differs."""
    params, _ = _abstract(key_value="ve")
    assert "le_proj" not in params
    images, variables, _ = quick_vipa
    config = load_config(QUICK)
    assert variables["params"]["le_proj"]["kernel"].shape == (64, 64)
    outs = {}
    for kv in ("advanced_le", "vanilla_le"):
        config.model.key_value = kv
        outs[kv] = jax.jit(build_model(config.model).apply)(variables, images, IDS)["logits"]
    assert float(jnp.abs(outs["advanced_le"] - outs["vanilla_le"]).max()) > 1e-5


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fusion", "mid", r"config.model.fusion='mid': choose one of \['early', 'late', 'none'\]"),
        ("key_value", "le", r"config.model.key_value='le'"),
        ("text_stages", (6, 6, 6, 6), r"text_stages=\[6, 6, 6, 6\]: need 4 stages .* at most 2 BERT layers"),
        ("relevance_loss", "hinge", r"relevance_loss='hinge': choose one of \['contrastive', 'none', 'threshold'\]"),
        ("veg.score_scale", 0.0, r"veg.score_scale=0.0: must be positive"),
        ("veg.skip_ids", ("the",), r"veg.skip_ids=\('the',\): token ids > 0, e.g. \(1037, 2019, 1996\)"),
    ],
)
def test_bad_switch_is_one_line(key, value, message):
    config = _set(load_config(QUICK), {key: value})
    with pytest.raises(ConfigError, match=message):
        build_model(config.model)


def test_vipa_b_summary_counts():
    config = load_config("configs/vipa_b.py")
    counts = count_params(abstract_params(config.model), trainable_patterns(config), config.model)
    assert 86e6 < counts["vision backbone"] < 88e6  # Swin-B without its classifier
    assert 109e6 < counts["text backbone"] < 110e6  # BERT-base with its pooler
    # everything trains but what cannot learn (the family row's untrainable list): BERT's pooler (768 x 768 + 768) and
    # the last stage's gate (2 x 1024 x 1024) the largest
    assert counts["VEG"] > 0 and counts["total"] - counts["trainable"] == 2_720_512


def test_wordpiece_ids_and_imagenet_statistics_reach_the_model():
    config = load_config(QUICK)
    settings = data_settings(config)
    assert settings["tokenizer"].startswith("wordpiece:")
    example = SyntheticRefer(1, image_size=64, seed=0)[0]
    record = preprocess_eval(example, **settings)
    ids = record["ids"]
    assert ids[0] == 2 and 3 in ids and ids.shape == (10,)  # [CLS] ... [SEP] in the synthetic vocabulary
    assert (ids[list(ids).index(3) + 1 :] == 0).all()
    # the CLIP-normalised pixels come back to ImageNet's statistics exactly
    raw = np.random.default_rng(0).uniform(0, 1, (1, 2, 2, 3)).astype(np.float32)
    clip = (raw - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258, 0.27577711]
    want = (raw - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(to_imagenet(jnp.asarray(clip, jnp.float32)), want, atol=1e-5)


@pytest.mark.slow  # compilation dominates (train, eval and predict each compile the model)
def test_vipa_demo_evaluates_and_predicts_through_the_cli(tmp_path, capsys, monkeypatch):
    config = os.path.join(ROOT, "configs", "vipa_tiny.py")
    demo_eval_predict(config, tmp_path, capsys, monkeypatch, "the leftmost red circle")


def test_tokenizer_that_overflows_the_text_tower_is_refused(tmp_path, capsys):
    """CLIP's 49,408 ids into the tiny BERT's 22-word embedding would be clamped silently: refused in one line,
    before anything compiles; the WordPiece vocabulary of the config fits."""
    config = load_config(QUICK)
    model = build_model(config.model)
    check_tokenizer(model, config.data.tokenizer)
    with pytest.raises(ConfigError, match=r"tokenizer='clip' has ids up to 49,407 but .* embeds 22 \(ids 0 to 21"):
        check_tokenizer(model, "clip")
    run = str(tmp_path / "run")
    assert main(["train", "--config", QUICK, "--workdir", run, "--set", "data.tokenizer=clip"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embeds 22" in err[0], err
