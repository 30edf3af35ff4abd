"""ClipText and its converter against transformers' CLIP text models (random weights, fp32).

Checked on every returned layer (embeddings, each block, ln_final), the pooled EOT feature and the projected
sentence feature, from: HF files in the v4 names save_pretrained writes, HF v5 in-memory names, a CLIPModel (text
part only), and the OpenAI layout both as a plain state dict and as a TorchScript archive built from the same weights.
The ViT-L/14 tower (768 wide, 12 heads) is checked at its head geometry with 2 blocks and a small vocabulary, with
the head count left to the converter (a wrong one keeps every shape, so only the numbers show it), and at full size
(slow).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from configs.common import CLIP_B16_TEXT
from port_weights import clip as port
from port_weights.common import ConversionError
from torch_ref.backbones import assert_outputs_match, clip_b16_text, max_abs, perturb
from wimfris_jax.backbones import ClipText
from wimfris_jax.backbones.clip_text import clip_text_config

# eos_token_id=2 selects transformers' argmax pooling (the OpenAI / DETRIS rule) for a vocabulary of 100.
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=20,
    eos_token_id=2,
)


# openai/clip-vit-large-patch14 config.json, text_config and projection_dim (written out: no download)
L14_HF = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# L/14 head geometry (768 wide, 12 heads of 64), 2 blocks, a vocabulary of 100
L14_SMALL = dict(L14_HF, vocab_size=100, num_hidden_layers=2, bos_token_id=0, eos_token_id=2)


def token_ids(b: int = 3, length: int = 7, vocab: int = 100, seed: int = 0) -> np.ndarray:
    """[SOT, words..., EOT, 0, ...] rows: EOT (vocab - 1) is each row's largest id, padding is 0 (DETRIS)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, length), np.int64)
    for r in range(b):
        n = int(rng.integers(1, length - 1))
        ids[r, : n + 2] = [vocab - 2, *rng.integers(1, vocab - 2, n), vocab - 1]
    return ids


def to_openai(sd: dict) -> dict:
    """A CLIPTextModelWithProjection state dict (text_model.* + text_projection.weight) in OpenAI CLIP names."""
    sd = {k.removeprefix("text_model."): v.detach().clone() for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for leaf in ("weight", "bias"):
        out[f"ln_final.{leaf}"] = sd.pop(f"final_layer_norm.{leaf}")
        for i in sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}):
            s, t = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
            out[t + f"attn.in_proj_{leaf}"] = torch.cat([sd.pop(s + f"self_attn.{n}_proj.{leaf}") for n in "qkv"])
            out[t + f"attn.out_proj.{leaf}"] = sd.pop(s + f"self_attn.out_proj.{leaf}")
            for a, b in names.items():
                out[t + f"{b}.{leaf}"] = sd.pop(s + f"{a}.{leaf}")
    assert not sd, sd.keys()
    return out


class _OpenAIBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        fc, proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.mlp = torch.nn.Sequential(OrderedDict(c_fc=fc, gelu=torch.nn.GELU(), c_proj=proj))


