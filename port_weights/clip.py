"""CLIP checkpoints (text tower only) -> :class:`wimfris_jax.backbones.ClipText` params.

Layouts (detected from the key names; a common prefix such as DETRIS's ``txt_backbone.`` is found and kept):

- "openai": OpenAI ``clip/model.py`` names, from ``ViT-B-16.pt`` / ``ViT-L-14.pt`` (TorchScript archives) or a plain
  state dict:
  ``token_embedding.weight``, ``positional_embedding`` (77, W), ``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight,
  attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection`` (W, P) (used as
  ``x @ P``, so copied as is). ``visual.*``, ``logit_scale`` and the archive's ``input_resolution`` /
  ``context_length`` / ``vocab_size`` are dropped.
- "hf": transformers ``CLIPTextModel`` (v5 in-memory names have no ``text_model.`` prefix, v4 files have it),
  ``CLIPTextModelWithProjection`` and ``CLIPModel`` (``text_model.*`` + ``text_projection.weight``, transposed;
  ``vision_model.*``, ``visual_projection``, ``logit_scale`` dropped).

Sizes come from the shapes; the head count (which no shape shows) is ``num_heads`` if given, else the
``num_attention_heads`` of a ``config.json`` beside the weights (its ``text_config`` for a CLIPModel), else CLIP's
head size 64 as OpenAI's ``build_model`` derives it (width // 64: 8 heads for ViT-B/16's 512, 12 for ViT-L/14's
768). ``proj_dim`` is None when the checkpoint has no text projection. A full B/16 or L/14 tower gives
:func:`~wimfris_jax.backbones.clip_text.clip_text_config` ("b16" / "l14").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import (
    ConversionError,
    Rule,
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
from wimfris_jax.backbones.clip_text import ClipText

LAYOUTS = ("openai", "hf")


def rules(src_prefix: str = "", dst_prefix: str = "", *, num_heads: int, layout: str = "openai") -> list[Rule]:
    """Rules mapping CLIP text keys under ``src_prefix`` onto :class:`ClipText` params under ``dst_prefix``.

    Args:
      src_prefix: literal prefix of the keys, e.g. ``"txt_backbone."`` in a DETRIS checkpoint.
      dst_prefix: '/'-path of the ClipText module in the Flax tree, e.g. ``"params/text_encoder"`` ("" at the root).
      num_heads: attention heads (needed to split projections per head).
      layout: "openai" or "hf" (hf: the tower's keys with or without ``text_model.``).
    """
    s, h = re.escape(src_prefix), num_heads
    d = path_prefix(dst_prefix)
    if layout == "openai":
        blk = s + r"transformer\.resblocks\.(\d+)\."
        b = d + r"blocks_\1/"
        return [
            Rule(s + r"token_embedding\.weight", d + "token_embedding/embedding"),
            Rule(s + "positional_embedding", d + "positional_embedding"),
            Rule(s + "text_projection", d + "text_projection"),
            Rule(blk + r"(ln_1|ln_2)\.weight", b + r"\2/scale"),
            Rule(blk + r"(ln_1|ln_2)\.bias", b + r"\2/bias"),
            Rule(blk + r"attn\.in_proj_(weight|bias)", b + "attn", split_in_proj(h)),
            Rule(blk + r"attn\.out_proj\.weight", b + "attn/out/kernel", heads_out(h)),
            Rule(blk + r"attn\.out_proj\.bias", b + "attn/out/bias"),
            Rule(blk + r"mlp\.c_fc\.weight", b + "mlp/fc1/kernel", linear),
            Rule(blk + r"mlp\.c_fc\.bias", b + "mlp/fc1/bias"),
            Rule(blk + r"mlp\.c_proj\.weight", b + "mlp/fc2/kernel", linear),
            Rule(blk + r"mlp\.c_proj\.bias", b + "mlp/fc2/bias"),
            Rule(s + r"ln_final\.weight", d + "ln_final/scale"),
            Rule(s + r"ln_final\.bias", d + "ln_final/bias"),
        ]
    if layout != "hf":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    e = s + r"(?:text_model\.)?"
    lay = e + r"encoder\.layers\.(\d+)\."
    b = d + r"blocks_\1/"
    out = [
        Rule(e + r"embeddings\.token_embedding\.weight", d + "token_embedding/embedding"),
        Rule(e + r"embeddings\.position_embedding\.weight", d + "positional_embedding"),
        Rule(s + r"text_projection\.weight", d + "text_projection", linear),
        Rule(lay + r"layer_norm(1|2)\.weight", b + r"ln_\2/scale"),
        Rule(lay + r"layer_norm(1|2)\.bias", b + r"ln_\2/bias"),
        Rule(lay + r"self_attn\.out_proj\.weight", b + "attn/out/kernel", heads_out(h)),
        Rule(lay + r"self_attn\.out_proj\.bias", b + "attn/out/bias"),
        Rule(lay + r"mlp\.(fc1|fc2)\.weight", b + r"mlp/\2/kernel", linear),
        Rule(lay + r"mlp\.(fc1|fc2)\.bias", b + r"mlp/\2/bias"),
        Rule(e + r"final_layer_norm\.weight", d + "ln_final/scale"),
        Rule(e + r"final_layer_norm\.bias", d + "ln_final/bias"),
    ]
    return out + split_qkv_rules(lay + r"self_attn\.{short}_proj\.", b + "attn/", h)


def ignore_patterns(src_prefix: str = "", layout: str = "openai") -> list[str]:
    """Source keys dropped on purpose: the vision tower, the logit scale and non-weight entries."""
    s = re.escape(src_prefix)
    if layout == "openai":
        return [s + r"visual\..*", s + "logit_scale", s + "(input_resolution|context_length|vocab_size)"]
    return [
        s + r"vision_model\..*",
        s + r"visual_projection\.weight",
        s + "logit_scale",
        s + r"(?:text_model\.)?embeddings\.position_ids",
    ]


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The layout ("openai" or "hf") and key prefix of the CLIP text weights in ``state_dict``."""
    found = []
    for k in state_dict:
        if k.endswith("embeddings.token_embedding.weight"):
            p = k[: -len("embeddings.token_embedding.weight")]
            found.append(Layout("hf", p[: -len("text_model.")] if p.endswith("text_model.") else p))
        elif k == "token_embedding.weight" or k.endswith(".token_embedding.weight"):
            found.append(Layout("openai", k[: -len("token_embedding.weight")]))
    what = (
        "CLIP token embedding(s) ('token_embedding.weight' of OpenAI CLIP or 'embeddings.token_embedding.weight' "
        "of transformers)"
    )
    return only_one(found, source, what)


def infer_config(
    state_dict: Mapping[str, np.ndarray],
    layout: Layout,
    source: str = "checkpoint",
    *,
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The :class:`ClipText` fields that fit the weights of ``layout``; the head count is ``num_heads``, else
    ``hf_config``'s, else width // 64."""
    prefix = layout.prefix
    hf_config = dict(hf_config or {})
    if layout.name == "openai":
        tower = prefix
        tok, pos, fc1, proj = "token_embedding.weight", "positional_embedding", "mlp.c_fc.weight", "text_projection"
        blk = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    else:
        tower = (
            prefix + "text_model." if prefix + "text_model.embeddings.token_embedding.weight" in state_dict else prefix
        )
        tok, pos, fc1 = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "mlp.fc1.weight"
        proj = None
        blk = re.compile(re.escape(tower) + r"encoder\.layers\.(\d+)\.")
    missing = [tower + k for k in (tok, pos) if tower + k not in state_dict]
    if missing:
        raise ConversionError(f"{source}: cannot size the CLIP text tower, missing key(s) {missing}")
    vocab, width = np.shape(state_dict[tower + tok])
    depth = block_count(state_dict, blk, source, "CLIP text")
    hidden = next((np.shape(v)[0] for k, v in state_dict.items() if blk.match(k) and k.endswith(fc1)), None)
    if hidden is None:
        raise ConversionError(f"{source}: no MLP weight ({fc1}) found in the CLIP text blocks")
    if layout.name == "openai":
        proj_dim = np.shape(state_dict[prefix + proj])[1] if prefix + proj in state_dict else None
    else:
        key = prefix + "text_projection.weight"
        proj_dim = np.shape(state_dict[key])[0] if key in state_dict else None
    if "hidden_size" in hf_config and int(hf_config["hidden_size"]) != int(width):
        raise ConversionError(
            f"{source}: config.json hidden_size={hf_config['hidden_size']} but the text weights have width {width}; "
            "it describes another model (its head count would be wrong)"
        )
    heads = infer_num_heads(width, num_heads, hf_config, source)
    act = hf_config.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ConversionError(f"{source}: config.json hidden_act={act!r}; ClipText implements QuickGELU only")
    return dict(
        vocab_size=int(vocab),
        width=int(width),
        depth=depth,
        num_heads=heads,
        context_length=int(np.shape(state_dict[tower + pos])[0]),
        proj_dim=None if proj_dim is None else int(proj_dim),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
        mlp_ratio=float(hidden / width),
    )


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``ClipText(**config)`` (nothing is allocated)."""
    return param_shapes(ClipText(**config), jax.ShapeDtypeStruct((1, 2), jnp.int32))


CLIP = Family(
    name="clip",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: rules(layout.prefix, num_heads=config["num_heads"], layout=layout.name),
    expected=lambda layout, config: expected_params(config),
    ignore=lambda layout: ignore_patterns(layout.prefix, layout.name),
    owns=under_prefix(r"transformer\.resblocks\.\d+\.adapter\."),  # DETRIS's text adapters: not CLIP weights
    hf_model_type="clip",
    hf_section="text_config",
)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    source: str = "checkpoint",
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """CLIP weights in any supported layout -> (ClipText params, meta).

    Keys outside the detected prefix (the rest of a DETRIS model) and DETRIS's ``resblocks.{i}.adapter.*`` are
    skipped and counted in ``meta["skipped"]``.
    """
    return convert_family(CLIP, state_dict, source, num_heads=num_heads, hf_config=hf_config)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str, num_heads: int | None = None) -> tuple[dict, dict]:
    """Reads a CLIP checkpoint (OpenAI .pt / TorchScript, HF folder / .safetensors / .bin, DETRIS .pth) ->
    (params, meta); ``meta["config"]`` holds the :class:`~wimfris_jax.backbones.ClipText` fields and
    ``meta["source_dtypes"]`` counts the converted tensors by their stored dtype (OpenAI's archives: float16)."""
    return port(CLIP, src, num_heads=num_heads)
