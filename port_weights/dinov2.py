"""DINOv2 checkpoints -> :class:`wimfris_jax.backbones.DinoV2` params.

Layouts (detected from the key names; a common prefix such as DETRIS's ``dinov2.`` is found and kept):

- "torchhub": facebookresearch/dinov2 ``.pth`` files (``dinov2_vitb14_reg4_pretrain.pth``) and DETRIS's ``dinov2.*``:
  ``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj``,
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}``
  (``blocks.{chunk}.{i}`` when saved with block chunks), ``norm``. Position resampling rule "torchhub".
- "hf-v4" / "hf-v5": transformers ``Dinov2Model`` (rule "hf") and ``Dinov2WithRegistersModel`` (rule
  "hf_antialias", recognised by ``embeddings.register_tokens``), in the names ``save_pretrained`` writes
  (``attention.attention.{query,key,value}``, ``attention.output.dense``, ``mlp.weights_in/out``) or the in-memory
  names of transformers 5 (``attention.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``).

The position table is stored as trained (1, 1 + M*M, C), and ``meta["config"]["interpolation"]`` records the
source's resampling rule, so the converted model resamples exactly as its source for any input size.
``mask_token`` (used only for masked-image pretraining) is dropped. Sizes come from the shapes; the head count,
which no shape shows, comes from a ``config.json`` beside the weights, else from ``num_heads``, else from DINOv2's
head size 64 (width // 64).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import (
    ConversionError,
    Rule,
    conv2d,
    heads_out,
    linear,
    path_prefix,
    split_in_proj,
    split_qkv_rules,
)
from port_weights.protocol import (
    Family,
    Layout,
    block_count,
    convert_family,
    infer_num_heads,
    only_one,
    param_shapes,
    port,
    under_prefix,
)
from wimfris_jax.backbones.dinov2 import DinoV2
from wimfris_jax.backbones.vit import swiglu_hidden

LAYOUTS = ("torchhub", "hf", "hf-v4", "hf-v5")  # "hf": the rules of both hf-v4 and hf-v5


def split_gate_up(x: np.ndarray) -> dict[str, np.ndarray]:
    """A fused SwiGLU input projection (2H, C) weight / (2H,) bias -> ``{"gate|up/kernel|bias"}`` (gate first)."""
    leaf = "bias" if x.ndim == 1 else "kernel"
    gate, up = np.split(x, 2)
    f = (lambda a: a) if x.ndim == 1 else linear
    return {f"gate/{leaf}": f(gate), f"up/{leaf}": f(up)}


def rules(src_prefix: str = "", dst_prefix: str = "", *, num_heads: int, layout: str = "torchhub") -> list[Rule]:
    """Rules mapping DINOv2 keys under ``src_prefix`` onto :class:`DinoV2` params under ``dst_prefix``.

    Args:
      src_prefix: literal prefix of the keys, e.g. ``"dinov2."`` in a DETRIS checkpoint.
      dst_prefix: '/'-path of the DinoV2 module in the Flax tree, e.g. ``"params/image_encoder"`` ("" at the root).
      num_heads: attention heads (needed to split projections per head).
      layout: "torchhub" or "hf" (the hf rules accept both the v4 and the v5 names; "hf-v4" and "hf-v5" are "hf").
    """
    s, d, h = re.escape(src_prefix), path_prefix(dst_prefix), num_heads
    if layout == "torchhub":
        blk = s + r"blocks\.(?:\d+\.)?(\d+)\."
        b = d + r"blocks_\1/"
        return [
            Rule(s + "(cls_token|pos_embed|register_tokens)", d + r"\1"),
            Rule(s + r"patch_embed\.proj\.weight", d + "patch_embed/kernel", conv2d),
            Rule(s + r"patch_embed\.proj\.bias", d + "patch_embed/bias"),
            Rule(blk + r"(norm1|norm2)\.weight", b + r"\2/scale"),
            Rule(blk + r"(norm1|norm2)\.bias", b + r"\2/bias"),
            Rule(blk + r"attn\.qkv\.(weight|bias)", b + "attn", split_in_proj(h)),
            Rule(blk + r"attn\.proj\.weight", b + "attn/out/kernel", heads_out(h)),
            Rule(blk + r"attn\.proj\.bias", b + "attn/out/bias"),
            Rule(blk + r"(ls1|ls2)\.gamma", b + r"\2"),
            Rule(blk + r"mlp\.(fc1|fc2)\.weight", b + r"mlp/\2/kernel", linear),
            Rule(blk + r"mlp\.(fc1|fc2)\.bias", b + r"mlp/\2/bias"),
            Rule(blk + r"mlp\.w12\.(weight|bias)", b + "mlp", split_gate_up),
            Rule(blk + r"mlp\.w3\.weight", b + "mlp/down/kernel", linear),
            Rule(blk + r"mlp\.w3\.bias", b + "mlp/down/bias"),
            Rule(s + r"norm\.weight", d + "norm/scale"),
            Rule(s + r"norm\.bias", d + "norm/bias"),
        ]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    e = s + r"embeddings\."
    lay = s + r"encoder\.layer\.(\d+)\."
    b = d + r"blocks_\1/"
    out = [
        Rule(e + "cls_token", d + "cls_token"),
        Rule(e + "position_embeddings", d + "pos_embed"),
        Rule(e + "register_tokens", d + "register_tokens"),
        Rule(e + r"patch_embeddings\.projection\.weight", d + "patch_embed/kernel", conv2d),
        Rule(e + r"patch_embeddings\.projection\.bias", d + "patch_embed/bias"),
        Rule(lay + r"(norm1|norm2)\.weight", b + r"\2/scale"),
        Rule(lay + r"(norm1|norm2)\.bias", b + r"\2/bias"),
        Rule(lay + r"attention\.(?:output\.dense|o_proj)\.weight", b + "attn/out/kernel", heads_out(h)),
        Rule(lay + r"attention\.(?:output\.dense|o_proj)\.bias", b + "attn/out/bias"),
        Rule(lay + r"layer_scale(1|2)\.lambda1", b + r"ls\2"),
        Rule(lay + r"mlp\.(fc1|fc2)\.weight", b + r"mlp/\2/kernel", linear),
        Rule(lay + r"mlp\.(fc1|fc2)\.bias", b + r"mlp/\2/bias"),
        Rule(lay + r"mlp\.weights_in\.(weight|bias)", b + "mlp", split_gate_up),
        Rule(lay + r"mlp\.(?:weights_out|down_proj)\.weight", b + "mlp/down/kernel", linear),
        Rule(lay + r"mlp\.(?:weights_out|down_proj)\.bias", b + "mlp/down/bias"),
        Rule(lay + r"mlp\.(gate|up)_proj\.weight", b + r"mlp/\2/kernel", linear),
        Rule(lay + r"mlp\.(gate|up)_proj\.bias", b + r"mlp/\2/bias"),
        Rule(s + r"layernorm\.weight", d + "norm/scale"),
        Rule(s + r"layernorm\.bias", d + "norm/bias"),
    ]
    return out + split_qkv_rules(lay + r"attention\.(?:attention\.{long}|{short}_proj)\.", b + "attn/", h)


def ignore_patterns(src_prefix: str = "", layout: str = "torchhub") -> list[str]:
    """Source keys dropped on purpose: the mask token (masked-image pretraining only)."""
    s = re.escape(src_prefix)
    return [s + ("mask_token" if layout == "torchhub" else r"embeddings\.mask_token")]


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The layout ("torchhub", "hf-v4" or "hf-v5") and key prefix of the DINOv2 weights in ``state_dict``."""
    found = []
    for k in state_dict:
        if k.endswith("embeddings.position_embeddings"):
            found.append(Layout("hf", k[: -len("embeddings.position_embeddings")]))
        elif k == "pos_embed" or k.endswith(".pos_embed"):
            found.append(Layout("torchhub", k[: -len("pos_embed")]))
    what = "DINOv2 position table(s) ('pos_embed' of torch-hub or 'embeddings.position_embeddings' of transformers)"
    layout = only_one(found, source, what)
    if layout.name == "torchhub":
        return layout
    v5 = re.compile(re.escape(layout.prefix) + r"encoder\.layer\.\d+\.attention\.q_proj\.weight")
    return Layout("hf-v5" if any(v5.fullmatch(k) for k in state_dict) else "hf-v4", layout.prefix)


