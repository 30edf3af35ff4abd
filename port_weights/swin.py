"""Swin Transformer checkpoints -> :class:`wimfris_jax.backbones.swin.Swin` params.

Layouts (detected from the key names; a common prefix such as ``swin.``, ``backbone.`` or DDP's ``module.`` is
found and kept):

- "hf-v4" / "hf-v5": transformers ``SwinModel`` / ``SwinForImageClassification`` (``swin.`` prefix; the
  ``classifier`` outside it is skipped and counted), in the names ``save_pretrained`` writes (v4) or the in-memory
  names of transformers 5 (v5); the rules of either accept both::

    embeddings.patch_embeddings.projection.*        -> patch_embed/conv/{kernel,bias}           (OIHW -> HWIO)
    embeddings.norm.*                               -> patch_embed/norm/{scale,bias}
    encoder.layers.{i}.blocks.{j}.                  -> layers_{i}/blocks_{j}/
      layernorm_before.*, layernorm_after.*         ->   norm1/*, norm2/*
      attention.self.{query,key,value}.*  | attention.{q,k,v}_proj.*          -> attn/{q,k,v}/*  (transposed)
      attention.output.dense.*            | attention.o_proj.*                -> attn/proj/*
      attention.self.relative_position_bias_table | attention.relative_position_bias.relative_position_bias_table
                                                    -> attn/relative_position_bias_table
      intermediate.dense.*, output.dense.* | mlp.fc1.*, mlp.fc2.*              -> mlp/fc1/*, mlp/fc2/*
    encoder.layers.{i}.downsample.reduction.weight  -> layers_{i}/downsample/reduction/kernel    (transposed)
    encoder.layers.{i}.downsample.norm.*            -> layers_{i}/downsample/norm/*
    layernorm.*                                     -> layernorm/*
    ...relative_position_index (buffer), embeddings.mask_token, classifier.* -> dropped (meta["dropped"])

- "microsoft": the official ``microsoft/Swin-Transformer`` checkpoints (``swin_base_patch4_window12_384_22k.pth``;
  weights under ``model``, which :func:`~port_weights.checkpoint.load_torch_checkpoint` unwraps)::

    patch_embed.proj.*, patch_embed.norm.*          -> patch_embed/conv/*, patch_embed/norm/*
    layers.{i}.blocks.{j}.norm1.*, norm2.*          -> layers_{i}/blocks_{j}/norm1/*, norm2/*
    layers.{i}.blocks.{j}.attn.qkv.*                -> .../attn/{q,k,v}/*   (rows [q; k; v] split, transposed)
    layers.{i}.blocks.{j}.attn.proj.*               -> .../attn/proj/*
    layers.{i}.blocks.{j}.attn.relative_position_bias_table -> .../attn/relative_position_bias_table
    layers.{i}.blocks.{j}.mlp.fc1.*, mlp.fc2.*      -> .../mlp/fc1/*, mlp/fc2/*
    layers.{i}.downsample.{reduction.weight, norm.*} -> layers_{i}/downsample/{reduction/kernel, norm/*}
    norm.*                                          -> layernorm/*
    ...attn.relative_position_index, ...attn_mask (buffers), head.* -> dropped (meta["dropped"])

Both concatenate the 2 x 2 neighbours of patch merging in the same order, so ``reduction`` is copied as stored.
The sizes come from the shapes: embed dim and patch size from the patch conv, depths from the block numbers, the
heads of each stage from its bias table's columns, the window W from its rows ((2W - 1)^2; one W for all stages),
the MLP ratio from ``fc1``; the LayerNorm epsilon is the ``layer_norm_eps`` of a ``config.json`` beside transformers
weights (1e-5 otherwise). Absolute position embeddings (``ape``) are refused: :class:`Swin` does not implement them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import ConversionError, Rule, conv2d, linear, path_prefix
from port_weights.protocol import (
    Family,
    Layout,
    block_count,
    convert_family,
    only_one,
    param_shapes,
    port,
    under_prefix,
)
from wimfris_jax.backbones.swin import Swin

LAYOUTS = ("microsoft", "hf", "hf-v4", "hf-v5")  # "hf": the rules of both hf-v4 and hf-v5
_STAGES = {"hf-v4": "encoder.layers", "hf-v5": "encoder.layers", "microsoft": "layers"}
_TABLE = {  # a block's relative position bias table, per layout
    "hf-v4": "attention.self.relative_position_bias_table",
    "hf-v5": "attention.relative_position_bias.relative_position_bias_table",
    "microsoft": "attn.relative_position_bias_table",
}


def split_qkv(x: np.ndarray) -> dict[str, np.ndarray]:
    """The official fused ``attn.qkv`` (3C, C) weight / (3C,) bias -> ``{"q|k|v/kernel|bias"}`` (rows q, k, v)."""
    leaf = "bias" if x.ndim == 1 else "kernel"
    f = (lambda a: a) if x.ndim == 1 else linear
    return {f"{n}/{leaf}": f(part) for n, part in zip("qkv", np.split(x, 3))}


def _pair(src: str, dst: str, kernel: Any = linear) -> list[Rule]:
    """``src`` + weight/bias -> ``dst`` + kernel/bias (a LayerNorm's weight -> scale when ``kernel`` is None)."""
    return [
        Rule(src + r"\.weight", dst + ("/kernel" if kernel is not None else "/scale"), kernel),
        Rule(src + r"\.bias", dst + "/bias"),
    ]


def rules(src_prefix: str = "", dst_prefix: str = "", *, layout: str = "hf") -> list[Rule]:
    """Rules mapping Swin keys under ``src_prefix`` onto :class:`Swin` params under ``dst_prefix``.

    Args:
      src_prefix: literal prefix of the keys, e.g. ``"swin."`` in a ``SwinForImageClassification``.
      dst_prefix: '/'-path of the Swin module in the Flax tree ("" at the root).
      layout: "microsoft" or "hf" (the hf rules accept both the v4 and the v5 names; "hf-v4", "hf-v5" are "hf").
    """
    s, d = re.escape(src_prefix), path_prefix(dst_prefix)
    if layout == "microsoft":
        blk, b = s + r"layers\.(\d+)\.blocks\.(\d+)\.", d + r"layers_\1/blocks_\2/"
        down, dn = s + r"layers\.(\d+)\.downsample\.", d + r"layers_\1/downsample/"
        return [
            *_pair(s + r"patch_embed\.proj", d + "patch_embed/conv", conv2d),
            *_pair(s + r"patch_embed\.norm", d + "patch_embed/norm", None),
            *_pair(blk + r"(norm1|norm2)", b + r"\3", None),
            Rule(blk + r"attn\.qkv\.(weight|bias)", b + "attn", split_qkv),
            *_pair(blk + r"attn\.proj", b + "attn/proj"),
            Rule(blk + r"attn\.relative_position_bias_table", b + "attn/relative_position_bias_table"),
            *_pair(blk + r"mlp\.(fc1|fc2)", b + r"mlp/\3"),
            Rule(down + r"reduction\.weight", dn + "reduction/kernel", linear),
            *_pair(down + "norm", dn + "norm", None),
            *_pair(s + r"norm", d + "layernorm", None),
        ]  # fmt: skip
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    e, lay = s + r"embeddings\.", s + r"encoder\.layers\.(\d+)\."
    blk, b = lay + r"blocks\.(\d+)\.", d + r"layers_\1/blocks_\2/"
    out = [
        *_pair(e + r"patch_embeddings\.projection", d + "patch_embed/conv", conv2d),
        *_pair(e + r"norm", d + "patch_embed/norm", None),
        *_pair(blk + r"layernorm_before", b + "norm1", None),
        *_pair(blk + r"layernorm_after", b + "norm2", None),
        *_pair(blk + r"attention\.(?:output\.dense|o_proj)", b + "attn/proj"),
        Rule(blk + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
             b + "attn/relative_position_bias_table"),
        *_pair(blk + r"(?:intermediate\.dense|mlp\.fc1)", b + "mlp/fc1"),
        *_pair(blk + r"(?:output\.dense|mlp\.fc2)", b + "mlp/fc2"),
        Rule(lay + r"downsample\.reduction\.weight", d + r"layers_\1/downsample/reduction/kernel", linear),
        *_pair(lay + r"downsample\.norm", d + r"layers_\1/downsample/norm", None),
        *_pair(s + r"layernorm", d + "layernorm", None),
    ]  # fmt: skip
    for short, long in (("q", "query"), ("k", "key"), ("v", "value")):
        out += _pair(blk + rf"attention\.(?:self\.{long}|{short}_proj)", b + f"attn/{short}")
    return out


def ignore_patterns(src_prefix: str = "", layout: str = "hf") -> list[str]:
    """Source keys dropped on purpose: the bias index and shift-mask buffers, the mask token, the ImageNet head."""
    s = re.escape(src_prefix)
    if layout == "microsoft":
        blk = s + r"layers\.\d+\.blocks\.\d+\."
        return [blk + r"attn\.relative_position_index", blk + "attn_mask", s + r"head\.(weight|bias)"]
    blk = s + r"encoder\.layers\.\d+\.blocks\.\d+\.attention\."
    return [
        blk + r"(?:self|relative_position_bias)\.relative_position_index",
        s + r"embeddings\.mask_token",
        s + r"classifier\.(weight|bias)",
    ]


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The layout ("hf-v4", "hf-v5" or "microsoft") and key prefix of the Swin weights in ``state_dict``: found from
    the relative position bias table of the first block."""
    tails = {name: f"{_STAGES[name]}.0.blocks.0.{_TABLE[name]}" for name in _TABLE}
    found = []
    for k in state_dict:
        for name, tail in tails.items():
            if k.endswith(tail) and (len(k) == len(tail) or k[-len(tail) - 1] == "."):
                found.append(Layout(name, k[: -len(tail)]))
    what = f"Swin first block(s) ({' or '.join(map(repr, tails.values()))})"
    return only_one(found, source, what)


def infer_config(
    state_dict: Mapping[str, Any],
    layout: Layout,
    source: str = "checkpoint",
    *,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The :class:`Swin` fields that fit the weights of ``layout`` (see the module docstring)."""
    p, ms = layout.prefix, layout.name == "microsoft"
    hf_config = dict(hf_config or {})
    shape = lambda k: tuple(np.shape(state_dict[p + k])) if p + k in state_dict else None
    ape = "absolute_pos_embed" if ms else "embeddings.position_embeddings"
    if shape(ape) is not None or hf_config.get("use_absolute_embeddings"):
        raise ConversionError(f"{source}: absolute position embeddings ({p + ape}) are not implemented in Swin")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{source}: config.json hidden_act={hf_config['hidden_act']!r}; Swin has exact GELU only")
    patch = shape("patch_embed.proj.weight" if ms else "embeddings.patch_embeddings.projection.weight")
    if patch is None or len(patch) != 4 or patch[2] != patch[3]:
        raise ConversionError(f"{source}: no square patch embedding conv found (shape {patch})")
    lay, tail = _STAGES[layout.name], _TABLE[layout.name]
    n = block_count(state_dict, re.compile(re.escape(p + lay) + r"\.(\d+)\."), source, "Swin stage")
    depths = [block_count(state_dict, re.compile(re.escape(f"{p}{lay}.{i}.blocks.") + r"(\d+)\."), source,
                          f"Swin stage {i}") for i in range(n)]  # fmt: skip
    tables = [shape(f"{lay}.{i}.blocks.0.{tail}") for i in range(n)]
    if None in tables:
        raise ConversionError(f"{source}: cannot size the stages, missing '{p}{lay}.{{i}}.blocks.0.{tail}' {tables}")
    sides = {math.isqrt(t[0]) for t in tables}
    side = sides.pop()
    if sides or side * side != tables[0][0] or side % 2 == 0 or len({t[0] for t in tables}) != 1:
        raise ConversionError(
            f"{source}: bias tables of {[t[0] for t in tables]} rows; Swin needs one window W for all stages, "
            "i.e. (2W - 1)^2 rows in every table"
        )
    dim = int(patch[0])
    norm1 = "norm1" if ms else "layernorm_before"
    widths = [shape(f"{lay}.{i}.blocks.0.{norm1}.weight") for i in range(n)]
    if widths != [(dim * 2**i,) for i in range(n)]:
        raise ConversionError(f"{source}: stage widths {widths}; Swin needs embed_dim * 2^i = {dim} * 2^i")
    fc1 = next((shape(f"{lay}.0.blocks.0.{k}") for k in ("mlp.fc1.weight", "intermediate.dense.weight")
                if shape(f"{lay}.0.blocks.0.{k}") is not None), None)  # fmt: skip
    if fc1 is None:
        raise ConversionError(f"{source}: no MLP weights (mlp.fc1 / intermediate.dense) in '{p}{lay}.0.blocks.0.'")
    ratio = fc1[0] / dim
    return dict(
        embed_dim=dim,
        depths=tuple(depths),
        num_heads=tuple(int(t[1]) for t in tables),
        window_size=(side + 1) // 2,
        patch_size=int(patch[-1]),
        mlp_ratio=float(ratio),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
    )


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``Swin(**config)`` (nothing is allocated)."""
    p = config.get("patch_size", 4)
    return param_shapes(Swin(**config), jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32))  # one patch: enough


SWIN = Family(
    name="swin",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: rules(layout.prefix, layout=layout.name),
    expected=lambda layout, config: expected_params(config),
    ignore=lambda layout: ignore_patterns(layout.prefix, layout.name),
    owns=under_prefix(),
    hf_model_type="swin",
)


def convert_state_dict(
    state_dict: Mapping[str, Any], source: str = "checkpoint", hf_config: Mapping[str, Any] | None = None
) -> tuple[dict, dict]:
    """Swin weights in any supported layout -> (Swin params, meta); keys outside the detected prefix (e.g. the
    ``classifier`` of a ``SwinForImageClassification``) are skipped and counted in ``meta["skipped"]``."""
    return convert_family(SWIN, state_dict, source, hf_config=hf_config)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str) -> tuple[dict, dict]:
    """Reads a Swin checkpoint (official .pth, HF folder / .safetensors / .bin) -> (params, meta);
    ``meta["config"]`` holds the :class:`~wimfris_jax.backbones.swin.Swin` fields."""
    return port(SWIN, src)
