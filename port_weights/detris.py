"""DETRIS checkpoint -> Flax: the whole DETRIS model (``python -m port_weights detris SRC OUT``) and rule builders for
its parts.

DETRIS (jiaqihuang01/DETRIS) names, listed in tests/data/detris_b_state_dict_keys.txt: ``txt_backbone.*`` (OpenAI
CLIP text tower; D-MoC text adapters under ``transformer.resblocks.{i}.adapter.*``), ``dinov2.*`` (torch-hub DINOv2;
Dense Aligners under ``blocks.{i}.adapter.*``), ``neck.*``, ``decoder.layers.{i}.{norm1,norm2,norm3,self_attn_norm,
cross_attn_norm}``, ``decoder.layers.{i}.{self_attn,multihead_attn}`` (fused ``in_proj_weight``/``in_proj_bias`` +
``out_proj``), ``decoder.layers.{i}.ffn.{0,3,4}``, ``decoder.norm``, ``proj.vis.{1,3}.{0 (conv), 1 (BatchNorm)}``,
``proj.vis.4`` (1x1 conv), ``proj.txt``.

Targets carry the variable collection as their first component (``params/...`` and, for BatchNorm running
statistics, ``batch_stats/...``), so one ``convert(state_dict, rules, expected=<full variables>)`` call fills both
collections. ``num_batches_tracked`` is dropped: list :data:`IGNORE` in ``convert``."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from port_weights import clip, dinov2
from port_weights.checkpoint import load_torch_checkpoint, strip_prefix
from port_weights.common import (
    ConversionError,
    Rule,
    conv1d,
    conv2d,
    conv_transpose2d,
    heads_out,
    linear,
    split_in_proj,
)
from port_weights.protocol import Family, Layout, convert_family, everything
from wimfris_jax.backbones.dinov2 import dinov2_config
from wimfris_jax.checkpoints import expected_variables
from wimfris_jax.config import resolve_config
from wimfris_jax.model import build_model

# BatchNorm step counters: PyTorch bookkeeping with no Flax counterpart (momentum is fixed).
IGNORE = [r"(module\.)?(.*\.)?num_batches_tracked"]

_LN = r"(norm1|norm2|norm3|self_attn_norm|cross_attn_norm)"


def decoder_rules(src: str = "decoder.", dst: str = "decoder", num_heads: int = 8) -> list[Rule]:
    """Rules mapping DETRIS ``{src}layers.{i}.*`` / ``{src}norm.*`` onto :class:`Decoder` params under ``dst``.

    Args:
      src: prefix of the decoder's keys in the state dict (after stripping ``module.``).
      dst: '/'-path of the Decoder inside the Flax variables (without the collection).
      num_heads: attention heads, needed to split the fused in-projection per head.
    """
    s, d = re.escape(src), f"params/{dst}"
    lay = rf"{s}layers\.(\d+)\."
    attn = lay + r"(self_attn|multihead_attn)\."
    rules = mha_rules(attn, rf"{dst}/layers_\1/\2", num_heads)
    rules += _dense(lay + r"ffn\.(0|4)\.", rf"{dst}/layers_\1/ffn_\2")
    return rules + [
        Rule(lay + r"ffn\.3\.weight", rf"{d}/layers_\1/ffn_3/scale"),
        Rule(lay + r"ffn\.3\.bias", rf"{d}/layers_\1/ffn_3/bias"),
        Rule(lay + _LN + r"\.weight", rf"{d}/layers_\1/\2/scale"),
        Rule(lay + _LN + r"\.bias", rf"{d}/layers_\1/\2/bias"),
        Rule(rf"{s}norm\.weight", f"{d}/norm/scale"),
        Rule(rf"{s}norm\.bias", f"{d}/norm/bias"),
    ]


def projector_rules(src: str = "proj.", dst: str = "projector") -> list[Rule]:
    """Rules mapping DETRIS ``{src}vis.*`` / ``{src}txt.*`` onto :class:`Projector` variables under ``dst``.

    BatchNorm ``running_mean``/``running_var`` go to ``batch_stats/{dst}/vis_{1,3}_1/{mean,var}``.
    """
    s, p, b = re.escape(src), f"params/{dst}", f"batch_stats/{dst}"
    return [
        Rule(rf"{s}vis\.(1|3)\.0\.weight", rf"{p}/vis_\1_0/kernel", conv2d),
        Rule(rf"{s}vis\.(1|3)\.1\.weight", rf"{p}/vis_\1_1/scale"),
        Rule(rf"{s}vis\.(1|3)\.1\.bias", rf"{p}/vis_\1_1/bias"),
        Rule(rf"{s}vis\.(1|3)\.1\.running_mean", rf"{b}/vis_\1_1/mean"),
        Rule(rf"{s}vis\.(1|3)\.1\.running_var", rf"{b}/vis_\1_1/var"),
        Rule(rf"{s}vis\.4\.weight", f"{p}/vis_4/kernel", conv2d),
        Rule(rf"{s}vis\.4\.bias", f"{p}/vis_4/bias"),
        *_dense(rf"{s}txt\.", f"{dst}/txt"),
    ]


# ------------------------------------------------------------------------------------- adapters, neck
def batchnorm_rules(src: str, dst: str) -> list[Rule]:
    """PyTorch BatchNorm ``{src}{weight,bias,running_mean,running_var}`` (``src`` a regex) -> flax
    ``params/{dst}/{scale,bias}`` and ``batch_stats/{dst}/{mean,var}`` (``dst`` may reference src's groups)."""
    return [
        Rule(src + r"weight", f"params/{dst}/scale"),
        Rule(src + r"bias", f"params/{dst}/bias"),
        Rule(src + r"running_mean", f"batch_stats/{dst}/mean"),
        Rule(src + r"running_var", f"batch_stats/{dst}/var"),
    ]


def mha_rules(src: str, dst: str, num_heads: int) -> list[Rule]:
    """``nn.MultiheadAttention`` at ``src`` (a regex ending in '.') -> flax MHA at ``params/{dst}``."""
    return [
        Rule(src + r"in_proj_(weight|bias)", f"params/{dst}", split_in_proj(num_heads)),
        Rule(src + r"out_proj\.weight", f"params/{dst}/out/kernel", heads_out(num_heads)),
        Rule(src + r"out_proj\.bias", f"params/{dst}/out/bias"),
    ]


def _dense(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"weight", f"params/{dst}/kernel", linear), Rule(src + r"bias", f"params/{dst}/bias")]


