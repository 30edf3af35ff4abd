"""Swin against transformers' SwinModel (random weights, every parameter perturbed), its converter (transformers v4
file names, v5 in-memory names, the official microsoft/Swin-Transformer layout), the CLI, and (slow) Swin-B at 480 px.

Parity sizes are chosen to reach every path of transformers' ``SwinLayer``: images whose sides are not multiples of
the patch, odd maps at every merge, maps padded to the window with a shifted (masked) window, and a last stage whose
short side equals the window (no shift; transformers 5.24 raises when it is shorter, see
``test_window_smaller_than_the_table``). Parity is asserted in float32 (max-abs 1e-5 against transformers in float32)
and in float64 against transformers in float64 (1e-6: both keep the softmax in float32), which checks the
computation well below float32 rounding. Perturbations are N(0, 0.02^2): at 0.05 the deeper stages reach |y| ~ 20,
where transformers' own float32 error (vs float64) is 2e-5.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from port_weights import swin as port
from port_weights.__main__ import main as port_main
from port_weights.common import ConversionError
from torch_ref.backbones import max_abs
from torch_ref.swin import hf_outputs, hf_swin, to_microsoft
from wimfris_jax.backbones import load_backbone
from wimfris_jax.backbones.swin import Swin, relative_position_index, shift_mask, swin_config, window_and_shift
from wimfris_jax.io import flatten, load_params

TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)  # Swin-T
SMALL = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)  # for the converter tests


def _images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _errors(ours: dict, stages: list, last: np.ndarray) -> list[float]:
    assert len(ours["hidden_states"]) == len(stages) + 1  # the patch embedding, then each stage
    assert [o.shape for o in ours["hidden_states"][1:]] == [s.shape for s in stages]
    errs = [max_abs(a, b) for a, b in zip(ours["hidden_states"][1:], stages)]
    return errs + [max_abs(ours["last_hidden_state"], last)]


@pytest.fixture(scope="module")
def small():
    """(SwinForImageClassification with SMALL, its SwinModel state dict in v5 names without prefix)."""
    model = hf_swin(seed=1, classifier=True, **SMALL)
    return model, {k[len("swin.") :]: v for k, v in model.state_dict().items() if k.startswith("swin.")}


# ------------------------------------------------------------------------------------------------- parity
def test_tiny_parity_fp32_and_fp64():
    """Swin-T (window 7) on 274 x 199: patch padding; maps 69x50 -> 35x25 -> 18x13 -> 9x7 (odd merges); stages 0-2
    padded to the window with masked shifted windows; stage 3 short side = window (no shift, padded to 14 x 7)."""
    model = hf_swin(**TINY)
    params, meta = port.convert_state_dict(model.state_dict())
    assert meta["config"] == swin_config("tiny") and meta["layout"] == "hf-v5" and meta["prefix"] == ""
    grids = [(69, 50), (35, 25), (18, 13), (9, 7)]
    assert [window_and_shift(*g, 7, True) for g in grids] == [(7, 3)] * 3 + [(7, 0)]
    x = _images(2, 274, 199)
    net = Swin(**meta["config"])
    apply = jax.jit(lambda p, v: net.apply({"params": p}, v))

    stages, last = hf_outputs(model, x)
    ours = apply(params, x)
    assert [o.shape[1:3] for o in ours["hidden_states"][1:]] == grids
    errs = _errors(ours, stages, last)
    assert max(errs) <= 1e-5, f"float32 max-abs per stage and final norm: {errs}"

    stages, last = hf_outputs(model, x, double=True)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        ours = apply(p64, x.astype(np.float64))
        assert ours["last_hidden_state"].dtype == jnp.float64
        errs = _errors(ours, stages, last)
    assert max(errs) <= 1e-6, f"float64 max-abs per stage and final norm: {errs}"


def test_index_and_shift_mask_match_transformers():
    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinLayer, SwinRelativePositionBias

    for w in (4, 7, 12):
        ref = SwinRelativePositionBias(1, (w, w))._create_relative_position_index().numpy()
        np.testing.assert_array_equal(relative_position_index(w, w), ref)
    for (h, w), win in [((12, 16), 4), ((21, 14), 7), ((36, 24), 12)]:
        layer = SwinLayer(SwinConfig(window_size=win), 8, (h, w), 1, shift_size=win // 2)
        ref = layer.get_attn_mask(h, w, torch.float32, "cpu").numpy()
        np.testing.assert_array_equal(shift_mask(h, w, win, win // 2), ref)
    # a smaller window reads the centre of the table: the offsets it has, at the same rows as a table of its own
    big, small = relative_position_index(3, 7), relative_position_index(3, 3)
    centre = np.arange(13 * 13).reshape(13, 13)[4:9, 4:9].ravel()
    np.testing.assert_array_equal(big, centre[small])


def test_window_smaller_than_the_table():
    """A 5 x 6 map with W = 7 uses window 5 and the table's central 9 x 9 offsets: the same as transformers with
    window 5 and that central table (transformers with window 7 raises: its bias stays 49 x 49)."""
    cfg = dict(embed_dim=16, depths=(2,), num_heads=(2,))
    model = hf_swin(seed=2, window_size=5, **cfg)
    sd = dict(model.state_dict())
    key = "attention.relative_position_bias.relative_position_bias_table"
    for k in [k for k in sd if k.endswith(key)]:  # a 13 x 13 table whose centre is the 9 x 9 one of window 5
        big = torch.randn(13, 13, 2)
        big[2:11, 2:11] = sd[k].reshape(9, 9, 2)
        sd[k] = big.reshape(169, 2)
    params, meta = port.convert_state_dict(sd)
    assert meta["config"]["window_size"] == 7
    x = _images(1, 20, 24, seed=3)
    stages, last = hf_outputs(model, x)
    errs = _errors(Swin(**meta["config"]).apply({"params": params}, x), stages, last)
    assert max(errs) <= 1e-5, errs


# ---------------------------------------------------------------------------------------------- converter
def test_layouts_give_the_same_params(small, tmp_path):
    """transformers v5 in-memory names (SwinForImageClassification: prefix ``swin.``, classifier skipped), the
    save_pretrained folder (v4 names, config.json read), a v4 .bin with the index buffers of older files, and the
    official layout (fused qkv, index and mask buffers, head) convert to the same params; those run as transformers."""
    model, sd = small
    ref, meta = port.convert_state_dict(model.state_dict())
    assert (meta["layout"], meta["prefix"], meta["skipped"], meta["dropped"]) == ("hf-v5", "swin.", 2, [])
    config = dict(SMALL, patch_size=4, mlp_ratio=4.0, ln_eps=1e-5)
    assert meta["config"] == config

    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    cfg_file = folder / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "layer_norm_eps": 1e-6}))
    v4 = safetensors.torch.load_file(folder / "model.safetensors")
    assert "swin.encoder.layers.0.blocks.1.attention.self.query.weight" in v4
    from_folder, meta_folder = port.from_checkpoint(str(folder))
    assert meta_folder["layout"] == "hf-v4" and meta_folder["config"] == dict(config, ln_eps=1e-6)

    idx = torch.zeros(16, 16, dtype=torch.long)  # the index buffer files of transformers < 5 hold
    index = {f"swin.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index": idx
             for i in range(2) for j in range(2)}  # fmt: skip
    torch.save({**v4, **index}, tmp_path / "pytorch_model.bin")
    from_bin, meta_bin = port.from_checkpoint(str(tmp_path / "pytorch_model.bin"))
    assert meta_bin["layout"] == "hf-v4" and meta_bin["dropped"] == sorted(index)

    ms = to_microsoft(sd)
    buffers = {"layers.0.blocks.1.attn_mask": torch.zeros(6, 16, 16), "head.weight": torch.zeros(5, 32),
               "head.bias": torch.zeros(5), "layers.1.blocks.0.attn.relative_position_index": idx}  # fmt: skip
    torch.save({"model": {f"module.{k}": v for k, v in {**ms, **buffers}.items()}, "epoch": 1}, tmp_path / "ms.pth")
    from_ms, meta_ms = port.from_checkpoint(str(tmp_path / "ms.pth"))
    assert (meta_ms["layout"], meta_ms["prefix"], meta_ms["config"]) == ("microsoft", "module.", config)
    assert meta_ms["dropped"] == sorted(f"module.{k}" for k in buffers)

    want = flatten(ref)
    assert "layers_0/blocks_1/attn/q/kernel" in want and want["layers_0/downsample/reduction/kernel"].shape == (64, 32)
    for params in (from_folder, from_bin, from_ms):
        got = flatten(params)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)

    x = _images(2, 38, 30, seed=4)  # maps 10x8 (padded to 12x8, shifted) and 5x4 (short side = window)
    stages, last = hf_outputs(model.swin, x)
    errs = _errors(Swin(**config).apply({"params": from_ms}, x), stages, last)
    assert max(errs) <= 1e-5, errs


def test_errors_name_every_key(small):
    _, sd = small
    bad = dict(sd)
    del bad["encoder.layers.1.blocks.0.mlp.fc2.bias"]
    bad["encoder.layers.0.blocks.1.attention.gate.weight"] = torch.zeros(16, 16)
    with pytest.raises(ConversionError) as e:
        port.convert_state_dict(bad)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "layers_1/blocks_0/mlp/fc2/bias" in msg
    assert "encoder.layers.1.blocks.0.mlp.fc2.bias" in msg and "encoder.layers.0.blocks.1.attention.gate.weight" in msg

    with pytest.raises(ConversionError, match="found no Swin first block"):
        port.convert_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(6, 2)})
    key = "encoder.layers.1.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    with pytest.raises(ConversionError, match=r"\[49, 25\] rows.*one window"):
        port.convert_state_dict({**sd, key: torch.zeros(25, 2)})
    with pytest.raises(ConversionError, match="absolute position embeddings"):
        port.convert_state_dict({**sd, "embeddings.position_embeddings": torch.zeros(1, 64, 16)})


def test_cli(small, tmp_path):
    model, _ = small
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "swin.msgpack"
    assert port_main(["swin", str(tmp_path / "hf"), str(out)]) == 0
    params, meta = load_params(str(out))
    assert meta["family"] == "swin" and meta["layout"] == "hf-v4" and list(meta["config"]["depths"]) == [2, 2]
    assert params["layers_1"]["blocks_1"]["attn"]["relative_position_bias_table"].shape == (49, 2)
    net, variables = load_backbone(out)  # the converted file on its own
    x = _images(1, 40, 36, seed=3)
    assert max(_errors(net.apply(variables, x), *hf_outputs(model.swin, x))) <= 1e-5
    assert port_main(["swin", str(tmp_path / "missing"), str(out)]) == 1


# ------------------------------------------------------------------------------------------------- module
def test_stage_methods_drop_path_remat_and_bf16(small):
    _, sd = small
    params, meta = port.convert_state_dict(sd)
    cfg, v = meta["config"], {"params": params}
    x = jnp.asarray(_images(2, 38, 30, seed=5))
    net = Swin(**cfg)
    out = net.apply(v, x)
    h = net.apply(v, x, method=Swin.embed)
    h = net.apply(v, 0, h, method=Swin.blocks)
    np.testing.assert_allclose(h, out["hidden_states"][1], atol=1e-6, rtol=0)
    h = net.apply(v, 1, net.apply(v, 0, h, method=Swin.downsample), method=Swin.blocks)
    np.testing.assert_allclose(h, out["hidden_states"][2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expects"):
        net.apply(v, 1, out["hidden_states"][1], method=Swin.blocks)

    # stochastic depth: per sample, only with train and the dropout rng; the last block drops at the full rate
    dp = Swin(**cfg, drop_path_rate=0.5)
    assert max_abs(dp.apply(v, x)["hidden_states"][2], out["hidden_states"][2]) == 0.0
    rngs = {"dropout": jax.random.key(1)}
    a, b = (dp.apply(v, x, train=True, rngs=rngs)["hidden_states"][2] for _ in range(2))
    assert max_abs(a, b) == 0.0 and max_abs(a, out["hidden_states"][2]) > 1e-2
    from wimfris_jax.backbones.swin import drop_path

    y = np.asarray(drop_path(jnp.ones((4000, 3, 2)), 0.25, jax.random.key(0)))
    per_sample = y.reshape(4000, -1)
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 4 / 3], rtol=1e-6)
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03

    # remat keeps names and gradients; bf16 runs with float32 params
    one = dict(cfg, depths=(2,), num_heads=(1,))
    p1 = {"patch_embed": params["patch_embed"], "layernorm": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}
    p1["layers_0"] = {k: b for k, b in params["layers_0"].items() if k != "downsample"}
    small_x = x[:1, :24, :24]

    def grads(mode):
        m = Swin(**one, remat_mode=mode)
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, small_x)["last_hidden_state"] ** 2)))(p1)

    g0, g1 = grads("none"), grads("block")
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    assert max(max_abs(a, b) for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1))) < 1e-4
    y16 = Swin(**cfg, dtype=jnp.bfloat16).apply(v, x)
    assert y16["last_hidden_state"].dtype == jnp.bfloat16
    assert max_abs(y16["last_hidden_state"], out["last_hidden_state"]) < 0.25


def test_presets():
    assert swin_config("tiny") == dict(TINY, patch_size=4, mlp_ratio=4.0, ln_eps=1e-5)
    base = swin_config("base")
    assert (base["embed_dim"], base["num_heads"], base["window_size"]) == (128, (4, 8, 16, 32), 12)
    assert swin_config("base_w7")["window_size"] == 7 == swin_config("large", window_size=7)["window_size"]
    with pytest.raises(ValueError, match="unknown Swin preset"):
        swin_config("huge")


@pytest.mark.slow
def test_swin_base_parity_480():
    """Swin-B window 12 (swin_base_patch4_window12_384) at 480 x 480: maps 120/60/30/15, the last two padded to
    36 and 24 with masked shifted windows; every stage output within 1e-4."""
    torch.set_num_threads(2)
    model = hf_swin(seed=3, image_size=384, **{k: v for k, v in swin_config("base").items() if k != "ln_eps"})
    params, meta = port.convert_state_dict(model.state_dict())
    assert meta["config"] == swin_config("base")
    x = _images(1, 480, 480, seed=6)
    stages, last = hf_outputs(model, x)
    ours = jax.jit(lambda v: Swin(**meta["config"]).apply({"params": params}, v))(x)
    assert [o.shape[1:3] for o in ours["hidden_states"][1:]] == [(120, 120), (60, 60), (30, 30), (15, 15)]
    errs = _errors(ours, stages, last)
    assert max(errs) <= 1e-4, errs