def infer_config(
    state_dict: Mapping[str, np.ndarray],
    layout: Layout,
    source: str = "checkpoint",
    *,
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The :class:`DinoV2` fields that fit the weights of ``layout``; the head count is ``num_heads``, else
    ``hf_config``'s, else width // 64."""
    prefix = layout.prefix
    hf_config = dict(hf_config or {})
    th = layout.name == "torchhub"
    names = {
        "cls": "cls_token" if th else "embeddings.cls_token",
        "pos": "pos_embed" if th else "embeddings.position_embeddings",
        "patch": "patch_embed.proj.weight" if th else "embeddings.patch_embeddings.projection.weight",
        "reg": "register_tokens" if th else "embeddings.register_tokens",
    }
    missing = [prefix + names[k] for k in ("cls", "pos", "patch") if prefix + names[k] not in state_dict]
    if missing:
        raise ConversionError(f"{source}: cannot size the DINOv2 model, missing key(s) {missing}")
    shape = {k: tuple(np.shape(state_dict[prefix + n])) for k, n in names.items() if prefix + n in state_dict}
    width = shape["cls"][-1]
    n_pos = shape["pos"][1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos or shape["patch"][-1] != shape["patch"][-2]:
        raise ConversionError(f"{source}: position table {shape['pos']} or patch kernel {shape['patch']} not square")
    blk = re.compile(re.escape(prefix) + (r"blocks\.(?:\d+\.)?(\d+)\." if th else r"encoder\.layer\.(\d+)\."))
    depth = block_count(state_dict, blk, source, "DINOv2")
    hidden, ffn = None, "mlp"
    for k, v in state_dict.items():
        if blk.match(k) and re.search(r"mlp\.fc1\.weight$", k):
            hidden = np.shape(v)[0]
        elif blk.match(k) and re.search(r"mlp\.(w12|weights_in)\.weight$", k):
            hidden, ffn = np.shape(v)[0] // 2, "swiglu"
        elif blk.match(k) and re.search(r"mlp\.gate_proj\.weight$", k):
            hidden, ffn = np.shape(v)[0], "swiglu"
    if hidden is None:
        raise ConversionError(f"{source}: no MLP weights (mlp.fc1 / mlp.w12 / mlp.weights_in / mlp.gate_proj) found")
    mlp_ratio = _mlp_ratio(width, hidden, ffn, source)
    heads = infer_num_heads(width, num_heads, hf_config, source)
    act = hf_config.get("hidden_act", "gelu")
    if ffn == "mlp" and act != "gelu":
        raise ConversionError(f"{source}: config.json hidden_act={act!r}; DinoV2 implements exact GELU only")
    layerscale = any(re.search(r"(ls1\.gamma|layer_scale1\.lambda1)$", k) for k in state_dict if blk.match(k))
    regs = shape["reg"][1] if "reg" in shape else 0
    rule = "torchhub" if th else ("hf_antialias" if "reg" in shape else "hf")
    return dict(
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        ffn=ffn,
        patch_size=int(shape["patch"][-1]),
        num_registers=int(regs),
        pos_grid=grid,
        layerscale=bool(layerscale),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
        interpolation=rule,
    )


def _mlp_ratio(width: int, hidden: int, ffn: str, source: str) -> float:
    for ratio in (4.0, hidden / width, hidden * 1.5 / width):
        if (swiglu_hidden(width, ratio) if ffn == "swiglu" else int(width * ratio)) == hidden:
            return float(ratio)
    raise ConversionError(f"{source}: no mlp_ratio gives an MLP of {hidden} for width {width} ({ffn})")


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``DinoV2(**config)`` (nothing is allocated)."""
    side = config["pos_grid"] * config["patch_size"]
    return param_shapes(DinoV2(**config), jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))


DINOV2 = Family(
    name="dinov2",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: rules(layout.prefix, num_heads=config["num_heads"], layout=layout.name),
    expected=lambda layout, config: expected_params(config),
    ignore=lambda layout: ignore_patterns(layout.prefix, layout.name),
    owns=under_prefix(r"(blocks\.(\d+\.)?\d+|encoder\.layer\.\d+)\.adapter\."),  # DETRIS's Dense Aligners
    meta=lambda layout, config: {"interpolation": config["interpolation"]},
    hf_model_type="dinov2",
)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    source: str = "checkpoint",
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """DINOv2 weights in any supported layout -> (DinoV2 params, meta).

    Keys outside the detected prefix (e.g. a classifier head, or the rest of a DETRIS model) and DETRIS's
    ``blocks.{i}.adapter.*`` are not DINOv2 weights: they are skipped and counted in ``meta["skipped"]``.
    """
    return convert_family(DINOV2, state_dict, source, num_heads=num_heads, hf_config=hf_config)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str, num_heads: int | None = None) -> tuple[dict, dict]:
    """Reads a DINOv2 checkpoint (torch-hub .pth, HF folder / .safetensors / .bin, DETRIS .pth) -> (params, meta).

    ``meta["config"]`` holds the :class:`~wimfris_jax.backbones.DinoV2` fields, resampling rule included;
    ``meta["source_dtypes"]`` counts the converted tensors by their stored dtype (``{"float32": 223}``).
    """
    return port(DINOV2, src, num_heads=num_heads)
