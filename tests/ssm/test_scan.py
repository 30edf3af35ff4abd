"""The selective scan: the three implementations against a float64 loop of selective_scan_ref, against each other
(values and gradients), causality, the chunked sequential path, and finiteness for long sequences and huge
time steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wimfris_jax.ssm import default_impl, selective_scan
from wimfris_jax.ssm import scan as scan_mod

IMPLS = ("associative", "sequential", "unrolled")


def _inputs(b=2, length=9, d=6, n=5, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: r.normal(size=s).astype(np.float32)
    return dict(
        u=f(b, length, d),
        delta=f(b, length, d),
        A=-np.exp(f(d, n)),
        B=f(b, length, n),
        C=f(b, length, n),
        D=f(d),
        z=f(b, length, d),
        delta_bias=f(d),
    )


def _reference(u, delta, A, B, C, D, z, delta_bias):
    """mamba_ssm's selective_scan_ref with delta_softplus=True, as a float64 loop."""
    u, delta, A, B, C, D, z, db = (np.asarray(x, np.float64) for x in (u, delta, A, B, C, D, z, delta_bias))
    delta = np.logaddexp(delta + db, 0.0)
    h = np.zeros((u.shape[0], u.shape[2], A.shape[1]))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
    y = np.stack(ys, 1) + u * D
    return y * z / (1 + np.exp(-z))


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64_reference(impl):
    x = _inputs()
    y = jax.jit(lambda k: selective_scan(**k, delta_softplus=True, impl=impl))(x)
    assert y.shape == (2, 9, 6) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _reference(**x), atol=1e-5, rtol=1e-5)


def test_optional_terms_are_optional():
    x = _inputs()
    full = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="sequential")
    skip = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], impl="sequential")
    np.testing.assert_allclose(np.asarray(skip - full), x["u"] * x["D"], atol=1e-5)
    gated = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], z=x["z"], impl="sequential")
    np.testing.assert_allclose(np.asarray(gated), np.asarray(full * jax.nn.silu(x["z"])), atol=1e-6)


def _grads(x, impl):
    def loss(k):
        y = selective_scan(**k, delta_softplus=True, impl=impl)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    return jax.jit(jax.value_and_grad(loss))(x)


@pytest.mark.parametrize("length", [2, 150])  # 2: plain lax.scan; 150: 11 remat'd chunks of 13 steps + 7
def test_impls_agree_values_and_gradients(length):
    x = _inputs(b=2, length=length, d=4, n=3, seed=1)
    va, ga = _grads(x, "associative")
    for impl in ("sequential", "unrolled"):
        vs, gs = _grads(x, impl)
        np.testing.assert_allclose(float(va), float(vs), rtol=1e-5, err_msg=impl)
        for k in x:
            scale = max(1.0, float(jnp.max(jnp.abs(ga[k]))))
            np.testing.assert_allclose(np.asarray(gs[k]), np.asarray(ga[k]), atol=1e-5 * scale, err_msg=f"{impl} {k}")
            assert float(jnp.max(jnp.abs(ga[k]))) > 0, f"gradient w.r.t. {k} vanished"


def test_chunked_sequential_matches_unchunked():
    x = _inputs(b=1, length=37, d=3, n=2, seed=2)
    args = [jnp.asarray(x[k]) for k in ("u", "delta", "A", "B", "C")]
    args[1] = jax.nn.softplus(args[1])
    whole = scan_mod._scan_sequential(*args, chunk=0)
    for chunk in (5, 36):
        np.testing.assert_allclose(np.asarray(scan_mod._scan_sequential(*args, chunk=chunk)), whole, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_causal(impl):
    x = _inputs(length=12)
    run = jax.jit(lambda k: selective_scan(**k, delta_softplus=True, impl=impl))
    y0 = run(x)
    x2 = {k: (v.copy() if v.ndim == 3 else v) for k, v in x.items()}
    for k in ("u", "delta", "B", "C", "z"):
        x2[k][:, 7:] = 5.0
    y1 = run(x2)
    np.testing.assert_array_equal(np.asarray(y0[:, :7]), np.asarray(y1[:, :7]))
    assert not np.allclose(np.asarray(y0[:, 7:]), np.asarray(y1[:, 7:]))


@pytest.mark.parametrize("impl", IMPLS)
def test_long_sequence_stays_finite(impl):
    x = _inputs(b=1, length=4096, d=4, n=4, seed=3)
    (val, g) = _grads(x, impl)
    assert np.isfinite(float(val)) and all(bool(jnp.all(jnp.isfinite(v))) for v in g.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_steps_reset_the_state_and_stay_finite(impl):
    # delta = 1e3: exp(delta A) underflows to 0, so each step forgets the past: h_t = delta B_t u_t exactly.
    x = _inputs(b=1, length=64, d=4, n=4, seed=4)
    delta = np.full_like(x["delta"], 1e3)
    run = jax.jit(lambda d: selective_scan(x["u"], d, x["A"], x["B"], x["C"], D=x["D"], impl=impl))
    y, dy_ddelta = run(delta), jax.jit(jax.grad(lambda d: run(d).sum()))(delta)
    want = 1e3 * np.einsum("bln,bln->bl", x["B"], x["C"])[..., None] * x["u"] + x["u"] * x["D"]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-2)
    assert bool(jnp.all(jnp.isfinite(dy_ddelta)))

    # A positive log-decay (invalid A > 0 or delta < 0) is clamped instead of overflowing.
    assert bool(jnp.all(jnp.isfinite(run(-delta))))


def test_dtype_and_errors():
    x = _inputs()
    y = selective_scan(jnp.asarray(x["u"], jnp.bfloat16), x["delta"], x["A"], x["B"], x["C"], impl="sequential")
    assert y.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="cuda")
    with pytest.raises(ValueError, match=r"B must have shape \(2, 9, 5\), got \(2, 9, 4\)"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :4], x["C"])
    assert default_impl("cpu") == "sequential" and default_impl("gpu") == default_impl("tpu") == "associative"
    assert default_impl("cpu", 17, 2 * 336 * 16) == "unrolled"  # the MTA
    assert default_impl("cpu", 18, 128 * 1024 * 16) == "sequential"  # the WMF at batch 2
    assert default_impl("cpu", 1025, 1024) == "sequential"
    assert default_impl("gpu", 17, 2 * 336 * 16) == default_impl("gpu", 18, 128 * 1024 * 16) == "unrolled"  # H200
    assert default_impl("gpu", 1025, 1024) == default_impl("tpu", 17, 1024) == "associative"
