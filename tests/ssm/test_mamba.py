"""The Mamba block: parity (forward and input gradient) with transformers' MambaMixer slow path through the
converter, converter errors and whole-model checkpoints, init, causality and use inside another module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer

from port_weights import mamba as port
from port_weights.common import ConversionError
from wimfris_jax.io import load_params
from wimfris_jax.ssm import Mamba


def _mixer(d_model=24, d_state=8, bias=False, conv_bias=True, seed=0) -> tuple[MambaMixer, dict]:
    """A random MambaMixer, with D and A_log perturbed away from their structured init (1 and log(1..N))."""
    torch.manual_seed(seed)
    cfg = MambaConfig(
        hidden_size=d_model, state_size=d_state, expand=2, conv_kernel=4, use_bias=bias, use_conv_bias=conv_bias
    )
    mixer = MambaMixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in (mixer.D, mixer.A_log):
            p.add_(0.5 * torch.randn_like(p))
    return mixer, {k: v.detach().numpy() for k, v in mixer.state_dict().items()}


def _torch_out_and_grad(mixer, x, w):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = mixer(xt)
    (y * torch.from_numpy(w)).sum().backward()
    return y.detach().numpy(), xt.grad.numpy()


def _jax_out_and_grad(params, config, x, w, impl):
    block = Mamba(**config, scan_impl=impl)
    f = jax.jit(lambda v: block.apply({"params": params}, v))
    y = f(x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * w)))(x)
    return np.asarray(y), np.asarray(g)


@pytest.mark.parametrize(
    "impl,bias,conv_bias", [("associative", False, True), ("sequential", False, True), ("sequential", True, False)]
)
def test_parity_with_transformers_mamba_mixer(impl, bias, conv_bias):
    mixer, sd = _mixer(bias=bias, conv_bias=conv_bias)
    params, meta = port.convert_state_dict(sd)
    assert meta["config"] == dict(
        d_model=24, d_state=8, d_conv=4, expand=2, dt_rank="auto", conv_bias=conv_bias, bias=bias
    )
    r = np.random.default_rng(0)
    x, w = (r.normal(size=(2, 11, 24)).astype(np.float32) for _ in range(2))
    y_ref, g_ref = _torch_out_and_grad(mixer, x, w)
    y, g = _jax_out_and_grad(params, meta["config"], x, w, impl)
    assert np.abs(y_ref).max() > 0.1 and np.abs(g_ref).max() > 0.1
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_parity_full_size():
    """WMF-sized block (d_model 512 -> d_inner 1024, N 16) on 18-token windows."""
    mixer, sd = _mixer(d_model=512, d_state=16, seed=1)
    params, meta = port.convert_state_dict(sd)
    assert meta["config"]["dt_rank"] == "auto" and params["dt_proj"]["kernel"].shape == (32, 1024)
    r = np.random.default_rng(1)
    x, w = (r.normal(size=(4, 18, 512)).astype(np.float32) for _ in range(2))
    y_ref, g_ref = _torch_out_and_grad(mixer, x, w)
    for impl in ("associative", "sequential"):
        y, g = _jax_out_and_grad(params, meta["config"], x, w, impl)
        np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=0, err_msg=impl)
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=impl)


def test_renamed_or_misshaped_key_is_named():
    _, sd = _mixer()
    sd["x_proj.weigth"] = sd.pop("x_proj.weight")
    with pytest.raises(ConversionError) as e:
        port.convert_state_dict(sd, source="mixer.pth")
    msg = str(e.value)
    assert msg.startswith("mixer.pth") and "'x_proj.weigth'" in msg and "'x_proj/kernel'" in msg
    assert "'x_proj/kernel' (48, 18) has no source key; looked for 'x_proj.weight'" in msg

    _, sd = _mixer()
    sd["D"] = sd["D"][:-1]
    with pytest.raises(ConversionError, match=r"'D' -> 'D': shape \(47,\) from the checkpoint.*expects \(48,\)"):
        port.convert_state_dict(sd)


def test_whole_model_checkpoint(tmp_path):
    """MambaForCausalLM: every layer's mixer converts to ``layers_{i}``; norms, embeddings, head are dropped
    (and listed); the CLI writes a file that loads back."""
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2, tie_word_embeddings=False)
    model = MambaForCausalLM(cfg).eval()
    path = str(tmp_path / "mamba.pth")
    torch.save(model.state_dict(), path)
    params, meta = port.from_checkpoint(path)
    assert meta["layers"] == [0, 1] and sorted(params) == ["layers_0", "layers_1"]
    assert "lm_head.weight" in meta["dropped"] and "backbone.layers.1.norm.weight" in meta["dropped"]
    wrapped, _ = port.convert_state_dict({"module." + k: v.numpy() for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(wrapped["layers_1"]["D"], params["layers_1"]["D"])
    mixer1 = model.backbone.layers[1].mixer
    np.testing.assert_array_equal(params["layers_1"]["A_log"], mixer1.A_log.detach().numpy())
    np.testing.assert_array_equal(params["layers_1"]["in_proj"]["kernel"], mixer1.in_proj.weight.detach().numpy().T)

    from port_weights.__main__ import main

    out = str(tmp_path / "mamba.msgpack")
    assert main(["mamba", path, out]) == 0
    loaded, meta2 = load_params(out)
    assert meta2["config"]["d_model"] == 16
    np.testing.assert_array_equal(loaded["layers_0"]["conv1d"]["kernel"], params["layers_0"]["conv1d"]["kernel"])


def test_init_and_param_names():
    block = Mamba(d_model=40, d_state=6)
    params = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 3, 40)))["params"]
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    assert shapes == {
        "in_proj": {"kernel": (40, 160)},
        "conv1d": {"kernel": (4, 1, 80), "bias": (80,)},
        "x_proj": {"kernel": (80, 3 + 12)},
        "dt_proj": {"kernel": (3, 80), "bias": (80,)},
        "A_log": (80, 6),
        "D": (80,),
        "out_proj": {"kernel": (80, 40)},
    }
    np.testing.assert_allclose(params["A_log"], np.log(np.tile(np.arange(1, 7), (80, 1))), rtol=1e-6)
    np.testing.assert_array_equal(params["D"], np.ones(80))
    dt = np.asarray(jax.nn.softplus(params["dt_proj"]["bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4) and dt.std() > 1e-3
    assert np.abs(params["dt_proj"]["kernel"]).max() <= 3**-0.5
    assert np.abs(params["in_proj"]["kernel"]).max() <= 40**-0.5
    floored = jax.jit(Mamba(d_model=16, dt_min=1e-6, dt_max=2e-6).init)(jax.random.key(1), jnp.zeros((1, 2, 16)))
    np.testing.assert_allclose(jax.nn.softplus(floored["params"]["dt_proj"]["bias"]), 1e-4, rtol=1e-4)


def test_causal_and_usable_inside_another_module():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + Mamba(d_model=x.shape[-1], d_state=4, name="mamba")(nn.LayerNorm()(x))

    model = Residual()
    x = jax.random.normal(jax.random.key(0), (2, 10, 16))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    run = jax.jit(model.apply)
    y0, y1 = run({"params": params}, x), run({"params": params}, x.at[:, 6:].set(3.0))
    np.testing.assert_array_equal(np.asarray(y0[:, :6]), np.asarray(y1[:, :6]))
    assert not np.allclose(y0[:, 6:], y1[:, 6:])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match=r"Mamba\(d_model=16\) expects \(B, L, 16\)"):
        Mamba(d_model=16).init(jax.random.key(0), jnp.zeros((2, 10, 8)))