class OpenAIClip(torch.nn.Module):
    """The OpenAI CLIP parameter layout (text side, a stub visual tower and the archive's bookkeeping buffers)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, ctx: int, proj: int):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(ctx, width))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.Sequential(*[_OpenAIBlock(width, heads) for _ in range(layers)])
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.zeros(width, proj))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        self.visual = torch.nn.Module()
        self.visual.proj = torch.nn.Parameter(torch.zeros(8, proj))
        for name, value in (("input_resolution", 224), ("context_length", ctx), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ln_final(self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]])


def hf_with_projection(**kw) -> CLIPTextModelWithProjection:
    return perturb(CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **{**TINY, **kw})))


def run_both(model, text_model, params, config, ids, adapters=None):
    """(ours, reference dict) for int ids; ``text_model`` is the CLIPTextModel inside ``model`` (or ``model``)."""
    with torch.no_grad():
        ref = text_model(torch.from_numpy(ids), output_hidden_states=True)
        out = {"hidden_states": ref.hidden_states, "last_hidden_state": ref.last_hidden_state,
               "pooled": ref.pooler_output}  # fmt: skip
        if config["proj_dim"] is not None:
            out["text_embeds"] = model.text_projection(ref.pooler_output)
    ours = ClipText(**config).apply({"params": params}, jnp.asarray(ids, jnp.int32), adapters)
    return ours, {k: (tuple(x.numpy() for x in v) if k == "hidden_states" else v.numpy()) for k, v in out.items()}




# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fmt", ["v4_folder_projection", "v5_bin_text_only", "clip_model_folder"])
def test_hf_parity(fmt, tmp_path):
    if fmt == "v4_folder_projection":  # text_model.* + text_projection.weight, config.json beside
        model = hf_with_projection()
        model.save_pretrained(tmp_path)
        src, text_model, proj = str(tmp_path), model.text_model, 16
    elif fmt == "v5_bin_text_only":  # transformers 5 CLIPTextModel names: no text_model. prefix, no projection
        model = text_model = perturb(CLIPTextModel(CLIPTextConfig(**TINY)))
        src, proj = str(tmp_path / "clip_text.bin"), None
        torch.save(model.state_dict(), src)
    else:  # CLIPModel: the vision tower, visual projection and logit scale are dropped
        vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28)
        model = perturb(
            CLIPModel(CLIPConfig(text_config=TINY, vision_config=dict(patch_size=14, **vision), projection_dim=16))
        )
        model.save_pretrained(tmp_path)
        src, text_model, proj = str(tmp_path), model.text_model, 16
    params, meta = port.from_checkpoint(src, num_heads=None if "folder" in fmt else 2)
    assert meta["layout"] == "hf"
    assert meta["config"] == dict(
        vocab_size=100, width=32, depth=2, num_heads=2, context_length=20, proj_dim=proj, ln_eps=1e-5, mlp_ratio=4.0
    )
    if fmt == "clip_model_folder":
        rest = set(meta["dropped"]) - {"logit_scale", "visual_projection.weight"}
        assert len(rest) == len(meta["dropped"]) - 2 and all(k.startswith("vision_model.") for k in rest)
    for length in (7, 20):
        assert_outputs_match(*run_both(model, text_model, params, meta["config"], token_ids(length=length)), 1e-5)


@pytest.mark.parametrize("archive", ["state_dict", "torchscript"])
def test_openai_layout_parity(archive, tmp_path):
    model = hf_with_projection()
    ref_module = OpenAIClip(vocab=100, width=32, layers=2, heads=2, ctx=20, proj=16)
    missing, unexpected = ref_module.load_state_dict(to_openai(model.state_dict()), strict=False)
    assert set(missing) == {"logit_scale", "visual.proj", "input_resolution", "context_length", "vocab_size"}
    assert not unexpected
    src = str(tmp_path / "ViT-tiny.pt")
    if archive == "torchscript":
        torch.jit.trace(ref_module, torch.from_numpy(token_ids())).save(src)  # like OpenAI's jit archive
        assert isinstance(torch.jit.load(src), torch.jit.ScriptModule)
    else:
        torch.save(ref_module.state_dict(), src)
    params, meta = port.from_checkpoint(src, num_heads=2)
    assert meta["layout"] == "openai"
    assert meta["dropped"] == ["context_length", "input_resolution", "logit_scale", "visual.proj", "vocab_size"]
    assert_outputs_match(*run_both(model, model.text_model, params, meta["config"], token_ids()), 1e-5)


@pytest.mark.parametrize("fmt", ["hf_v4_folder", "hf_v5_bin", "openai_state_dict"])
def test_l14_head_geometry_parity(fmt, tmp_path):
    """12 heads of 64 from the config.json (HF folder) or from width // 64 (no config: OpenAI, a bare .bin)."""
    model = perturb(CLIPTextModelWithProjection(CLIPTextConfig(**L14_SMALL)), std=0.02)
    if fmt == "hf_v4_folder":
        model.save_pretrained(tmp_path)
        src = str(tmp_path)
    elif fmt == "hf_v5_bin":
        src = str(tmp_path / "clip_l14_text.bin")
        torch.save(model.state_dict(), src)
    else:
        src = str(tmp_path / "ViT-L-14-small.pt")
        torch.save(to_openai(model.state_dict()), src)
    params, meta = port.from_checkpoint(src)  # no num_heads
    assert meta["layout"] == fmt.split("_")[0]
    assert meta["config"] == {**clip_text_config("l14"), "vocab_size": 100, "depth": 2}
    ids = token_ids(b=2, length=17)
    ours, ref = run_both(model, model.text_model, params, meta["config"], ids)
    assert_outputs_match(ours, ref, 1e-5)
    if fmt == "openai_state_dict":  # 8 heads of 96 convert and run with the same shapes, to other numbers
        wrong, meta8 = port.from_checkpoint(src, num_heads=8)
        out8 = ClipText(**meta8["config"]).apply({"params": wrong}, jnp.asarray(ids, jnp.int32))
        assert max_abs(out8["text_embeds"], ref["text_embeds"]) > 1e-3


