"""VMamba v2 checkpoints (``vssm_base_0229_ckpt_epoch_237.pth``, ...) -> :class:`wimfris_jax.backbones.VMamba`.

Layout "official" (MzeroMiko/VMamba ``classification/models/vmamba.py``, ``VSSM``; the training checkpoints keep the
weights under ``model``, which :func:`~port_weights.checkpoint.load_torch_checkpoint` unwraps; a common key prefix
such as DDP's ``module.`` is found and kept)::

    patch_embed.{0,5}.{weight,bias}                 -> patch_embed/{conv1,conv2}/{kernel,bias}   (conv, OIHW -> HWIO)
    patch_embed.{2,7}.{weight,bias}                 -> patch_embed/{norm1,norm2}/{scale,bias}
    layers.{i}.blocks.{j}.{norm,norm2}.*            -> layers_{i}/blocks_{j}/{norm,norm2}/*
    layers.{i}.blocks.{j}.op.{in_proj,out_proj}.weight -> .../op/{in_proj,out_proj}/kernel      (transposed)
    layers.{i}.blocks.{j}.op.conv2d.weight          -> .../op/conv2d/kernel (Di, 1, 3, 3) -> (3, 3, 1, Di)
    layers.{i}.blocks.{j}.op.{x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds} -> copied as stored
    layers.{i}.blocks.{j}.op.out_norm.*, mlp.{fc1,fc2}.* -> .../op/out_norm/*, .../mlp/{fc1,fc2}/*
    layers.{i}.downsample.{1,3}.*                   -> layers_{i}/downsample/{conv,norm}/*
    classifier.{norm,head}.*                        -> dropped (ImageNet head), listed in meta["dropped"]

The repository's one-file ``vmamba.py`` (its SS2D with grouped ``Linear`` projections) saves two of these
differently, and its load hook accepts either; so does this converter (the same parameters from both)::

    layers.{i}.blocks.{j}.op.x_proj.weight   (K (R + 2N), Di)  -> .../op/x_proj_weight   (K, R + 2N, Di)
    layers.{i}.blocks.{j}.op.dt_projs.weight (K Di, R)         -> .../op/dt_projs_weight (K, Di, R)

with K = 4 scan directions.

Linear weights saved from the channels-first variant (``Linear2d``, norm "ln2d") may be (out, in, 1, 1); they are
squeezed. The sizes come from the shapes (depths, dims, d_state, ssm_ratio, dt_rank, conv size and bias, MLP
ratio); checkpoints of other variants (a z gate: ``in_proj`` of 2 Di rows; patch embed v1; downsample v1/v2) are
refused with the reason, since :class:`VMamba` implements v05_noz / patch embed v2 / downsample v3 only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import ConversionError, Rule, conv2d, path_prefix
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
from wimfris_jax.backbones.vmamba import VMamba

SCANS = 4  # SS2D's scan directions (K)
HEAD = [r"classifier\.(norm|head)\.(weight|bias)"]


def linear(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) or Linear2d's (out, in, 1, 1) -> flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x.reshape(x.shape[:2]).T)


def per_direction(x: np.ndarray) -> np.ndarray:
    """A one-file ``vmamba.py`` grouped projection (K * rows, cols) -> the stacked (K, rows, cols), K = 4."""
    return np.ascontiguousarray(x.reshape(SCANS, -1, x.shape[-1]))


def rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rules mapping the official VSSM keys under ``src_prefix`` onto :class:`VMamba` params under ``dst_prefix``."""
    s, d = re.escape(src_prefix), path_prefix(dst_prefix)
    blk, b = s + r"layers\.(\d+)\.blocks\.(\d+)\.", d + r"layers_\1/blocks_\2/"
    pe = {"0": "conv1", "2": "norm1", "5": "conv2", "7": "norm2"}
    out = []
    for idx, name in pe.items():
        kernel = ("kernel", conv2d) if name.startswith("conv") else ("scale", None)
        out += [
            Rule(s + rf"patch_embed\.{idx}\.weight", f"{d}patch_embed/{name}/{kernel[0]}", kernel[1]),
            Rule(s + rf"patch_embed\.{idx}\.bias", f"{d}patch_embed/{name}/bias"),
        ]
    return out + [
        Rule(blk + r"(norm|norm2)\.weight", b + r"\3/scale"),
        Rule(blk + r"(norm|norm2)\.bias", b + r"\3/bias"),
        Rule(blk + r"op\.out_norm\.weight", b + "op/out_norm/scale"),
        Rule(blk + r"op\.out_norm\.bias", b + "op/out_norm/bias"),
        Rule(blk + r"op\.(in_proj|out_proj)\.weight", b + r"op/\3/kernel", linear),
        Rule(blk + r"op\.(in_proj|out_proj|conv2d)\.bias", b + r"op/\3/bias"),
        Rule(blk + r"op\.conv2d\.weight", b + "op/conv2d/kernel", conv2d),
        Rule(blk + r"op\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)", b + r"op/\3"),
        Rule(blk + r"op\.(x_proj|dt_projs)\.weight", b + r"op/\3_weight", per_direction),
        Rule(blk + r"mlp\.(fc1|fc2)\.weight", b + r"mlp/\3/kernel", linear),
        Rule(blk + r"mlp\.(fc1|fc2)\.bias", b + r"mlp/\3/bias"),
        Rule(s + r"layers\.(\d+)\.downsample\.1\.weight", d + r"layers_\1/downsample/conv/kernel", conv2d),
        Rule(s + r"layers\.(\d+)\.downsample\.1\.bias", d + r"layers_\1/downsample/conv/bias"),
        Rule(s + r"layers\.(\d+)\.downsample\.3\.weight", d + r"layers_\1/downsample/norm/scale"),
        Rule(s + r"layers\.(\d+)\.downsample\.3\.bias", d + r"layers_\1/downsample/norm/bias"),
    ]


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The key prefix of the VMamba weights: the one before ``patch_embed.0.weight``."""
    tail = "patch_embed.0.weight"
    found = [Layout("official", k[: -len(tail)]) for k in state_dict if k.endswith(tail)]
    return only_one(found, source, "VMamba patch embedding(s) ('patch_embed.0.weight')")


def infer_config(state_dict: Mapping[str, Any], layout: Layout, source: str = "checkpoint") -> dict[str, Any]:
    """The :class:`VMamba` fields that fit the weights (see the module docstring for what is refused)."""
    p = layout.prefix
    shape = lambda k: tuple(np.shape(state_dict[p + k])) if p + k in state_dict else None
    if shape("patch_embed.5.weight") is None or shape("patch_embed.7.weight") is None:
        raise ConversionError(f"{source}: no 'patch_embed.5/7' weights: VMamba supports patch embed v2 only")
    n = block_count(state_dict, re.compile(re.escape(p) + r"layers\.(\d+)\."), source, "VMamba stage")
    depths = [block_count(state_dict, re.compile(re.escape(p) + rf"layers\.{i}\.blocks\.(\d+)\."), source,
                          f"VMamba stage {i}") for i in range(n)]  # fmt: skip
    widths = [shape(f"layers.{i}.blocks.0.norm.weight") for i in range(n)]
    if None in widths:
        raise ConversionError(f"{source}: cannot size the stages, missing 'layers.{{i}}.blocks.0.norm.weight' {widths}")
    dims = [w[0] for w in widths]
    for i in range(n - 1):
        down = shape(f"layers.{i}.downsample.1.weight")
        if down is None or down[2:] != (3, 3):
            raise ConversionError(f"{source}: layers.{i}.downsample is not a 3x3 conv (downsample v3): {down}")
    op = "layers.0.blocks.0.op."
    dt_key = op + ("dt_projs_weight" if shape(op + "dt_projs.weight") is None else "dt_projs.weight")
    need = [op + k for k in ("in_proj.weight", "conv2d.weight", "A_logs", "out_norm.weight")] + [dt_key]
    missing = [p + k for k in need + ["layers.0.blocks.0.mlp.fc1.weight"] if shape(k) is None]
    if missing:
        raise ConversionError(f"{source}: cannot size SS2D (forward type v05_noz), missing key(s) {missing}")
    d_inner, d_state = shape(op + "A_logs")[0] // 4, shape(op + "A_logs")[1]
    if shape(op + "in_proj.weight")[0] != d_inner:
        raise ConversionError(
            f"{source}: {p + op}in_proj.weight has {shape(op + 'in_proj.weight')[0]} rows for d_inner {d_inner}: "
            "a z-gated SS2D forward type; VMamba implements v05_noz only"
        )
    rank = shape(dt_key)[-1]
    ratio = d_inner / dims[0]
    return dict(
        depths=tuple(depths),
        dims=tuple(int(c) for c in dims),
        d_state=int(d_state),
        ssm_ratio=float(ratio),
        dt_rank="auto" if rank == math.ceil(dims[0] / 16) else int(rank),
        d_conv=int(shape(op + "conv2d.weight")[-1]),
        conv_bias=shape(op + "conv2d.bias") is not None,
        mlp_ratio=float(shape("layers.0.blocks.0.mlp.fc1.weight")[0] / dims[0]),
        forward_type="v05_noz",
    )


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``VMamba(**config)`` (nothing is allocated)."""
    return param_shapes(VMamba(**config), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


VMAMBA = Family(
    name="vmamba",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: rules(layout.prefix),
    expected=lambda layout, config: expected_params(config),
    ignore=lambda layout: [re.escape(layout.prefix) + h for h in HEAD],
    owns=under_prefix(),
)


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict, dict]:
    """An official VSSM state dict -> (VMamba params, meta); the classifier head is dropped (``meta["dropped"]``)."""
    return convert_family(VMAMBA, state_dict, source)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str) -> tuple[dict, dict]:
    """Reads an official VMamba checkpoint (weights under ``model`` or bare) -> (params, meta);
    ``meta["config"]`` holds the :class:`~wimfris_jax.backbones.VMamba` fields.

    The training code pickles its yacs ``config`` beside the weights; the reader takes it as a plain dict without
    importing yacs (:data:`port_weights.checkpoint.CONFIG_CLASSES`). Any other pickled class is refused, and the
    error then says that only the ``['model']`` state dict is read."""
    try:
        return port(VMAMBA, src)
    except ConversionError as err:
        if "refused as unsafe" not in str(err):
            raise
        hint = (
            "; only the ['model'] state dict (and a yacs config) of a VMamba checkpoint is read: convert a file "
            "holding only that state dict (saved with torch.save from a checkpoint you produced yourself)"
        )
        raise ConversionError(f"{err}{hint}") from err