def _adapter_common(src: str, dst: str, conv: Callable) -> list[Rule]:
    """D_fc1/D_fc2 and the D-MoC branches; ``src`` has one group (the block index) that ``dst`` references as \\1."""
    rules = _dense(src + r"D_fc1\.", rf"{dst}/D_fc1") + _dense(src + r"D_fc2\.", rf"{dst}/D_fc2")
    for s, d in ((r"dense_branch1\.", "dense_branch1"), (r"dense_branch([23])\.([01])\.", r"dense_branch\2_\3")):
        rules += [
            Rule(src + s + r"conv\.weight", rf"params/{dst}/{d}/conv/kernel", conv),
            Rule(src + s + r"conv\.bias", rf"params/{dst}/{d}/conv/bias"),
        ]
        rules += batchnorm_rules(src + s + r"bn\.", rf"{dst}/{d}/bn")
    return rules


def dense_aligner_rules(
    src: str = r"dinov2\.blocks\.(\d+)\.adapter\.", dst: str = r"vision_adapter_\1", num_heads: int = 8
) -> list[Rule]:
    """Dense Aligners (:class:`wimfris_jax.families.wimfris.adapters.detris.DenseAligner`): ``src`` is a regex with
    one group (the
    block index), ``dst`` the adapter's path template (e.g. ``vision_adapter_\\1``)."""
    rules = _adapter_common(src, dst, conv2d)
    rules += mha_rules(src + r"cross\.multihead_attn\.", rf"{dst}/cross/multihead_attn", num_heads)
    for name in ("image_proj", "text_proj", "back_proj"):
        rules += _dense(src + rf"cross\.{name}\.", rf"{dst}/cross/{name}")
    return rules


def text_adapter_rules(
    src: str = r"txt_backbone\.transformer\.resblocks\.(\d+)\.adapter\.", dst: str = r"text_adapter_\1"
) -> list[Rule]:
    """D-MoC text adapters (:class:`wimfris_jax.families.wimfris.adapters.detris.DMoC`); ``src``/``dst`` as
    above."""
    return _adapter_common(src, dst, conv1d)


def neck_rules(src: str = "neck.", dst: str = "neck", num_heads: int = 8) -> list[Rule]:
    """The DETRIS neck (:class:`wimfris_jax.families.wimfris.neck.detris.DetrisNeck`) at ``src`` (a plain prefix) ->
    ``dst``."""
    s = re.escape(src)
    rules = []
    for k in (3, 4, 5):
        rules += mha_rules(rf"{s}fusion{k}\.multihead_attn\.", f"{dst}/fusion{k}/multihead_attn", num_heads)
    rules += _dense(rf"{s}txt_proj\.", f"{dst}/txt_proj")
    rules.append(Rule(rf"{s}f5_proj\.0\.weight", f"params/{dst}/f5_proj_0/kernel", conv_transpose2d))
    rules.append(Rule(rf"{s}(f3_proj|f4_proj|aggr)\.0\.weight", rf"params/{dst}/\1_0/kernel", conv2d))
    rules.append(Rule(rf"{s}coordconv\.1\.0\.weight", f"params/{dst}/coordconv_1_0/kernel", conv2d))
    rules.append(Rule(rf"{s}coordconv\.0\.conv1\.0\.weight", f"params/{dst}/coordconv_0_conv1_0/kernel", conv2d))
    rules += batchnorm_rules(rf"{s}(f3_proj|f4_proj|f5_proj|aggr)\.1\.", rf"{dst}/\1_1")
    rules += batchnorm_rules(rf"{s}coordconv\.0\.conv1\.1\.", f"{dst}/coordconv_0_conv1_1")
    rules += batchnorm_rules(rf"{s}coordconv\.1\.1\.", f"{dst}/coordconv_1_1")
    return rules