def test_presets_match_transformers_configs():
    """The presets "l14" / "b16" = what the converter infers from transformers' CLIP text towers of those sizes
    (meta device: shapes only): openai/clip-vit-large-patch14's sizes written out (L14_HF), CLIPTextConfig's defaults
    (B/16)."""
    for name, hf in (("l14", CLIPTextConfig(**L14_HF)), ("b16", CLIPTextConfig(projection_dim=512))):
        with torch.device("meta"):
            sd = CLIPTextModelWithProjection(hf).state_dict()
        layout = port.detect_layout(sd)
        assert port.infer_config(sd, layout, hf_config=hf.to_dict()) == clip_text_config(name), name
        assert port.infer_config(sd, layout) == clip_text_config(name), name  # heads = width // 64
    cfg = clip_text_config("l14")
    assert (cfg["width"], cfg["depth"], cfg["num_heads"], cfg["proj_dim"]) == (768, 12, 12, 768)
    assert cfg["vocab_size"] == 49408 and cfg["context_length"] == 77
    assert CLIP_B16_TEXT.items() <= clip_text_config("b16").items()  # the model configs' text tower is "b16"
    with pytest.raises(ValueError, match="unknown CLIP text preset 'h14'"):
        clip_text_config("h14")


def test_config_json_of_another_width_is_refused():
    sd = CLIPTextModelWithProjection(CLIPTextConfig(**TINY, projection_dim=16)).state_dict()
    with pytest.raises(ConversionError, match="hidden_size=768 but the text weights have width 32"):
        port.convert_state_dict(sd, hf_config=dict(hidden_size=768, num_attention_heads=12))


class _Parent(nn.Module):
    config: dict

    def setup(self):
        self.text = ClipText(**self.config)
        self.mta = nn.Dense(self.config["width"], name="mta_1")

    def __call__(self, ids):
        return self.text(ids, adapters={1: functools.partial(lambda m, x: 0.2 * m(x), self.mta)})


def test_adapter_seam_reads_x_after_attention():
    model = hf_with_projection()
    params, meta = port.convert_state_dict(to_openai(model.state_dict()), num_heads=2)
    parent, ids = _Parent(meta["config"]), token_ids()
    variables = jax.eval_shape(parent.init, jax.random.key(0), jnp.asarray(ids))
    assert set(variables["params"]) == {"text", "mta_1"}
    rng = np.random.default_rng(1)
    ad = {"kernel": rng.normal(0, 0.3, (32, 32)).astype(np.float32), "bias": rng.normal(0, 0.1, 32).astype(np.float32)}
    full = {"params": {"text": params, "mta_1": ad}}
    out = parent.apply(full, jnp.asarray(ids))

    # reference: block 1 of transformers gets 0.2 * A(x) beside its MLP, x = the residual stream after attention
    lin = torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(ad["kernel"].T))
        lin.bias.copy_(torch.from_numpy(ad["bias"]))
    layer, seen = model.text_model.encoder.layers[1], {}
    hooks = [
        layer.layer_norm2.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0])),
        layer.mlp.register_forward_hook(lambda m, inp, y: y + 0.2 * lin(seen["x"])),
    ]
    _, ref = run_both(model, model.text_model, params, meta["config"], ids)
    for h in hooks:
        h.remove()
    assert_outputs_match(out, ref, 1e-5)
    _, plain = run_both(model, model.text_model, params, meta["config"], ids)
    assert max_abs(out["last_hidden_state"], plain["last_hidden_state"]) > 1e-2

    def loss(p):
        return jnp.sum(parent.apply({"params": {"text": params, "mta_1": p}}, jnp.asarray(ids))["text_embeds"] ** 2)

    g = jax.jit(jax.grad(loss))(ad)
    assert float(jnp.abs(g["kernel"]).max()) > 0 and float(jnp.abs(g["bias"]).max()) > 0


