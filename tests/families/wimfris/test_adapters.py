"""MTA (eq. 1) and MSA / RFMixer / emphasis (eq. 2-3): composition, references, masking, causality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal

from wimfris_jax.families.wimfris.adapters.msa import MultiScaleAligner, RFMixer, logit
from wimfris_jax.families.wimfris.adapters.mta import MambaTextAdapter
from wimfris_jax.ssm.mamba import Mamba

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------------------------------- MTA
def test_mta_is_up_of_mamba_plus_skip():
    """Eq. (1): out = Up(Mamba(ReLU(Down(x))) + ReLU(Down(x)))."""
    mta = MambaTextAdapter(width=16, dim=8, d_state=4)
    x = normal(1, (2, 9, 16))
    params = mta.init(KEY, x)["params"]
    out = mta.apply({"params": params}, x)
    p = params
    x_fc = jax.nn.relu(x @ p["down"]["kernel"] + p["down"]["bias"])
    mixed = Mamba(d_model=8, d_state=4).apply({"params": p["mamba"]}, x_fc)
    want = (mixed + x_fc) @ p["up"]["kernel"] + p["up"]["bias"]
    assert out.shape == (2, 9, 16)
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert float(jnp.abs(mixed).max()) > 1e-3  # the Mamba branch contributes


def test_mta_is_causal():
    """Changing tokens after position t leaves outputs 0..t unchanged (so trailing padding cannot matter)."""
    mta = MambaTextAdapter(width=16, dim=8, d_state=4)
    x = normal(2, (2, 9, 16))
    params = mta.init(KEY, x)
    y = x.at[:, 5:].set(normal(3, (2, 4, 16)))
    a, b = mta.apply(params, x), mta.apply(params, y)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-4


def test_mta_up_init():
    x = normal(4, (2, 9, 16))
    zero = MambaTextAdapter(width=16, dim=8, d_state=4, zero_init_up=True)
    assert float(jnp.abs(zero.apply(zero.init(KEY, x), x)).max()) == 0.0
    default = MambaTextAdapter(width=16, dim=8, d_state=4)
    params = default.init(KEY, x)["params"]
    bound = 1 / math.sqrt(8)  # PyTorch nn.Linear default: U(+-1/sqrt(fan_in))
    assert 0.5 * bound < float(jnp.abs(params["up"]["kernel"]).max()) <= bound
    assert float(jnp.abs(params["up"]["bias"]).max()) == 0.0


def test_mta_rejects_wrong_width():
    with pytest.raises(ValueError, match="width=16"):
        MambaTextAdapter(width=16, dim=8).init(KEY, jnp.zeros((1, 4, 12)))


# ------------------------------------------------------------------------------------------------ RFMixer
def _dwconv_np(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Depthwise 'same' cross-correlation, x (h, w, d), kernel (kh, kw, d)."""
    kh, kw, _ = kernel.shape
    xp = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            out += xp[i : i + x.shape[0], j : j + x.shape[1]] * kernel[i, j]
    return out + bias


@pytest.mark.parametrize("kernels", [(3, 5, 7), (1, 3, 5), (1, 1, 1)])
def test_rfmixer_matches_numpy(kernels):
    """Eq. (2): ReLU(x + sum_k DWConv_kx1(DWConv_1xk(x))) * x, 'same' padding, per channel."""
    mixer = RFMixer(kernels)
    x = np.asarray(jax.nn.relu(normal(5, (2, 9, 11, 6))))
    params = mixer.init(KEY, x)["params"]
    out = np.asarray(mixer.apply({"params": params}, x))
    for b in range(2):
        total = x[b].copy()
        for n, k in enumerate(kernels):
            h, v = params[f"branch{n}_1xk"], params[f"branch{n}_kx1"]
            assert h["kernel"].shape == (1, k, 1, 6) and v["kernel"].shape == (k, 1, 1, 6)
            y = _dwconv_np(x[b], np.asarray(h["kernel"])[:, :, 0], np.asarray(h["bias"]))
            total += _dwconv_np(y, np.asarray(v["kernel"])[:, :, 0], np.asarray(v["bias"]))
        np.testing.assert_allclose(out[b], np.maximum(total, 0) * x[b], rtol=1e-5, atol=1e-5)


def test_rfmixer_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        RFMixer((3, 4)).init(KEY, jnp.zeros((1, 4, 4, 2)))


# ---------------------------------------------------------------------------------------------------- MSA
GRID, PREFIX, WIDTH, TEXT = (4, 5), 3, 32, 24


