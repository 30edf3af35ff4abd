"""VMamba v2 (SS2D, VSSM): cross-scan algebra, parity with the PyTorch reference (torch_ref/vmamba.py) through
the converter, converter errors, the CLI, and (slow) VMamba-B at 480 px.

The reference was cross-checked once against the official ``classification/models/vmamba.py`` (VSSM, forward type
v05_noz on its pure-torch scan path; it imports on CPU only with stand-ins for triton, timm and fvcore): the official
state dict loads into it with strict=True and, at depths 1-2-2-1 / dims 32 on a 64 x 48 image with every weight
perturbed, the stage outputs agree to 2.3e-5 max-abs (|y| up to 15: float32 rounding), for norm "ln" and "ln2d".
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from port_weights import vmamba as port
from port_weights.__main__ import main as port_main
from port_weights.common import ConversionError, convert
from torch_ref import vmamba as ref
from torch_ref.backbones import max_abs, perturb
from wimfris_jax.backbones import VMamba, load_backbone, vmamba_config
from wimfris_jax.io import load_params
from wimfris_jax.ssm import SS2D, cross_merge, cross_scan


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sd(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_cross_scan_orders_and_merge_is_adjoint():
    x = _rand(2, 3, 5, 4)
    ys = np.asarray(cross_scan(jnp.asarray(x)))
    assert ys.shape == (2, 4, 15, 4)
    np.testing.assert_array_equal(ys[:, 0], x.reshape(2, 15, 4))  # row-major
    np.testing.assert_array_equal(ys[:, 1], x.transpose(0, 2, 1, 3).reshape(2, 15, 4))  # column-major
    np.testing.assert_array_equal(ys[:, 2:], ys[:, :2, ::-1])  # both reversed
    # the official torch layout (channels first)
    yt = ref.cross_scan(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_array_equal(ys, yt.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(np.asarray(cross_merge(jnp.asarray(ys), 3, 5)), 4 * x)  # round trip
    y = _rand(2, 4, 15, 4, seed=1)
    merged = np.asarray(cross_merge(jnp.asarray(y), 3, 5))
    np.testing.assert_allclose(np.sum(ys * y), np.sum(x * merged), rtol=1e-5)  # <scan x, y> = <x, merge y>
    _, vjp = jax.vjp(cross_scan, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(y))[0]), merged, rtol=1e-6, atol=1e-6)
    mt = ref.cross_merge(torch.from_numpy(y).permute(0, 1, 3, 2), 3, 5).numpy()
    np.testing.assert_allclose(merged, mt.transpose(0, 2, 1).reshape(2, 3, 5, 4), atol=1e-6)


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_ss2d_parity_forward_and_input_gradient(impl):
    torch.manual_seed(0)
    m = perturb(ref.SS2D(24, d_state=2, ssm_ratio=2.0), std=0.1)
    sd = {f"layers.0.blocks.0.op.{k}": v for k, v in _sd(m).items()}
    params = convert(sd, port.rules())["layers_0"]["blocks_0"]["op"]
    x, w = _rand(2, 5, 7, 24), _rand(2, 5, 7, 24, seed=1)
    xt = torch.from_numpy(x).requires_grad_(True)
    y_ref = m(xt)
    (y_ref * torch.from_numpy(w)).sum().backward()
    op = SS2D(24, d_state=2, scan_impl=impl)
    f = jax.jit(lambda v: op.apply({"params": params}, v))
    y = f(x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * w)))(x)
    assert np.abs(y_ref.detach().numpy()).max() > 0.1
    assert max_abs(y, y_ref.detach()) <= 1e-5 and max_abs(g, xt.grad) <= 1e-5


def _reference(name, seed=0):
    """The official init (random weights at their scale) with every constant-initialised parameter perturbed."""
    torch.manual_seed(seed)
    cfg = vmamba_config(name)
    return ref.perturb_constants(ref.VSSM(depths=cfg["depths"], dims=cfg["dims"][0], num_classes=10), seed=seed)


def test_vmamba_tiny_parity_through_the_converter(tmp_path):
    """The official tiny v2 config (depths 2-2-5-2, 96 -> 768); a non-square image; the checkpoint as the training
    code saves it (weights under ``model``, here also behind DDP's ``module.``)."""
    model = _reference("tiny")
    src = tmp_path / "vssm_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, src)
    params, meta = port.from_checkpoint(str(src))
    assert meta["config"] == vmamba_config("tiny") and meta["prefix"] == "module."
    assert meta["dropped"] == sorted(f"module.classifier.{n}.{p}" for n in ("head", "norm") for p in ("bias", "weight"))
    x = _rand(1, 64, 48, 3)
    with torch.no_grad():
        outs_ref = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    out = jax.jit(lambda v: VMamba(**meta["config"]).apply({"params": params}, v))(x)
    outs = out["hidden_states"][1:]
    assert out["hidden_states"][0].shape == (1, 16, 12, 96) and np.array_equal(out["last_hidden_state"], outs[-1])
    assert [o.shape for o in outs] == [(1, 16, 12, 96), (1, 8, 6, 192), (1, 4, 3, 384), (1, 2, 2, 768)]
    errs = [max_abs(a, b) for a, b in zip(outs, outs_ref)]
    assert max(errs) <= 1e-5, errs
    # the same through the stage methods a parent model calls
    net, v = VMamba(**meta["config"]), {"params": params}
    h = net.apply(v, x, method=VMamba.embed)
    h = net.apply(v, 0, h, method=VMamba.blocks)
    np.testing.assert_allclose(h, outs[0], atol=1e-5, rtol=0)  # eager vs jitted
    assert net.apply(v, 0, h, method=VMamba.downsample).shape == (1, 8, 6, 192)


class _Config(dict):
    """A class pickled by reference that the checkpoint reader does not know."""


def yacs_config(monkeypatch) -> dict:
    """A CfgNode of a stand-in ``yacs.config`` module (yacs is not installed), nested as VMamba's training config;
    the caller removes the module again after saving, so the reader cannot import it."""

    class CfgNode(dict):
        def __init__(self, d=None):
            super().__init__(d or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "VSSM": CfgNode({"DEPTHS": [2, 2, 15, 2]})}), "SEED": 0})