def test_causal_padding_and_length_checks():
    params, meta = port.convert_state_dict(to_openai(hf_with_projection().state_dict()), num_heads=2)
    model, params = ClipText(**meta["config"]), {"params": params}
    ids = token_ids(b=1, length=9)
    longer = np.concatenate([ids, np.zeros((1, 5), ids.dtype)], axis=1)  # more padding after EOT
    apply = jax.jit(model.apply)
    a, b = apply(params, jnp.asarray(ids)), apply(params, jnp.asarray(longer))
    # causal: padding cannot reach EOT (1e-5: fp32 rounding differs at another length, ~1e-6 seen)
    np.testing.assert_allclose(a["text_embeds"], b["text_embeds"], atol=1e-5)
    np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"][:, :9], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the position table's context_length 20"):
        model.apply(params, jnp.zeros((1, 21), jnp.int32))


def test_detris_prefix_skips_the_rest_of_the_model():
    sd = to_openai(hf_with_projection().state_dict())
    ref, _ = port.convert_state_dict(sd, num_heads=2)
    wrapped = {f"txt_backbone.{k}": v for k, v in sd.items()}
    wrapped["txt_backbone.transformer.resblocks.1.adapter.down.weight"] = torch.zeros(4, 32)  # DETRIS text adapter
    wrapped["neck.fq.weight"] = torch.zeros(2)
    params, meta = port.convert_state_dict(wrapped, num_heads=2)
    assert meta["prefix"] == "txt_backbone." and meta["skipped"] == 2
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, ref))


def test_bad_checkpoint_names_every_key(tmp_path):
    sd = to_openai(hf_with_projection().state_dict())
    sd["transformer.resblocks.1.ln_one.bias"] = sd.pop("transformer.resblocks.1.ln_1.bias")  # renamed
    del sd["ln_final.weight"]  # missing
    src = str(tmp_path / "broken.pt")
    torch.save(sd, src)
    with pytest.raises(ConversionError) as e:
        port.from_checkpoint(src, num_heads=2)
    msg = str(e.value)
    assert msg.startswith(src) and "3 problem(s)" in msg
    for part in ("'transformer.resblocks.1.ln_one.bias'", "'blocks_1/ln_1/bias'", "'ln_final/scale'"):
        assert part in msg, part
    assert "looked for 'transformer.resblocks.1.ln_1.bias'" in msg and "looked for 'ln_final.weight'" in msg


@pytest.mark.slow
def test_full_size_b16_text_tower():
    """CLIP ViT-B/16 text tower (49408 x 512, 12 layers, 8 heads, 77 positions, projection 512), L = 17."""
    model = perturb(clip_b16_text(seed=0), std=0.02)  # EOT 49407
    params, meta = port.convert_state_dict(to_openai(model.state_dict()), num_heads=8)
    assert meta["config"] == dict(
        vocab_size=49408, width=512, depth=12, num_heads=8, context_length=77, proj_dim=512, ln_eps=1e-5, mlp_ratio=4.0
    )
    ids = token_ids(b=4, length=17, vocab=49408)
    assert_outputs_match(*run_both(model, model.text_model, params, meta["config"], ids), 1e-4)


@pytest.mark.slow
def test_full_size_l14_text_tower():
    """CLIP ViT-L/14 text tower (49408 x 768, 12 layers, 12 heads, 77 positions, projection 768), OpenAI layout
    without a head count (width // 64), L = 17."""
    torch.manual_seed(0)
    model = perturb(CLIPTextModelWithProjection(CLIPTextConfig(**L14_HF)).eval(), std=0.02)  # EOT 49407
    params, meta = port.convert_state_dict(to_openai(model.state_dict()))
    assert meta["config"] == clip_text_config("l14")
    ids = token_ids(b=4, length=17, vocab=49408)
    assert_outputs_match(*run_both(model, model.text_model, params, meta["config"], ids), 1e-4)