def _msa_inputs():
    x = normal(6, (2, PREFIX + GRID[0] * GRID[1], WIDTH))
    words = normal(7, (2, 6, TEXT))
    pad = jnp.array([[False] * 4 + [True] * 2, [False] * 6])
    return x, words, pad


def _apply_msa(msa, params, x, words, pad):
    return msa.apply(params, x, words, pad, grid=GRID, num_prefix=PREFIX, train=False)


def test_msa_matches_reference():
    """alpha * Up(x_mix + softmax-attention(x_mix -> words, padding masked)), prefix tokens skip the RFMixer."""
    msa = MultiScaleAligner(width=WIDTH, dim=8, num_heads=2, kernels=(3, 5))
    x, words, pad = _msa_inputs()
    variables = msa.init(KEY, x, words, pad, grid=GRID, num_prefix=PREFIX, train=False)
    p = variables["params"]
    out = _apply_msa(msa, variables, x, words, pad)

    x0 = jax.nn.relu(x @ p["down"]["kernel"] + p["down"]["bias"])
    mixed = RFMixer((3, 5)).apply({"params": p["rfmixer"]}, x0[:, PREFIX:].reshape(2, *GRID, 8))
    x_mix = jnp.concatenate([x0[:, :PREFIX], mixed.reshape(2, -1, 8)], axis=1)
    a = p["cross_attn"]
    q = jnp.einsum("btc,chd->bthd", x_mix, a["query"]["kernel"]) + a["query"]["bias"]
    k = jnp.einsum("blc,chd->blhd", words, a["key"]["kernel"]) + a["key"]["bias"]
    v = jnp.einsum("blc,chd->blhd", words, a["value"]["kernel"]) + a["value"]["bias"]
    s = jnp.einsum("bthd,blhd->bhtl", q, k) / math.sqrt(4)
    s = jnp.where(pad[:, None, None, :], -jnp.inf, s)
    att = jnp.einsum("bhtl,blhd->bthd", jax.nn.softmax(s, axis=-1), v)
    att = jnp.einsum("bthd,hdc->btc", att, a["out"]["kernel"]) + a["out"]["bias"]
    fused = (x_mix + att) @ p["up"]["kernel"] + p["up"]["bias"]
    np.testing.assert_allclose(out, 0.2 * fused, rtol=1e-5, atol=1e-5)


def test_msa_padding_is_masked():
    msa = MultiScaleAligner(width=WIDTH, dim=8, num_heads=2)
    x, words, pad = _msa_inputs()
    variables = msa.init(KEY, x, words, pad, grid=GRID, num_prefix=PREFIX, train=False)
    ref = _apply_msa(msa, variables, x, words, pad)
    at_pad = words.at[0, 4:].set(100.0)  # padded positions of sample 0
    np.testing.assert_array_equal(_apply_msa(msa, variables, x, at_pad, pad), ref)
    at_word = words.at[0, 2].set(3.0)
    assert float(jnp.abs(_apply_msa(msa, variables, x, at_word, pad) - ref).max()) > 1e-4


def test_msa_emphasis():
    """alpha = sigmoid(p), p0 = logit(0.2); EP off: constant 0.2 and no parameter."""
    x, words, pad = _msa_inputs()
    msa = MultiScaleAligner(width=WIDTH, dim=8, num_heads=2)
    variables = msa.init(KEY, x, words, pad, grid=GRID, num_prefix=PREFIX, train=False)
    p0 = variables["params"]["emphasis_logit"]
    assert p0.shape == () and abs(float(p0) - math.log(0.25)) < 1e-7
    assert abs(float(msa.apply(variables, method=MultiScaleAligner.alpha)) - 0.2) < 1e-7
    ref = _apply_msa(msa, variables, x, words, pad)
    moved = {"params": {**variables["params"], "emphasis_logit": jnp.float32(logit(0.7))}}
    np.testing.assert_allclose(_apply_msa(msa, moved, x, words, pad), ref * (0.7 / 0.2), rtol=1e-5, atol=1e-6)

    fixed = MultiScaleAligner(width=WIDTH, dim=8, num_heads=2, emphasis=False)
    fixed_vars = fixed.init(KEY, x, words, pad, grid=GRID, num_prefix=PREFIX, train=False)
    assert "emphasis_logit" not in fixed_vars["params"]
    np.testing.assert_allclose(_apply_msa(fixed, fixed_vars, x, words, pad), ref, rtol=1e-6)


def test_msa_rejects_bad_token_count():
    x, words, pad = _msa_inputs()
    msa = MultiScaleAligner(width=WIDTH, dim=8, num_heads=2)
    with pytest.raises(ValueError, match="expected"):
        msa.init(KEY, x[:, 1:], words, pad, grid=GRID, num_prefix=PREFIX, train=False)
