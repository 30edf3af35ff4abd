"""VIPA's parts alone (no backbone): the VEG's retrieval (eqs. 1-3), its score scale and its masks (padding, skipped
words), its switches' parameter sets, the early-fusion layers, the decoder, the loss (the three relevance
supervisions) and the polynomial schedule. Invariances: what is masked cannot change the output."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from wimfris_jax.config import ConfigError
from wimfris_jax.families.vipa.decoder import VipaDecoder
from wimfris_jax.families.vipa.fusion import TextCrossLayer, VisionLanguageFusion, instance_norm
from wimfris_jax.families.vipa.losses import threshold_loss, to_mask_size, vipa_loss
from wimfris_jax.families.vipa.veg import VEG, cue_mask, retrieval_mask, selection_overlap
from wimfris_jax.losses import bce_loss, dice_loss
from wimfris_jax.train.optim import make_optimizer

B, H, W, C, L, D = 2, 4, 5, 12, 6, 16
PAD = jnp.array([[False] * 4 + [True] * 2, [False] * 6])  # row 0: [CLS] + 3 words + 2 padding
IDS = jnp.array([[2, 5, 7, 9, 0, 0], [2, 6, 5, 8, 9, 3]], jnp.int32)  # 5 = "the" in the synthetic vocabulary


def rand(key: int, *shape: int) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_retrieval_mask_is_top_k_forward_and_softmax_backward():
    scores = rand(0, B, L, 20)
    m = retrieval_mask(scores, 0.3, jnp.float32(0.5), None)
    k = math.ceil(0.3 * 20)
    np.testing.assert_array_equal(np.asarray(m).sum(-1), k)  # exactly k tokens per cue (distinct scores)
    top = np.argsort(-np.asarray(scores), axis=-1)[..., :k]
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(m), top, -1), 1.0)
    # straight-through: the gradient is the softmax's (non-zero), the forward stays exactly {0, 1}
    g = jax.grad(lambda s: (retrieval_mask(s, 0.3, jnp.float32(0.5), None) * rand(1, B, L, 20)).sum())(scores)
    assert float(jnp.abs(g).max()) > 1e-3
    # Gumbel noise changes the selection (training), never the count
    noisy = retrieval_mask(scores, 0.3, jnp.float32(0.5), jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(noisy).sum(-1), k)
    assert not np.array_equal(np.asarray(noisy), np.asarray(m))
    # a small tau (or a large scale) underflows the softmax to ties at 0: still exactly k, the top k of the scores
    sharp = retrieval_mask(scores, 0.3, jnp.float32(1e-3), None, scale=100.0)
    np.testing.assert_array_equal(sharp, m)


def test_score_scale_sets_how_far_the_noise_moves_the_selection():
    """Eq. (2) adds Gumbel noise (std 1.28) to cosines in [-1, 1]: at scale 1 the training selection keeps little
    more than chance (k / N) of the noise-free one; scaled up, the cosines decide. Cosines of random 64-d unit
    vectors, 225 tokens (VIPA-B's 15 x 15 map at 480 px), k = 68."""
    unit = lambda t: t / jnp.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
    scores = jnp.einsum("bld,bnd->bln", unit(rand(0, 4, 21, 64)), unit(rand(1, 4, 225, 64)))
    plain = retrieval_mask(scores, 0.3, jnp.float32(1.0), None)
    rows = jnp.ones((4, 21), bool)
    overlap = {a: float(selection_overlap(retrieval_mask(scores, 0.3, jnp.float32(1.0), jax.random.key(2), a), plain,
                                          rows)) for a in (1.0, 10.0, 1000.0)}  # fmt: skip
    assert abs(float(selection_overlap(plain, plain, rows)) - 1.0) < 1e-6
    assert 68 / 225 < overlap[1.0] < 0.4 and 0.55 < overlap[10.0] < 0.75 and overlap[1000.0] > 0.99, overlap
    np.testing.assert_array_equal(retrieval_mask(scores, 0.3, jnp.float32(1.0), None, 10.0), plain)  # eval: no effect


def test_cue_masks():
    np.testing.assert_array_equal(cue_mask(PAD, "both"), ~PAD)
    np.testing.assert_array_equal(cue_mask(PAD, "global"), np.eye(1, L, dtype=bool).repeat(B, 0))
    np.testing.assert_array_equal(cue_mask(PAD, "local")[:, 0], False)
    np.testing.assert_array_equal(cue_mask(PAD, "local")[:, 1:], ~PAD[:, 1:])
    with pytest.raises(ValueError, match="cues='words'"):
        cue_mask(PAD, "words")


def _veg(**kw):
    veg = VEG(dim=D, num_heads=2, **kw)
    v, words = rand(1, B, H, W, C), rand(2, B, L, 24)
    params = jax.jit(veg.init)(jax.random.key(0), v, words, PAD, ids=IDS)
    return veg, params, v, words


def test_veg_shapes_and_padded_words_are_invisible():
    veg, params, v, words = _veg()
    apply = jax.jit(veg.apply)
    out = apply(params, v, words, PAD)
    assert out["expression"].shape == (B, L, D) and out["global_logits"].shape == (B, H, W)
    np.testing.assert_array_equal(out["expression_mask"], ~PAD)
    np.testing.assert_array_equal(out["retrieved"].sum(-1), math.ceil(0.3 * H * W))
    other = words.at[0, 4:].set(rand(9, 2, 24))  # new content in row 0's padding
    again = apply(params, v, other, PAD)
    np.testing.assert_allclose(again["expression"][0, :4], out["expression"][0, :4], atol=1e-6)
    np.testing.assert_allclose(again["global_logits"], out["global_logits"], atol=1e-6)
    assert float(jnp.abs(again["expression"][0, 4:] - out["expression"][0, 4:]).max()) > 1e-4


def test_veg_full_ratio_equals_no_retrieval():
    veg, params, v, words = _veg(ratio=1.0)
    off = VEG(dim=D, num_heads=2, ratio=1.0, retrieve=False)
    a, b = veg.apply(params, v, words, PAD), off.apply(params, v, words, PAD)
    np.testing.assert_allclose(a["expression"], b["expression"], atol=1e-5)


def test_veg_train_mode_selection_follows_the_score_scale():
    """Train mode draws Gumbel noise: at scale 1 it moves the selection of a random-init VEG (cosines spread ~0.24,
    N = 20, k = 6, chance 0.3); at scale 1000 the cosines decide. Evaluation selects the same at any scale."""
    veg, params, v, words = _veg()
    plain = veg.apply(params, v, words, PAD)
    overlap = {}
    for a in (1.0, 1000.0):
        scaled = VEG(dim=D, num_heads=2, score_scale=a)
        np.testing.assert_array_equal(scaled.apply(params, v, words, PAD)["retrieved"], plain["retrieved"])
        draws = [scaled.apply(params, v, words, PAD, train=True, rngs={"dropout": jax.random.key(s)}) for s in range(4)]
        assert all(np.isfinite(np.asarray(d["expression"])).all() for d in draws)
        overlap[a] = np.mean([selection_overlap(d["retrieved"], plain["retrieved"], ~PAD) for d in draws])
    assert overlap[1.0] < 0.6 and overlap[1000.0] == 1.0, overlap


VEG_BASE = {"vision_in", "phi_v", "phi_l", "aggregate", "log_tau", "log_scale"}
STEP_6 = {"refine_attn", "refine_attn_norm", "refine_mlp", "refine_mlp_norm"}
STEP_7 = {"share_attn", "share_attn_norm", "share_mlp", "share_mlp_norm"}


@pytest.mark.parametrize(
    "switches, names",
    [({}, VEG_BASE | STEP_6 | STEP_7), ({"share": False}, VEG_BASE | STEP_6), ({"refine": False}, VEG_BASE),
     ({"refine": False, "share": False}, VEG_BASE)],
)  # fmt: skip
def test_veg_step_2_switches_parameter_sets(switches, names):
    """Table VI a "w/o step 2" (refine=False): no eq. (6) nor eq. (7), E_V = F_a; share=False: no eq. (7) alone."""
    veg = VEG(dim=D, num_heads=2, **switches)
    v, words = rand(1, B, H, W, C), rand(2, B, L, 24)
    params = jax.eval_shape(veg.init, jax.random.key(0), v, words, PAD)["params"]
    assert set(params) == names
    out = jax.eval_shape(veg.apply, {"params": params}, v, words, PAD)
    assert out["expression"].shape == (B, L, D)


def test_veg_skipped_words_are_no_cues():
    """Table IX "w/o articles": the words of skip_ids are masked like padding (no key of eq. 7 nor of the decoder),
    so new content there moves no other cue; with all words as cues the same change reaches every cue."""
    veg, params, v, words = _veg(skip_ids=(5,))
    apply = jax.jit(functools.partial(veg.apply, ids=IDS))
    out = apply(params, v, words, PAD)
    used = ~PAD & (IDS != 5)
    np.testing.assert_array_equal(out["expression_mask"], used)
    assert not used[0, 1] and not used[1, 2] and used.sum() == 8
    other = words.at[0, 1].set(rand(8, 24)).at[1, 2].set(rand(9, 24))  # new content in the articles' rows
    again = apply(params, v, other, PAD)
    assert float(jnp.abs(again["scores"][0, 1] - out["scores"][0, 1]).max()) > 1e-2  # their retrieval differs
    np.testing.assert_allclose(again["expression"][used], out["expression"][used], atol=1e-6)
    full = jax.jit(VEG(dim=D, num_heads=2).apply)  # the same weights, every word a cue
    a, b = full(params, v, words, PAD), full(params, v, other, PAD)
    np.testing.assert_array_equal(a["expression_mask"], ~PAD)
    assert float(jnp.abs(a["expression"][used] - b["expression"][used]).max()) > 1e-4
    assert float(jnp.abs(a["expression"][used] - out["expression"][used]).max()) > 1e-4
    with pytest.raises(ValueError, match=r"skip_ids=\(5,\): pass the token ids"):
        veg.apply(params, v, words, PAD)


def test_fusion_gate_learns_and_starts_near_identity_and_ignores_padding():
    v, words = rand(1, B, H, W, C), rand(2, B, L, 24)
    fusion = VisionLanguageFusion(dim=8, num_heads=2)
    params = fusion.init(jax.random.key(0), v, words, PAD)
    out, r = fusion.apply(params, v, words, PAD)
    assert 0 < float(jnp.abs(out - v).max()) < 0.05 * float(jnp.abs(v).max())  # tanh of a small gate
    assert r.shape == v.shape and float(jnp.abs(r).max()) > 0
    grads = jax.grad(lambda p: jnp.sum(fusion.apply(p, v, words, PAD)[0] ** 2))(params)["params"]
    for name in ("gate_1", "gate_2"):  # both zero (the old init) gave each exactly zero gradient, forever
        assert float(jnp.abs(grads[name]["kernel"]).max()) > 0, name
    dwords = jax.grad(lambda w: jnp.sum(fusion.apply(params, v, w, PAD)[0] ** 2))(words)
    assert float(jnp.abs(dwords[:, :4]).max()) > 0  # the sentence reaches the stage's output v'
    _, r2 = fusion.apply(params, v, words.at[0, 4:].set(0.0), PAD)
    np.testing.assert_allclose(r2, r, atol=1e-6)
    x = rand(3, 2, 7, 5)
    np.testing.assert_allclose(instance_norm(x).mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(instance_norm(x).var(1), 1, atol=1e-3)


def test_text_cross_layer_reads_the_vision_tokens():
    words, vision = rand(1, B, L, 24), rand(2, B, H, W, C)
    layer = TextCrossLayer(num_heads=2)
    params = layer.init(jax.random.key(0), words, vision)
    a = layer.apply(params, words, vision)
    b = layer.apply(params, words, vision * 2.0)
    assert a.shape == words.shape and float(jnp.abs(a - b).max()) > 1e-3


def test_decoder_shapes_and_masked_keys():
    feats = [rand(i, B, 16 // 2**i, 16 // 2**i, 8 * 2**i) for i in range(4)]
    kv, mask = rand(7, B, L, D), ~PAD
    dec = VipaDecoder(dim=D, num_heads=2)
    params = jax.jit(dec.init)(jax.random.key(0), feats, kv, mask)
    apply = jax.jit(dec.apply)
    out = apply(params, feats, kv, mask)
    assert out.shape == (B, 16, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(apply(params, feats, kv.at[0, 4:].set(0.0), mask), out, atol=1e-5)


def test_vipa_loss_parts():
    logits, glob = rand(1, B, 4, 4), rand(2, B, 2, 2)
    outputs = {"logits": logits, "global_logits": glob, "relevance": jnp.tanh(rand(4, B, 2, 2))}
    mask = (rand(3, B, 8, 8) > 0).astype(jnp.float32)
    loss, parts = vipa_loss(outputs, mask, (1.0, 2.0, 0.5))
    fg = to_mask_size(logits, mask)
    base = bce_loss(fg, mask) + 2 * dice_loss(fg, mask)
    np.testing.assert_allclose(loss, base + 0.5 * bce_loss(to_mask_size(glob, mask), mask), rtol=1e-6)
    assert set(parts) == {"loss_bce", "loss_dice", "loss_pixel_contrast"}
    loss, parts = vipa_loss(outputs, mask, (1.0, 2.0, 0.5), "threshold", ratio=0.5)  # Table VIII "direct thresholding"
    np.testing.assert_allclose(loss, base + 0.5 * threshold_loss(outputs["relevance"], mask, 0.5), rtol=1e-6)
    assert set(parts) == {"loss_bce", "loss_dice", "loss_relevance_threshold"}
    for weights, kind in (((1.0, 2.0, 0.5), "none"), ((1.0, 2.0, 0.0), "contrastive")):  # "w/o supervision"
        loss, parts = vipa_loss(outputs, mask, weights, kind)
        np.testing.assert_allclose(loss, base, rtol=1e-6)
        assert set(parts) == {"loss_bce", "loss_dice"}
    with pytest.raises(ValueError, match="relevance_loss='hinge'"):
        vipa_loss(outputs, mask, relevance_loss="hinge")


def test_threshold_loss_numbers_and_gradient():
    """k = ceil(0.5 * 4) = 2: t = (0.35 + 0.1) / 2 = 0.225, midway between the 2nd and 3rd largest; targets below
    t + 0.1 and others above t - 0.1 pay the gap. Pixels: (0.5, off) 0.375, (0.1, on) 0.225, (-0.2, off) 0, (0.35,
    on) 0 -> mean 0.15; t gets no gradient, so each pixel's is -1/4 (target), +1/4 (other) or 0 (no gap)."""
    s = jnp.array([[[0.5, 0.1], [-0.2, 0.35]]])
    y = jnp.array([[[0.0, 1.0], [0.0, 1.0]]])
    np.testing.assert_allclose(threshold_loss(s, y, 0.5), 0.15, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(threshold_loss)(s, y, 0.5), [[[0.25, -0.25], [0.0, 0.0]]], atol=1e-7)
    perfect = jnp.array([[[0.1, 0.9], [-0.9, 0.8]]])  # the targets are the top 2, 0.7 above the others
    assert float(threshold_loss(perfect, y, 0.5)) == 0.0
    # k = N: t is the smallest, -0.9; the two others pay 0.1 + 1.0 and 0.1 + 0.0
    np.testing.assert_allclose(threshold_loss(perfect, y, 1.0), (1.1 + 0.1) / 4, rtol=1e-6)


def test_poly_schedule_and_bad_schedule():
    cfg = ConfigDict(dict(lr=1e-3, epochs=2, lr_schedule="poly", lr_power=0.9, weight_decay=1e-2))
    _, schedule = make_optimizer(cfg, steps_per_epoch=5)
    for c in (0, 3, 9):
        np.testing.assert_allclose(schedule(c), 1e-3 * (1 - c / 10) ** 0.9, rtol=1e-5)
    assert float(schedule(10)) == 0.0
    tx, _ = make_optimizer(cfg, steps_per_epoch=5)
    assert isinstance(tx, optax.GradientTransformation)
    cfg.lr_schedule = "cosine"
    with pytest.raises(ConfigError, match="lr_schedule='cosine'"):
        make_optimizer(cfg, steps_per_epoch=5)


def test_no_decay_and_lr_scale_groups():
    """VIPA's no-decay group and TFANet's backbone rate: one step of AdamW on zero gradients is pure decay, so each
    parameter moves by -lr * scale * wd * p where it decays and stays where it does not."""
    params = {
        "image_encoder": {"norm1": {"scale": jnp.ones(3)}, "fc": {"kernel": jnp.ones(3)}},
        "decoder": {"w": jnp.ones(3)},
    }
    cfg = ConfigDict(dict(lr=0.1, epochs=1, weight_decay=0.5, no_decay=("norm",), lr_scale=(("^image_encoder/", 0.5),)))
    tx, _ = make_optimizer(cfg, steps_per_epoch=10)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["image_encoder"]["norm1"]["scale"], 0.0)
    np.testing.assert_allclose(updates["image_encoder"]["fc"]["kernel"], -0.1 * 0.5 * 0.5)
    np.testing.assert_allclose(updates["decoder"]["w"], -0.1 * 0.5)
    cfg.no_decay = ("nrom",)
    tx, _ = make_optimizer(cfg, steps_per_epoch=10)
    with pytest.raises(ConfigError, match="config.train.no_decay: pattern 'nrom' matches no trainable parameter"):
        tx.init(params)
