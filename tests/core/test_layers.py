"""Shared layers (wimfris_jax/layers.py): the pointwise-convolution path, the fusion barrier, dropout and the
rematerialisation switch, including the tiny WIMFRIS under every remat mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_model import small_tiny_config

from wimfris_jax import layers
from wimfris_jax import model as model_lib


@pytest.mark.parametrize("padding", ["SAME", ((0, 0), (0, 0)), 0])
def test_conv_runs_1x1_as_a_matrix_product_with_the_same_result(padding):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7))
    ours, ref = layers.conv(4, (1, 1), padding=padding), nn.Conv(4, (1, 1), padding=padding)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-6)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda p: ours.apply(p, x))(params))
    k3 = layers.conv(4, (3, 3), padding=1)  # anything else stays a convolution
    p3 = k3.init(jax.random.key(2), x)
    np.testing.assert_allclose(k3.apply(p3, x), nn.Conv(4, (3, 3), padding=1).apply(p3, x), atol=1e-6)


def test_fusion_barrier_is_the_identity_forward_and_backward():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    f = lambda x: jnp.sum(jnp.sin(layers.fusion_barrier(x * 2.0)) ** 2)  # noqa: E731
    g = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(x), g(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(g)(x), rtol=1e-6)
    hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
    assert "while" in hlo  # the barrier survived XLA's simplifications


def test_dropout_rate_scale_and_determinism():
    x = jnp.ones((64, 100, 30))
    drop = layers.Dropout(0.25)
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layers.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})


def test_resolve_remat():
    assert layers.resolve_remat("auto", "cpu") == "none"
    assert (layers.resolve_remat("auto", "gpu"), layers.resolve_remat("auto", "tpu")) == ("dots", "dots")
    assert layers.resolve_remat("block", "gpu") == "block"
    with pytest.raises(ValueError, match="train.remat"):
        layers.resolve_remat("full")


def test_remat_modes_keep_parameters_and_gradients_of_the_tiny_model():
    cfg = small_tiny_config()  # every module kind the remat modes wrap, fewer layers (compile time)
    cfg.model.decoder.dropout = cfg.model.vision_adapter.dropout = 0.0  # equal forwards; remat re-derives dropout keys
    x = jax.random.normal(jax.random.key(5), (2, 64, 64, 3))
    ids = jnp.asarray(np.r_[[1, 5, 9, 49407], [0] * 13][None].repeat(2, 0), jnp.int32)
    variables = jax.jit(model_lib.build_model(cfg.model).init)(jax.random.key(0), x, ids)

    def grads(mode):
        model = model_lib.build_model(cfg.model, remat_mode=mode)
        shapes = jax.eval_shape(model.init, jax.random.key(0), x, ids)  # the same names, nothing computed
        assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)

        def loss(p):
            out, _ = model.apply({**variables, "params": p}, x, ids, train=True, mutable=["batch_stats"])
            return jnp.mean(out["logits"] ** 2)

        return jax.jit(jax.grad(loss))(variables["params"])

    ref = grads("none")
    for mode in ("block", "dots"):
        for a, b in zip(jax.tree_util.tree_leaves(grads(mode)), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4 * max(1.0, float(jnp.abs(b).max())))
