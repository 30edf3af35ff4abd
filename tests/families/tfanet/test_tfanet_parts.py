"""TFANet's three stages at tiny sizes: shapes, X-Norm and linear-attention algebra, padding, scale switches,
gradients, and a few Adam steps of MLAM -> fusion -> CFSM -> WFDM fitting random maps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wimfris_jax.families.tfanet import (
    CFSM,
    MLAM,
    WFDM,
    FusionBlock,
    TFANetLevel,
    foreground_logits,
    linear_attention,
    tfanet_loss,
    xnorm,
)

B, L, CT = 2, 5, 12
# The sequential scan compiles several times faster than the unrolled one these tiny sizes would default to.
SCANS = dict(scan_impl="sequential", spatial_kwargs=dict(scan_impl="sequential"))
SMALL = dict(mlam=dict(dim=8, scales=(1, 3)), fusion=dict(dim=8), cfsm=dict(channel_res=4, **SCANS))


def _build(model, *args):
    """Jitted init and apply: eager Flax dispatch is far slower than compiling these small graphs, and an "rbg"
    key compiles the initialisers about three times faster than threefry on CPU."""
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), *args), jax.jit(model.apply)


def _inputs(h=4, w=4, c=8, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    visual = jax.random.normal(k1, (B, h, w, c))
    words = jax.random.normal(k2, (B, L, CT))
    pad = jnp.array([[False, False, False, True, True], [False, False, False, False, True]])
    return visual, words, pad


def _scramble_padding(words, pad, seed=1):
    noise = 100.0 * jax.random.normal(jax.random.PRNGKey(seed), words.shape)
    return jnp.where(pad[..., None], noise, words)


def test_xnorm_is_scale_invariant():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
    gamma = jax.random.uniform(jax.random.PRNGKey(1), (16,), minval=0.5, maxval=2.0)
    np.testing.assert_allclose(xnorm(37.5 * x, gamma), xnorm(x, gamma), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(xnorm(x, jnp.ones(16)), axis=-1), 1.0, rtol=1e-6)
    # Hence the attention is unchanged by rescaling Q, K or V.
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 2, 4)) for i in (2, 3, 4))
    g = jnp.ones((2, 4))
    np.testing.assert_allclose(
        linear_attention(3.0 * q, 0.2 * k, 5.0 * v, g, g), linear_attention(q, k, v, g, g), rtol=1e-5, atol=1e-6
    )


def test_linear_attention_equals_explicit_quadratic_form():
    """Q (K^T V) with X-Norm == (Q^ K^^T) V, the N_q x N_k attention matrix written out, same normalisation."""
    rng = np.random.default_rng(0)
    b, nq, nk, nh, dh = 2, 7, 9, 2, 4
    q, k, v = (rng.standard_normal((b, n, nh, dh)) for n in (nq, nk, nk))
    gq, gkv = rng.uniform(0.5, 2.0, (nh, dh)), rng.uniform(0.5, 2.0, (nh, dh))
    valid = np.ones((b, nk))
    valid[0, -3:] = 0.0
    got = linear_attention(*(jnp.asarray(t, jnp.float32) for t in (q, k, v, gq, gkv, valid)))
    km = k * valid[:, :, None, None]
    ref = np.zeros((b, nq, nh, dh))
    for i in range(b):
        for h in range(nh):
            qn = gq[h] * q[i, :, h] / np.linalg.norm(q[i, :, h], axis=-1, keepdims=True)
            r = np.linalg.norm(km[i, :, h].T @ v[i, :, h], axis=-1)  # row norms of K^T V, (dh,)
            attn = qn @ (km[i, :, h] / r).T  # (nq, nk): the explicit attention matrix
            ref[i, :, h] = (attn @ v[i, :, h]) * gkv[h]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_mlam_shapes_and_padding():
    visual, words, pad = _inputs()
    params, apply = _build(MLAM(dim=8, num_heads=2), visual, words, pad)
    f_lv, f_vl = apply(params, visual, words, pad)
    assert f_lv.shape == visual.shape and f_vl.shape == words.shape
    assert float(jnp.abs(jnp.where(pad[..., None], f_vl, 0.0)).max()) == 0.0
    # Padded words' content changes nothing, on the pixels nor on the real words ...
    f_lv2, f_vl2 = apply(params, visual, _scramble_padding(words, pad), pad)
    np.testing.assert_allclose(f_lv2, f_lv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f_vl2, f_vl, rtol=1e-6, atol=1e-6)
    # ... nor does their number.
    longer = jnp.concatenate([words, jnp.ones((B, 3, CT))], axis=1)
    f_lv3, f_vl3 = apply(params, visual, longer, jnp.concatenate([pad, jnp.ones((B, 3), bool)], axis=1))
    np.testing.assert_allclose(f_lv3, f_lv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_vl3[:, :L], f_vl, rtol=1e-5, atol=1e-5)


def test_mlam_scale_switches_change_parameters():
    visual, words, pad = _inputs()
    names = {}
    for scales in [(1,), (1, 3), (1, 3, 5), (3,)]:
        shapes = jax.eval_shape(MLAM(dim=8, scales=scales).init, jax.random.PRNGKey(0), visual, words, pad)
        names[scales] = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
        assert shapes["params"]["image_to_text"]["scale_weights"].shape == (len(scales),)
    assert names[(1,)] < names[(1, 3)] < names[(1, 3, 5)]
    assert not any("_5x5" in n or "_3x3" in n for n in names[(1,)])
    assert any("q_5x5" in n for n in names[(1, 3, 5)]) and any("k_5']" in n for n in names[(1, 3, 5)])
    assert names[(3,)] == names[(1, 3)]  # the pointwise part is shared by the scales ...
    # Eq. (10)/(15): the scales are separate branches summed with weights w_k: with w = (0, 1) the (1, 3) module
    # is the (3,) module with w = (1,).
    params, _ = _build(MLAM(dim=8, scales=(1, 3)), visual, words, pad)
    p13, p3 = (jax.tree_util.tree_map(lambda x: x, params) for _ in range(2))
    for direction in ("image_to_text", "text_to_image"):
        p13["params"][direction]["scale_weights"] = jnp.array([0.0, 1.0])
        p3["params"][direction]["scale_weights"] = jnp.array([1.0])
    np.testing.assert_allclose(
        MLAM(dim=8, scales=(3,)).apply(p3, visual, words, pad)[0],
        MLAM(dim=8, scales=(1, 3)).apply(p13, visual, words, pad)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="odd"):
        jax.eval_shape(MLAM(scales=(2,)).init, jax.random.PRNGKey(0), visual, words, pad)


def test_fusion_block_shapes_and_padding():
    visual, words, pad = _inputs(h=3, w=5)
    params, apply = _build(FusionBlock(dim=6), visual, words, pad)
    block = apply(params, visual, words, pad)
    assert block.shape == (B, 3, 5, 3 * 8)
    np.testing.assert_allclose(block[..., 8:16], visual)  # E(F_LV) = F_LV, eq. (18)
    assert np.allclose(block[:, 0, 0, :8], block[:, 2, 4, :8])  # E(F_VL) is broadcast, eq. (17)
    assert params["params"]["conv"]["kernel"].shape == (3, 3, L, 8)  # F_f (H, W, L) -> F_c (H, W, C)
    np.testing.assert_allclose(apply(params, visual, _scramble_padding(words, pad), pad), block, atol=1e-6)


class _StandIn(nn.Module):
    """A stand-in with SS2D's constructor: depthwise 3x3 conv + linear."""

    d_model: int
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    conv_bias: bool = False
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.d_model, (3, 3), padding="SAME", feature_group_count=self.d_model)(x)
        return nn.Dense(self.d_model, name="stand_in")(x)


