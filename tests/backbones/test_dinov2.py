"""DinoV2 and its converter against transformers' Dinov2Model / Dinov2WithRegistersModel (random weights, fp32).

Every returned layer is compared (embeddings, each block, final norm) for the three position-resampling rules:
"hf" and "hf_antialias" against the transformers models themselves, "torchhub" against a transformers model whose
position resampling is replaced by the torch-hub DINOv2 formula (:func:`torchhub_interpolate`), fed from a
torch-hub-layout checkpoint built from the same weights.
"""

from __future__ import annotations

import functools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from port_weights import dinov2 as port
from port_weights.common import ConversionError
from torch_ref.backbones import assert_outputs_match, dinov2_b14_reg4, hf_outputs, max_abs, perturb
from wimfris_jax.backbones import DinoV2, dinov2_config, interpolate_pos_embed

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=20)  # grid 5
SIZES = [(20, 20), (28, 16), (12, 12), (22, 21)]  # unchanged table; up/down, non-square; down; 5x5 grid, H != W


# ------------------------------------------------------------------------------------------------ helpers
def torchhub_interpolate(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torch-hub DINOv2's ``interpolate_pos_encoding`` (offset 0.1, scale_factor, no antialias), written out in
    its own terms (``x.shape = B, C, w, h``: its "w" is the image height), for a transformers embeddings module."""
    pos_embed = self.position_embeddings
    npatch, n = embeddings.shape[1] - 1, pos_embed.shape[1] - 1
    w, h = height, width
    if npatch == n and w == h:
        return pos_embed
    m, dim, p = int(math.sqrt(n)), embeddings.shape[-1], self.patch_size
    w0, h0 = w // p, h // p
    patch = F.interpolate(
        pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(float(w0 + 0.1) / m, float(h0 + 0.1) / m),
        mode="bicubic",
        antialias=False,
    )
    assert (w0, h0) == patch.shape[-2:]
    return torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def hf_model(kind: str, **kw) -> torch.nn.Module:
    """kind: "plain" (Dinov2Model), "reg" (with 4 registers), "swiglu" (Dinov2Model with the SwiGLU FFN)."""
    cfg = {**TINY, **kw}
    if kind == "reg":
        return perturb(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **cfg)))
    return perturb(Dinov2Model(Dinov2Config(use_swiglu_ffn=kind == "swiglu", **cfg)))


def to_torchhub(sd: dict) -> dict:
    """A transformers (v5 names) DINOv2 state dict renamed and fused into torch-hub names."""
    sd = {k: v.detach().clone() for k, v in sd.items()}
    out = {}
    for k in ("cls_token", "mask_token", "register_tokens"):
        if f"embeddings.{k}" in sd:
            out[k] = sd.pop(f"embeddings.{k}")
    out["pos_embed"] = sd.pop("embeddings.position_embeddings")
    for leaf in ("weight", "bias"):
        out[f"patch_embed.proj.{leaf}"] = sd.pop(f"embeddings.patch_embeddings.projection.{leaf}")
        out[f"norm.{leaf}"] = sd.pop(f"layernorm.{leaf}")
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    for i in layers:
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[t + f"attn.qkv.{leaf}"] = torch.cat([sd.pop(s + f"attention.{n}_proj.{leaf}") for n in "qkv"])
            out[t + f"attn.proj.{leaf}"] = sd.pop(s + f"attention.o_proj.{leaf}")
            if s + f"mlp.gate_proj.{leaf}" in sd:
                out[t + f"mlp.w12.{leaf}"] = torch.cat([sd.pop(s + f"mlp.{n}_proj.{leaf}") for n in ("gate", "up")])
                out[t + f"mlp.w3.{leaf}"] = sd.pop(s + f"mlp.down_proj.{leaf}")
        out[t + "ls1.gamma"] = sd.pop(s + "layer_scale1.lambda1")
        out[t + "ls2.gamma"] = sd.pop(s + "layer_scale2.lambda1")
        for k in [k for k in sd if k.startswith(s)]:  # norm1, norm2, mlp.fc1, mlp.fc2
            out[t + k[len(s) :]] = sd.pop(k)
    assert not sd, sd.keys()
    return out


def run_both(model, params, config, images: np.ndarray, adapters=None):
    """(ours, reference) outputs for NCHW float32 ``images``."""
    with torch.no_grad():
        ref = model(torch.from_numpy(images), output_hidden_states=True)
    ours = DinoV2(**config).apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)), adapters)
    return ours, ref


def assert_parity(ours, ref, tol: float) -> None:
    """``ref``: a transformers DINOv2 output (no pooler compared: DINOv2 defines none here)."""
    theirs = hf_outputs(ref)
    theirs.pop("pooled", None)
    assert_outputs_match({k: v for k, v in ours.items() if k != "pooled"}, theirs, tol)


def images(h: int, w: int, b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, 3, h, w)).astype(np.float32)


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["plain", "reg", "swiglu"])
@pytest.mark.parametrize("fmt", ["v4_folder", "v5_bin"])
def test_hf_parity(kind, fmt, tmp_path):
    model = hf_model(kind)
    if fmt == "v4_folder":  # what save_pretrained writes: attention.attention.query, mlp.weights_in, ...
        model.save_pretrained(tmp_path)
        src = str(tmp_path)
    else:  # transformers 5 in-memory names: attention.q_proj, mlp.gate_proj, ...
        src = str(tmp_path / "dinov2.bin")
        torch.save(model.state_dict(), src)
    params, meta = port.from_checkpoint(src, num_heads=2)
    assert meta["layout"] == ("hf-v4" if fmt == "v4_folder" else "hf-v5")
    config = meta["config"]
    assert config["interpolation"] == ("hf_antialias" if kind == "reg" else "hf")
    assert config["num_registers"] == (4 if kind == "reg" else 0) and config["pos_grid"] == 5
    assert config["ffn"] == ("swiglu" if kind == "swiglu" else "mlp") and config["depth"] == 2
    assert meta["dropped"] == ["embeddings.mask_token"]
    for h, w in SIZES:
        ours, ref = run_both(model, params, config, images(h, w))
        assert ours["grid"] == (h // 4, w // 4)
        assert ours["last_hidden_state"].shape == (2, 1 + config["num_registers"] + (h // 4) * (w // 4), 32)
        assert_parity(ours, ref, 1e-5)


@pytest.mark.parametrize("kind", ["reg", "swiglu"])
def test_torchhub_layout_parity(kind, tmp_path):
    model = hf_model(kind)
    model.embeddings.interpolate_pos_encoding = types.MethodType(torchhub_interpolate, model.embeddings)
    src = str(tmp_path / "dinov2_torchhub.pth")
    torch.save(to_torchhub(model.state_dict()), src)
    params, meta = port.from_checkpoint(src, num_heads=2)  # no config.json: the head count is not in the shapes
    assert meta["layout"] == "torchhub" and meta["config"]["interpolation"] == "torchhub"
    assert meta["dropped"] == ["mask_token"]
    for h, w in SIZES:
        assert_parity(*run_both(model, params, meta["config"], images(h, w)), 1e-5)
    # the rule matters: the HF rule on the same weights misses the torch-hub reference
    ours, ref = run_both(model, params, {**meta["config"], "interpolation": "hf"}, images(28, 16))
    assert max_abs(ours["hidden_states"][0], ref.hidden_states[0].numpy()) > 1e-3


@pytest.mark.parametrize("rule", ["torchhub", "hf", "hf_antialias"])
def test_interpolate_pos_embed_matches_torch(rule):
    m, dim, p = 7, 6, 14
    table = torch.randn(1, 1 + m * m, dim, generator=torch.Generator().manual_seed(1))
    emb = types.SimpleNamespace(position_embeddings=table, patch_size=p)
    for hp, wp in [(448, 448), (98, 98), (98, 99), (140, 70), (42, 196), (14, 14)]:
        grid = (hp // p, wp // p)
        tokens = torch.zeros(1, 1 + grid[0] * grid[1], dim)
        if rule == "torchhub":
            ref = torchhub_interpolate(emb, tokens, hp, wp)
        elif (grid[0] * grid[1] == m * m) and hp == wp:  # the transformers condition
            ref = table
        else:
            patch = F.interpolate(
                table[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                size=grid,
                mode="bicubic",
                align_corners=False,
                antialias=rule == "hf_antialias",
            )
            ref = torch.cat((table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
        ours = interpolate_pos_embed(jnp.asarray(table.numpy()), grid, rule, square_pixels=hp == wp)
        assert ours.shape == ref.shape
        # PyTorch computes coordinates and weights in float32 (~2e-6 off the float64 result at 7 -> 32, x4.6);
        # our matrices are float64, so we sit closer to the exact value than the reference does.
        assert max_abs(ours, ref.numpy()) <= 1e-5, (rule, hp, wp)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        interpolate_pos_embed(jnp.asarray(table.numpy()), (3, 3), "cubic", True)


class _Parent(nn.Module):
    """A tiny parent owning Dense adapters and the backbone, wiring them in as a model does."""

    config: dict
    layers: tuple[int, ...] = (1,)

    def setup(self):
        self.backbone = DinoV2(**self.config)
        self.adapters = {i: nn.Dense(self.config["width"], name=f"adapter_{i}") for i in self.layers}

    def _branch(self, i, x, scale):
        return scale * self.adapters[i](x)

    def __call__(self, x, scale=1.0):
        cbs = {i: functools.partial(self._branch, i, scale=scale) for i in self.layers}
        return self.backbone(x, adapters=cbs)


def test_adapter_seam_parent_scope_grads_and_placement():
    model = hf_model("reg")
    params, meta = port.convert_state_dict(to_torchhub(model.state_dict()), num_heads=2)
    config = {**meta["config"], "interpolation": "hf_antialias"}  # the HF reference's own rule
    parent = _Parent(config)
    x = images(28, 16, b=1)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    variables = jax.eval_shape(parent.init, jax.random.key(0), xj)
    assert set(variables["params"]) == {"backbone", "adapter_1"}  # adapter params live in the parent's scope
    assert not any("adapter" in k for k in variables["params"]["backbone"])
    rng = np.random.default_rng(3)
    ad = {"kernel": rng.normal(0, 0.2, (32, 32)).astype(np.float32), "bias": rng.normal(0, 0.1, 32).astype(np.float32)}
    full = {"params": {"backbone": params, "adapter_1": ad}}
    out = parent.apply(full, xj)
    plain = DinoV2(**config).apply({"params": params}, xj)
    assert max_abs(out["last_hidden_state"], plain["last_hidden_state"]) > 1e-2  # the adapter changes the output
    np.testing.assert_array_equal(out["hidden_states"][1], plain["hidden_states"][1])  # block 0 untouched

    # placement: x + ls2 * (mlp(norm2 x) + A(norm2 x)) in block 1, as a hook on the reference's MLP adds it
    lin = torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(ad["kernel"].T))
        lin.bias.copy_(torch.from_numpy(ad["bias"]))
    hook = model.encoder.layer[1].mlp.register_forward_hook(lambda m, inp, y: y + lin(inp[0]))
    with torch.no_grad():
        ref = model(torch.from_numpy(x), output_hidden_states=True)
    hook.remove()
    assert_parity(out, ref, 1e-5)

    def loss(p):
        return jnp.sum(parent.apply({"params": {**full["params"], "adapter_1": p}}, xj)["last_hidden_state"] ** 2)

    g = jax.jit(jax.grad(loss))(ad)
    assert float(jnp.abs(g["kernel"]).max()) > 0 and float(jnp.abs(g["bias"]).max()) > 0
    with pytest.raises(ValueError, match="adapters for blocks"):
        DinoV2(**config).apply({"params": params}, xj, adapters={5: lambda t: t})


def test_bad_checkpoint_names_every_key(tmp_path):
    sd = to_torchhub(hf_model("reg").state_dict())
    sd["blocks.0.norm_1.weight"] = sd.pop("blocks.0.norm1.weight")  # renamed
    del sd["blocks.1.ls2.gamma"]  # missing
    sd["blocks.1.attn.proj.weight"] = sd["blocks.1.attn.proj.weight"][:, :16]  # mis-shaped
    src = str(tmp_path / "broken.pth")
    torch.save(sd, src)
    with pytest.raises(ConversionError) as e:
        port.from_checkpoint(src, num_heads=2)
    msg = str(e.value)
    assert msg.startswith(src) and "4 problem(s)" in msg
    for part in ("'blocks.0.norm_1.weight'", "'blocks_0/norm1/scale'", "'blocks_1/ls2'", "'blocks.1.attn.proj.weight'"):
        assert part in msg, part
    assert "looked for 'blocks.0.norm1.weight'" in msg and "looked for 'blocks.1.ls2.gamma'" in msg  # source names


def test_detris_prefix_skips_the_rest_of_the_model():
    sd = to_torchhub(hf_model("reg").state_dict())
    ref, _ = port.convert_state_dict(sd, num_heads=2)
    wrapped = {f"module.dinov2.{k}": v for k, v in sd.items()}  # DistributedDataParallel + DETRIS names
    wrapped["module.dinov2.blocks.1.adapter.down.weight"] = torch.zeros(4, 32)  # DETRIS Dense Aligner
    wrapped["module.neck.fq.weight"] = torch.zeros(2)
    params, meta = port.convert_state_dict(wrapped, num_heads=2)
    assert meta["prefix"] == "module.dinov2." and meta["skipped"] == 2 and meta["layout"] == "torchhub"
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, ref))


def test_cli_writes_loadable_params(tmp_path):
    from port_weights.__main__ import main
    from wimfris_jax.backbones import load_backbone
    from wimfris_jax.io import ParamsFileError, flatten, load_params, save_params

    model = hf_model("reg")
    model.save_pretrained(tmp_path / "hf")
    assert main(["dinov2", str(tmp_path / "hf"), str(tmp_path / "out.msgpack")]) == 0
    params, meta = load_params(tmp_path / "out.msgpack")
    ref, _ = port.from_checkpoint(str(tmp_path / "hf"))
    assert meta["config"]["num_heads"] == 2  # from config.json
    assert all(np.array_equal(flatten(params)[k], v) for k, v in flatten(ref).items())
    net, variables = load_backbone(tmp_path / "out.msgpack")  # the converted file on its own
    x = np.random.default_rng(0).normal(size=(1, 28, 42, 3)).astype(np.float32)
    with torch.no_grad():
        expect = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    assert max_abs(net.apply(variables, x)["last_hidden_state"], expect) <= 1e-5
    detris = tmp_path / "detris.msgpack"
    save_params(detris, params, {"family": "detris", "config": {}})
    with pytest.raises(ParamsFileError, match="detris.msgpack: written by the 'detris' converter, not a backbone"):
        load_backbone(detris)
    assert main(["dinov2", str(tmp_path / "nothing.pth"), str(tmp_path / "x.msgpack")]) == 1


@pytest.mark.parametrize("name", ["s14", "b14_reg4", "l14", "g14_reg4"])
def test_presets_match_transformers_parameter_counts(name):
    cfg = dinov2_config(name)
    hf = dict(
        hidden_size=cfg["width"],
        num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"],
        use_swiglu_ffn=cfg["ffn"] == "swiglu",
        image_size=518,
        patch_size=14,
    )
    with torch.device("meta"):
        if cfg["num_registers"]:
            ref = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **hf))
        else:
            ref = Dinov2Model(Dinov2Config(**hf))
    n_ref = sum(p.numel() for k, p in ref.named_parameters() if "mask_token" not in k)
    n_ours = sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(port.expected_params(cfg)))
    assert n_ours == n_ref
    with pytest.raises(ValueError, match="unknown DINOv2 preset"):
        dinov2_config("b16")


@pytest.mark.slow
def test_full_size_b14_reg4_448_torchhub():
    """DINOv2-B/14 + 4 registers at 448 x 448 (37 -> 32 position grid), DETRIS's torch-hub rule, every layer."""
    model = perturb(dinov2_b14_reg4(seed=0), std=0.02)
    model.embeddings.interpolate_pos_encoding = types.MethodType(torchhub_interpolate, model.embeddings)
    params, meta = port.convert_state_dict(to_torchhub(model.state_dict()))
    assert meta["config"] == dinov2_config("b14_reg4")
    ours, ref = run_both(model, params, meta["config"], images(448, 448, b=1))
    assert ours["last_hidden_state"].shape == (1, 1 + 4 + 32 * 32, 768)
    assert_parity(ours, ref, 1e-4)