def test_cli_and_errors_name_every_key(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ref.VSSM(depths=(1, 1, 1, 1), dims=16, num_classes=5)
    sd = dict(model.state_dict())
    src, out = tmp_path / "ckpt.pth", tmp_path / "vmamba.msgpack"
    torch.save({"model": sd}, src)
    assert port_main(["vmamba", str(src), str(out)]) == 0
    params, meta = load_params(str(out))
    assert params["layers_3"]["blocks_0"]["op"]["A_logs"].shape == (1024, 1) and meta["family"] == "vmamba"
    assert list(meta["config"]["dims"]) == [16, 32, 64, 128] and list(meta["config"]["depths"]) == [1, 1, 1, 1]
    net, variables = load_backbone(out, scan_impl="sequential")  # the converted file on its own, as the official
    x = _rand(1, 32, 32, 3)
    with torch.no_grad():
        expect = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    got = net.apply(variables, x)["hidden_states"][1:]
    assert max(max_abs(a, b) for a, b in zip(got, expect)) <= 1e-5
    with pytest.raises(TypeError, match="no field"):
        load_backbone(out, window_size=7)

    bad = dict(sd)
    del bad["layers.1.blocks.0.op.Ds"], bad["patch_embed.2.bias"]
    bad["layers.2.blocks.0.op.x_proj"] = bad.pop("layers.2.blocks.0.op.x_proj_weight")
    bad["outnorm0.weight"] = torch.ones(16)
    with pytest.raises(ConversionError) as e:
        port.convert_state_dict(bad)
    msg = str(e.value)
    for name in ("layers.1.blocks.0.op.Ds", "patch_embed.2.bias", "layers.2.blocks.0.op.x_proj_weight",
                 "'layers.2.blocks.0.op.x_proj'", "outnorm0.weight"):  # fmt: skip
        assert name in msg, name
    assert "5 problem(s)" in msg  # two missing, a renamed key (missing + unexpected), an unexpected one

    torch.save({"model": sd, "config": yacs_config(monkeypatch)}, src)  # as the official training checkpoints
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    params2, _ = port.from_checkpoint(str(src))  # the yacs config is read as a dict, yacs never imported
    a_logs = params["layers_3"]["blocks_0"]["op"]["A_logs"]
    assert np.array_equal(params2["layers_3"]["blocks_0"]["op"]["A_logs"], a_logs)
    torch.save({"model": sd, "config": _Config()}, src)  # any other pickled class stays refused
    with pytest.raises(ConversionError, match=r"refused as unsafe.*_Config.*\['model'\]"):
        port.from_checkpoint(str(src))

    one_file = {}  # the repository's one-file vmamba.py: grouped Linear projections, (K * rows, cols)
    for k, v in sd.items():
        if k.endswith(("op.x_proj_weight", "op.dt_projs_weight")):
            k, v = k.replace("_weight", ".weight"), v.reshape(-1, v.shape[-1])
        one_file[k] = v
    assert "layers.0.blocks.0.op.x_proj.weight" in one_file and "layers.0.blocks.0.op.dt_projs.weight" in one_file
    (params3, meta3), (ref3, ref_meta) = port.convert_state_dict(one_file), port.convert_state_dict(sd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params3, ref3)
    assert meta3["config"] == ref_meta["config"]

    gated = dict(sd)
    gated["layers.0.blocks.0.op.in_proj.weight"] = torch.zeros(64, 16)  # 2 * d_inner rows: a z gate
    with pytest.raises(ConversionError, match="v05_noz"):
        port.convert_state_dict(gated)
    with pytest.raises(ValueError, match="v05_noz"):
        SS2D(16, forward_type="v05").init(jax.random.key(0), jnp.zeros((1, 2, 2, 16)))


def test_remat_keeps_names_and_gradients_and_bf16_runs():
    cfg = dict(depths=(1,), dims=(16,), scan_impl="associative")  # one stage: XLA:CPU compiles are slow
    x = jnp.asarray(_rand(1, 16, 16, 3))
    params = jax.jit(VMamba(**cfg).init)(jax.random.key(0), x)["params"]

    def grads(mode):
        net = VMamba(**cfg, remat_mode=mode)
        loss = lambda p: sum(jnp.sum(o**2) for o in net.apply({"params": p}, x)["hidden_states"])  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    g0, g1 = grads("none"), grads("block")
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    assert max(max_abs(a, b) for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1))) < 1e-4
    outs = jax.jit(lambda p: VMamba(**cfg, dtype=jnp.bfloat16).apply({"params": p}, x)["hidden_states"])(params)
    assert all(o.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(o))) for o in outs)


@pytest.mark.slow
def test_vmamba_base_parity_480():
    """VMamba-B (ReMamber / TFANet's backbone) at 480 x 480, every stage output within 1e-4."""
    cfg = vmamba_config("base")
    model = _reference("base", seed=1)
    params, meta = port.convert_state_dict(_sd(model))
    assert meta["config"] == cfg
    x = _rand(1, 480, 480, 3, seed=2)
    torch.set_num_threads(2)
    with torch.no_grad():
        outs_ref = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    outs = jax.jit(lambda v: VMamba(**cfg).apply({"params": params}, v)["hidden_states"][1:])(x)
    assert [o.shape[1:3] for o in outs] == [(120, 120), (60, 60), (30, 30), (15, 15)]
    errs = [max_abs(a, b) for a, b in zip(outs, outs_ref)]
    assert max(errs) <= 1e-4, errs