@pytest.mark.parametrize("spatial", [None, _StandIn])
def test_cfsm_shapes(spatial):
    block = jax.random.normal(jax.random.PRNGKey(0), (B, 8, 6, 3 * 4))
    scans = SCANS if spatial is None else dict(scan_impl="sequential")
    model = CFSM(channel_res=4, spatial=spatial, **scans)
    if spatial is None:  # the real SS2D by shapes only: the end-to-end test runs it
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), block)
        assert jax.eval_shape(model.apply, params, block).shape == (B, 8, 6, 4)
    else:
        params, apply = _build(model, block)
        out = apply(params, block)
        assert out.shape == (B, 8, 6, 4) and bool(jnp.isfinite(out).all())
    p = params["params"]
    # The channel scan: the 3C channels are the sequence, the 4 x 4 resized grid the Mamba width.
    assert p["cssm"]["forward"]["in_proj"]["kernel"].shape == (16, 2 * 2 * 16)
    assert "backward" in p["cssm"] and "reduce" in p
    assert ("stand_in" in p["scsm"]) == (spatial is _StandIn)
    one_way = CFSM(channel_res=4, spatial=spatial, bidirectional=False, **scans)
    assert "backward" not in jax.eval_shape(one_way.init, jax.random.PRNGKey(0), block)["params"]["cssm"]


def test_wfdm_shapes_alpha_and_order():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    feats = [jax.random.normal(keys[0], (B, 2, 2, 16)), jax.random.normal(keys[1], (B, 4, 4, 8))]
    lang = [jax.random.normal(keys[2], (B, 2, 2, 16)), jax.random.normal(keys[3], (B, 2, 2, 8))]  # 2nd resized
    two = WFDM(dim=6, out_channels=2)
    two_params = jax.eval_shape(two.init, jax.random.PRNGKey(0), feats, lang)
    assert jax.eval_shape(two.apply, two_params, feats, lang).shape == (B, 4, 4, 2)
    params, apply = _build(WFDM(dim=6), feats, lang)
    assert apply(params, feats, lang).shape == (B, 4, 4, 1)
    np.testing.assert_allclose(jax.nn.sigmoid(params["params"]["alpha_1"]), 0.5)
    fixed = jax.eval_shape(WFDM(dim=6, learn_alpha=False).init, jax.random.PRNGKey(0), feats, lang)
    assert not any(k.startswith("alpha") for k in fixed["params"])
    with pytest.raises(ValueError, match="coarse to fine"):
        jax.eval_shape(WFDM(dim=6).init, jax.random.PRNGKey(0), feats[::-1], lang[::-1])