# ------------------------------------------------------------------------------------------ whole model
CONFIGS = {768: "detris_b", 1024: "detris_l"}  # DINOv2 width -> config module under configs/


def model_rules(model_config: Any) -> list[Rule]:
    """Every rule of a DETRIS checkpoint for the model ``build_model(model_config)`` (``config.model`` of
    configs/detris_*.py): CLIP text tower -> ``text_encoder``, DINOv2 -> ``image_encoder``, text adapters ->
    ``text_adapter_<i>``, Dense Aligners -> ``dense_aligner_<i>``, ``neck``, ``decoder``, ``projector``."""
    vision = dict(model_config.vision)
    preset = vision.pop("preset", None)
    vision = {**(dinov2_config(preset) if preset else {}), **vision}
    heads = int(model_config.decoder.num_heads)
    return (
        clip.rules("txt_backbone.", "params/text_encoder", num_heads=int(model_config.text.num_heads))
        + text_adapter_rules(dst=r"text_adapter_\1")
        + dinov2.rules("dinov2.", "params/image_encoder", num_heads=int(vision["num_heads"]))
        + dense_aligner_rules(dst=r"dense_aligner_\1", num_heads=int(model_config.vision_adapter.num_heads))
        + neck_rules(num_heads=int(model_config.neck.get("num_heads", 8)))
        + decoder_rules(num_heads=heads)
        + projector_rules()
    )


def model_ignore() -> list[str]:
    """Source keys dropped on purpose: BatchNorm step counters, DINOv2's mask token (masked-image pretraining
    only), CLIP's logit scale and vision tower."""
    return IGNORE + dinov2.ignore_patterns("dinov2.") + clip.ignore_patterns("txt_backbone.")


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """DETRIS has one layout, the official names (DDP's ``module.`` stripped by :func:`convert_state_dict`)."""
    return Layout("official")


def infer_config(
    state_dict: Mapping[str, np.ndarray], layout: Layout, source: str = "checkpoint", *, config: str | Any | None = None
) -> dict[str, Any]:
    """``{"name", "model"}``: the config's name and its ``model`` section; ``config`` as in :func:`from_checkpoint`,
    by default detris_b or detris_l by the DINOv2 width."""
    if config is None:
        width = int(dinov2.infer_config(state_dict, dinov2.detect_layout(state_dict, source), source)["width"])
        if width not in CONFIGS:
            raise ConversionError(f"{source}: DINOv2 width {width}; DETRIS checkpoints have {sorted(CONFIGS)}")
        config = CONFIGS[width]
    cfg, name = resolve_config(config)
    return {"name": name, "model": cfg.model}


def _meta(layout: Layout, config: Mapping[str, Any]) -> dict[str, Any]:
    vision = dict(config["model"].vision)
    return {
        "collections": ["params", "batch_stats"],
        "config": config["name"],  # the model section is not JSON: the config is named
        "interpolation": vision.get("interpolation", "torchhub"),
        "vision": vision,
        "text": dict(config["model"].text),
    }


DETRIS = Family(
    name="detris",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: model_rules(config["model"]),
    expected=lambda layout, config: expected_variables(build_model(config["model"]), config["model"]),
    ignore=lambda layout: model_ignore(),
    owns=everything,
    meta=_meta,
)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "checkpoint", config: str | Any | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An official-layout DETRIS state dict (keys with or without DDP's ``module.``) -> ``(variables, meta)`` of
    ``build_model(config.model)``. Every unmapped, missing or mis-shaped key is reported in one ConversionError."""
    return convert_family(DETRIS, strip_prefix(state_dict, "module."), source, config=config)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str, config: str | Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads an official DETRIS checkpoint -> ``(variables, meta)``.

    ``src``: a ``.pth`` training checkpoint (``{"epoch", "state_dict", ...}``, keys with or without
    ``module.``) or a bare state dict, read with ``weights_only=True``. ``config``: configs/detris_b.py or
    detris_l.py by default, chosen by the DINOv2 width (768 / 1024); or a config name, path or ConfigDict.

    ``variables`` is the whole ``{"params": ..., "batch_stats": ...}`` dict; ``python -m port_weights`` stores it
    as the file's params entry, and ``meta["collections"]`` tells :func:`wimfris_jax.load_model` so.
    ``meta["source_dtypes"]`` counts the converted tensors by their stored dtype.
    """
    return convert_state_dict(load_torch_checkpoint(src), src, config)
