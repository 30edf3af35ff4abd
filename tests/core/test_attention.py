"""The attention function (wimfris_jax/attention.py): every implementation against flax's reference maths, with
masks, dropout and gradients; the implementation ``auto`` picks; the flax module wiring."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from wimfris_jax import attention as att
from wimfris_jax.platform import targeting

B, T, S, H, D = 2, 37, 29, 3, 8


def _qkv(t=T, s=S, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return f(B, t, H, D), f(B, s, H, D), f(B, s, H, D)


def _masks(t=T, s=S):
    r = np.random.default_rng(1)
    all_but_two = np.zeros((B, 1, t, s), bool)
    all_but_two[:, :, :2] = True  # rows 2.. attend to nothing: flax attends uniformly there
    return {
        "none": None,
        "key padding (B,1,1,S)": jnp.asarray(r.random((B, 1, 1, s)) > 0.3),
        "per head and query (B,H,T,S)": jnp.asarray(r.random((B, H, t, s)) > 0.3),
        "rows with no key": jnp.asarray(all_but_two),
    }


@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("chunk", [8, 16, 64])  # 37 queries: 5 padded chunks of 8, 3 of 16, one chunk
def test_chunked_matches_flax_values_and_gradients(mask_name, chunk):
    q, k, v = _qkv()
    mask = _masks()[mask_name]
    w = _qkv(seed=2)[0]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ref = lambda q, k, v: nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    ours = lambda q, k, v: att.chunked_attention(q, k, v, mask, chunk_size=chunk)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(ours)(q, k, v)), np.asarray(ref(q, k, v)), atol=1e-6)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=f"d{name}")


def test_causal_self_attention_matches_flax():
    q, k, v = _qkv(s=T)
    mask = nn.make_causal_mask(jnp.ones((B, T)))
    for impl in ("xla", "chunked"):
        out = att.dot_product_attention(q, k, v, mask, implementation=impl)
        np.testing.assert_allclose(out, nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6, err_msg=impl)


def test_chunked_dropout_drops_at_the_rate_and_its_gradient_is_consistent():
    q, k, v = _qkv()
    key = jax.random.key(3)
    f = lambda q, k, v: att.chunked_attention(q, k, v, dropout_rng=key, dropout_rate=0.3, chunk_size=16)  # noqa: E731
    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)  # same masks forward and backward
    a, b = f(q, k, v), f(q, k, v)
    np.testing.assert_array_equal(a, b)  # deterministic given the key
    plain = att.chunked_attention(q, k, v, chunk_size=16)
    assert float(jnp.abs(a - plain).max()) > 1e-3  # dropout did act
    keep = att.keep_mask(jax.random.key(0), 0.3, (400, 500))
    assert abs(float(keep.mean()) - 0.7) < 0.005


def test_dense_path_dropout_and_deterministic_switch():
    q, k, v = _qkv()
    key = jax.random.key(4)
    det = att.dot_product_attention(q, k, v, implementation="xla", dropout_rng=key, dropout_rate=0.5)
    np.testing.assert_allclose(det, nn.dot_product_attention(q, k, v), atol=1e-6)  # deterministic=True: no dropout
    dropped = att.dot_product_attention(
        q, k, v, implementation="xla", dropout_rng=key, dropout_rate=0.5, deterministic=False
    )
    assert float(jnp.abs(dropped - det).max()) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        att.dot_product_attention(q, k, v, dropout_rate=0.1, deterministic=False)


def test_auto_picks_by_target_platform_sequence_length_and_dtype():
    long_k, short_k = jnp.zeros((1, 1029, 12, 64)), jnp.zeros((1, 17, 12, 64))
    q = jnp.zeros((1, 1029, 12, 64))
    with targeting("cpu"):
        assert att.resolve("auto", q, long_k) == "chunked"
        assert att.resolve("auto", q, short_k) == "xla"
        assert att.resolve("auto", q, long_k, dropout=True) == "chunked"  # chunked draws its own dropout
        assert att.resolve("xla", q, short_k, dropout=True) == "dense"  # jax.nn has no dropout
        with pytest.raises(ValueError, match="NVIDIA GPU, but this is compiled for 'cpu'"):
            att.resolve("cudnn", q, long_k)
    half = jnp.zeros((1, 1029, 12, 64), jnp.bfloat16)
    msa = jnp.zeros((1, 1029, 4, 12), jnp.bfloat16)  # head size 12: no multiple of 8
    wide = jnp.zeros((1, 9, 2, 160), jnp.bfloat16)  # head size over 128
    with targeting("cuda"):  # a GPU compile from this CPU host: the GPU's choices
        assert att.resolve("auto", half, half) == att.resolve("cudnn", half, half) == "cudnn"  # odd: padded
        assert att.resolve("auto", q, long_k) == att.resolve("cudnn", q, long_k) == "xla"  # float32
        assert att.resolve("auto", half, half, dropout=True) == "dense"  # XLA maths with its own dropout
        assert att.resolve("auto", msa, msa) == att.resolve("cudnn", msa, msa) == "xla"  # refused: XLA, no error
        assert att.resolve("auto", wide, wide) == "xla"
    with targeting("tpu"):
        assert att.resolve("auto", half, half) == "xla"
    with pytest.raises(ValueError, match="choose one of"):
        att.resolve("flash", q, long_k)


@pytest.mark.parametrize("mask_name", [m for m in _masks() if m != "rows with no key"])  # (*)
@pytest.mark.parametrize("t,s", [(T, S), (36, 29), (37, 30), (36, 30)])  # odd/even queries and keys
def test_padded_path_equals_the_unpadded_one_values_and_gradients(mask_name, t, s):
    """The cuDNN path's padding (odd lengths up to a multiple of 16, real lengths as query/key lengths) through
    jax.nn's XLA implementation, which honours the same lengths: equal to the unpadded call, forward and
    gradients w.r.t. q, k, v (cuDNN itself needs a GPU: benchmarks/device_check.py compares it there).
    (*) A row with no allowed key has no defined attention (flax's convention: uniform over the keys); padded, it is
    uniform over the padded keys too. No attention of the models has such rows."""
    q, k, v = _qkv(t, s)
    mask = _masks(t, s)[mask_name]
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")  # noqa: E731
    pad = lambda q, k, v: att.padded_attention(q, k, v, mask, "xla")  # noqa: E731
    np.testing.assert_allclose(pad(q, k, v), ref(q, k, v), atol=1e-6)
    w = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_pad = jax.grad(lambda *a: jnp.sum(pad(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_pad, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_padding_lengths_and_cost(monkeypatch):
    """1,029 tokens run as 1,040 (2.1% more attention FLOPs); 17 words as 32; even lengths unpadded."""
    seen, real = [], jax.nn.dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    for t, s in ((1029, 1029), (1024, 17), (18, 18)):
        q, k, v = (jnp.zeros((1, n, 1, 8)) for n in (t, s, s))
        att.padded_attention(q, k, v, None, "xla")
    assert seen == [(1040, 1040), (1024, 32), (18, 18)]
    assert (1040 / 1029) ** 2 - 1 < 0.022


def test_flax_module_keeps_parameters_and_matches_the_default_attention():
    x = _qkv()[0].reshape(B, T, H * D)
    ours = att.multi_head_attention(H, H * D, implementation="chunked")
    ref = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D, out_features=H * D)
    params = ref.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        nn.MultiHeadDotProductAttention(
            num_heads=H, dropout_rate=0.1, attention_fn=att.attention_fn("xla")
        ).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, deterministic=False)