def test_loss_one_or_two_channels():
    s2 = jax.random.normal(jax.random.PRNGKey(0), (B, 4, 4, 2))
    s1 = (s2[..., 1] - s2[..., 0])[..., None]
    mask = (jax.random.uniform(jax.random.PRNGKey(1), (B, 8, 8)) > 0.5).astype(jnp.float32)
    np.testing.assert_allclose(foreground_logits(s2), s1[..., 0])
    np.testing.assert_allclose(tfanet_loss(s2, mask), tfanet_loss(s1, mask), rtol=1e-6)
    assert np.isfinite(float(tfanet_loss(s1, mask)))


class _Tiny(nn.Module):
    """One TFANetLevel (8 x 8 x 8) then WFDM over two levels: its output average-pooled to 4 x 4 (the coarse
    level) and itself; one level keeps the compile short, the two WFDM levels keep eq. (26)'s merge."""

    @nn.compact
    def __call__(self, visual, words, pad):
        f_f, f_lv = TFANetLevel(name="level", **SMALL)(visual, words, pad)
        pool = lambda x: nn.avg_pool(x, (2, 2), (2, 2))
        return WFDM(dim=8)([pool(f_f), f_f], [pool(f_lv), f_lv])


def test_end_to_end_gradients_and_fit():
    visual, words, pad = _inputs(h=8, w=8)
    yy, xx = jnp.meshgrid(jnp.arange(16), jnp.arange(16), indexing="ij")
    mask = jnp.stack([(yy < 8) & (xx < 10), (yy > 5) & (xx > 4)]).astype(jnp.float32)  # (B, 16, 16)
    params, _ = _build(_Tiny(), visual, words, pad)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(params, words):
        scores = _Tiny().apply(params, visual, words, pad)
        return tfanet_loss(scores, mask), scores

    @jax.jit
    def update(params, state, grads):
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # one compile for the checks and the steps
    (first, scores), grads = grad_fn(params, words)
    # Padded words change nothing downstream either.
    (_, scrambled), _ = grad_fn(params, _scramble_padding(words, pad))
    np.testing.assert_allclose(scrambled, scores, atol=1e-5)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) > 0.9 * len(leaves)
    for _ in range(15):
        params, state = update(params, state, grads)
        (loss, _), grads = grad_fn(params, words)
    assert float(loss) < 0.5 * float(first), (float(first), float(loss))


def test_stacked_cfsms_read_the_updated_visual_part():
    """``cfsm_depth=2`` (ReMamber's two Twister blocks): CFSM_2 reads F_Block with F_F^1 added to its visual part
    (channels C..2C of [E(F_VL), F_LV, F_c]) and the unit returns F_F^1 + F_F^2; "cfsm" keeps its name, so depth 1
    with the same first-block parameters gives F_F^1."""
    visual, words, pad = _inputs()
    c = visual.shape[-1]
    variables, _ = _build(TFANetLevel(cfsm_depth=2, **SMALL), visual, words, pad)
    p = variables["params"]
    assert set(p) == {"mlam", "fusion", "cfsm", "cfsm_1"}
    cfsm = CFSM(features=c, **SMALL["cfsm"])

    @jax.jit
    def run(p):
        deep, _ = TFANetLevel(cfsm_depth=2, **SMALL).apply({"params": p}, visual, words, pad)
        first = {k: p[k] for k in ("mlam", "fusion", "cfsm")}
        one, _ = TFANetLevel(**SMALL).apply({"params": first}, visual, words, pad)
        f_lv, f_vl = MLAM(**SMALL["mlam"]).apply({"params": p["mlam"]}, visual, words, pad)
        block = FusionBlock(**SMALL["fusion"]).apply({"params": p["fusion"]}, f_lv, f_vl, pad)
        f_1 = cfsm.apply({"params": p["cfsm"]}, block)
        f_2 = cfsm.apply({"params": p["cfsm_1"]}, block.at[..., c : 2 * c].add(f_1))
        stale = cfsm.apply({"params": p["cfsm_1"]}, block)  # the second block on the unchanged visual part
        return deep, one, f_1, f_2, stale

    deep, one, f_1, f_2, stale = run(p)
    np.testing.assert_allclose(one, f_1, atol=1e-5)
    np.testing.assert_allclose(deep, f_1 + f_2, atol=1e-5)
    assert float(jnp.abs(deep - one).mean()) > 0.1 * float(jnp.abs(one).mean())  # the second block counts
    assert float(jnp.abs(f_2 - stale).max()) > 1e-3  # and it saw F_LV + F_F^1, not F_LV
