"""Window Mamba Fuser (eq. 4): window order, the [cls, window, cls] scan, gating, exact window independence."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal

from wimfris_jax.families.wimfris.losses import window_targets
from wimfris_jax.families.wimfris.neck.wmf import WindowMambaFuser, resolve_window, window_partition, window_reverse
from wimfris_jax.ssm.mamba import Mamba

KEY = jax.random.PRNGKey(0)
B, H, W, C = 2, 8, 12, 16


def test_window_order_is_row_major_and_matches_the_loss():
    x = jnp.arange(H * W, dtype=jnp.float32).reshape(1, H, W, 1)
    win = window_partition(x, (4, 3))  # (1, 8, 12, 1): 2 x 4 windows of 4 x 3 pixels
    assert win.shape == (1, 8, 12, 1)
    for r in range(H):
        for c in range(W):
            j, i = (r // 4) * (W // 3) + c // 3, (r % 4) * 3 + c % 3
            assert float(win[0, j, i, 0]) == r * W + c
    np.testing.assert_array_equal(window_reverse(win, (H, W), (4, 3)), x)
    # window_targets (the alignment loss) uses the same order: a pixel in window j lights target j only
    mask = jnp.zeros((1, H, W)).at[0, 5, 7].set(1.0)
    np.testing.assert_array_equal(window_targets(mask, (H, W), (4, 3))[0], jnp.zeros(8).at[4 + 7 // 3].set(1.0))


def test_resolve_window():
    assert resolve_window(4, (8, 12)) == (4, 4)
    assert resolve_window(None, (8, 12)) == (8, 12)
    assert resolve_window("none", (8, 12)) == (8, 12)
    with pytest.raises(ValueError, match="does not tile"):
        window_partition(jnp.zeros((1, 8, 12, 2)), (8, 8))


def _setup(window=4):
    wmf = WindowMambaFuser(window=window, gate_heads=4, d_state=4)
    f, s = normal(1, (B, H, W, C)), normal(2, (B, C))
    params = wmf.init(KEY, f, s)
    return wmf, jax.jit(wmf.apply), params, f, s


def test_wmf_matches_reference():
    """Y = Mamba(LN([s, window, s])); pixels y_1..M, class token = last output; sigmoid-gated residual; l_j."""
    wmf, apply, params, f, s = _setup()
    out, logits = apply(params, f, s)
    p = params["params"]
    win = window_partition(f, (4, 4))  # (B, 6, 16, C)
    n, m = win.shape[1:3]
    tok = jnp.broadcast_to(s[:, None, None], (B, n, 1, C))
    seq = jnp.concatenate([tok, win, tok], axis=2).reshape(B * n, m + 2, C)
    mu, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
    seq = (seq - mu) / jnp.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    y = Mamba(d_model=C, d_state=4).apply({"params": p["mamba"]}, seq).reshape(B, n, m + 2, C)
    pix, cls = y[:, :, 1:-1], y[:, :, -1]
    q = (cls @ p["gate_q"]["kernel"] + p["gate_q"]["bias"]).reshape(B, n, 1, 4, 4)
    k = (pix @ p["gate_k"]["kernel"] + p["gate_k"]["bias"]).reshape(B, n, m, 4, 4)
    gate = jax.nn.sigmoid((q * k).sum(-1) / 2.0)
    want = f + window_reverse((pix.reshape(B, n, m, 4, 4) * gate[..., None]).reshape(B, n, m, C), (H, W), (4, 4))
    want_logits = jnp.einsum("bnc,bc->bn", cls @ p["cls_proj"]["kernel"] + p["cls_proj"]["bias"], s) / math.sqrt(C)
    assert out.shape == (B, H, W, C) and logits.shape == (B, 6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pixel", [(0, 4), (3, 7), (2, 5)])  # first, last and an inner pixel of window 1
def test_window_independence(pixel):
    """Perturbing pixels of window 1 changes that window's outputs and class token, and nothing else, exactly."""
    wmf, apply, params, f, s = _setup()
    out, logits = apply(params, f, s)
    g = f.at[:, pixel[0], pixel[1]].add(normal(3, (B, C)))
    out2, logits2 = apply(params, g, s)
    inside = np.zeros((H, W), bool)
    inside[0:4, 4:8] = True
    diff = np.abs(np.asarray(out2 - out)).max(axis=(0, 3))
    assert np.all(diff[~inside] == 0.0)
    assert diff[pixel] > 1e-3  # (at Mamba's init, dt is small: the scan is mostly local, later pixels move less)
    dl = np.abs(np.asarray(logits2 - logits))
    assert np.all(dl[:, [0, 2, 3, 4, 5]] == 0.0) and np.all(dl[:, 1] > 0.0)


def test_class_token_conditions_every_window():
    wmf, apply, params, f, s = _setup()
    out, logits = apply(params, f, s)
    out2, logits2 = apply(params, f, s + normal(4, (B, C)))  # (a constant shift would vanish in the LayerNorm)
    per_window = np.abs(np.asarray(window_partition(out2 - out, (4, 4)))).max(axis=(2, 3))
    assert np.all(per_window > 0) and np.all(np.abs(np.asarray(logits2 - logits)) > 0)


@pytest.mark.parametrize("window,n_win", [(2, 24), (4, 6), ((8, 12), 1), (None, 1)])
def test_window_sizes(window, n_win):
    wmf, apply, params, f, s = _setup(window)
    out, logits = apply(params, f, s)
    assert out.shape == f.shape and logits.shape == (B, n_win)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_wmf_shape_errors():
    wmf = WindowMambaFuser(window=4, gate_heads=4, d_state=4)
    with pytest.raises(ValueError, match="class token"):
        wmf.init(KEY, jnp.zeros((1, 8, 8, C)), jnp.zeros((1, C + 1)))
    with pytest.raises(ValueError, match="does not tile"):
        WindowMambaFuser(window=3, gate_heads=4).init(KEY, jnp.zeros((1, 8, 8, C)), jnp.zeros((1, C)))
