"""transformers ``MambaMixer`` (and mamba_ssm ``Mamba``) weights -> :class:`wimfris_jax.ssm.Mamba` params.

Source names (one mixer; inside ``MambaModel`` / ``MambaForCausalLM`` they sit under
``[backbone.]layers.{i}.mixer.``): ``in_proj.weight`` (2 d_inner, d_model) [+ ``.bias``], ``conv1d.weight``
(d_inner, 1, d_conv) [+ ``.bias``], ``x_proj.weight`` (dt_rank + 2N, d_inner), ``dt_proj.weight`` (d_inner,
dt_rank), ``dt_proj.bias``, ``A_log`` (d_inner, N), ``D`` (d_inner,), ``out_proj.weight`` [+ ``.bias``].
Linear weights are transposed, the depthwise conv goes (O, 1, k) -> (k, 1, O); ``A_log`` and ``D`` are copied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import ConversionError, Rule, conv1d, linear, path_prefix
from port_weights.protocol import Family, Layout, convert_family, everything, param_shapes, port
from wimfris_jax.ssm import Mamba

# Parts of a MambaModel / MambaForCausalLM that are not mixers (no counterpart in the block).
NON_MIXER = [
    r"(.*\.)?embeddings?\.weight",
    r"(.*\.)?norm_f\.weight",
    r"(.*\.)?lm_head\.weight",
    r"(.*\.)?layers\.\d+\.norm\.weight",
]
# "<prefix>layers.<i>.mixer.": prefix "backbone." (transformers, mamba_ssm), "" or e.g. "module.backbone.".
_LAYER = re.compile(r"(.*?)layers\.(\d+)\.mixer\.")


def mixer_rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """Rules mapping the mixer keys ``{src_prefix}in_proj.weight``, ... onto Mamba params under ``dst_prefix``.

    Args:
      src_prefix: literal prefix of the mixer's keys, e.g. ``"backbone.layers.3.mixer."`` ("" for a bare
        ``MambaMixer`` state dict).
      dst_prefix: '/'-path of the :class:`~wimfris_jax.ssm.Mamba` module inside the Flax params, e.g.
        ``"text/layers_3/mta/mamba"`` ("" when the block is the root).
    """
    s = re.escape(src_prefix)
    d = path_prefix(dst_prefix)
    return [
        Rule(rf"{s}(in_proj|x_proj|out_proj|dt_proj)\.weight", rf"{d}\1/kernel", linear),
        Rule(rf"{s}(in_proj|out_proj|dt_proj)\.bias", rf"{d}\1/bias"),
        Rule(rf"{s}conv1d\.weight", f"{d}conv1d/kernel", conv1d),
        Rule(rf"{s}conv1d\.bias", f"{d}conv1d/bias"),
        Rule(rf"{s}A_log", f"{d}A_log"),
        Rule(rf"{s}D", f"{d}D"),
    ]


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The layout: "model" (a MambaModel / MambaForCausalLM; the prefix of ``layers.{i}.mixer.`` and the layer
    indices) or "mixer" (a bare mixer state dict)."""
    found = {(m.group(1), int(m.group(2))) for k in state_dict if (m := _LAYER.match(k))}
    prefixes = sorted({p for p, _ in found})
    if len(prefixes) > 1:
        raise ConversionError(f"{source}: mixer keys under several prefixes {prefixes}; convert them one by one")
    if not found:
        return Layout("mixer")
    return Layout("model", prefixes[0], tuple(sorted(i for _, i in found)))


def _mixer_prefix(layout: Layout, i: int) -> str:
    return f"{layout.prefix}layers.{i}.mixer."


def infer_config(state_dict: Mapping[str, np.ndarray], layout: Layout, source: str = "checkpoint") -> dict:
    """The :class:`~wimfris_jax.ssm.Mamba` constructor arguments that fit the (first) mixer's weights."""
    prefix = _mixer_prefix(layout, layout.layers[0]) if layout.layers else ""
    need = ["in_proj.weight", "conv1d.weight", "dt_proj.weight", "A_log"]
    missing = [prefix + k for k in need if prefix + k not in state_dict]
    if missing:
        raise ConversionError(f"{source}: cannot size the Mamba block, missing key(s) {missing}")
    two_inner, d_model = np.shape(state_dict[prefix + "in_proj.weight"])
    d_inner = two_inner // 2
    if d_inner % d_model or two_inner % 2:
        raise ConversionError(
            f"{source}: {prefix}in_proj.weight has shape {(two_inner, d_model)}; the block needs "
            "(2 * expand * d_model, d_model) with an integer expand"
        )
    d_state = int(np.shape(state_dict[prefix + "A_log"])[-1])
    dt_rank = int(np.shape(state_dict[prefix + "dt_proj.weight"])[-1])
    return {
        "d_model": int(d_model),
        "d_state": d_state,
        "d_conv": int(np.shape(state_dict[prefix + "conv1d.weight"])[-1]),
        "expand": int(d_inner // d_model),
        "dt_rank": "auto" if dt_rank == math.ceil(d_model / 16) else dt_rank,
        "conv_bias": prefix + "conv1d.bias" in state_dict,
        "bias": prefix + "in_proj.bias" in state_dict,
    }


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``Mamba(**config)`` (no arrays are allocated)."""
    return param_shapes(Mamba(**config), jax.ShapeDtypeStruct((1, 2, config["d_model"]), jnp.float32))


def _expected(layout: Layout, config: Mapping[str, Any]) -> dict:
    one = expected_params(config)
    return {f"layers_{i}": one for i in layout.layers} if layout.layers else one


def _rules(layout: Layout, config: Mapping[str, Any]) -> list[Rule]:
    if not layout.layers:
        return mixer_rules()
    return [r for i in layout.layers for r in mixer_rules(_mixer_prefix(layout, i), f"layers_{i}")]


MAMBA = Family(
    name="mamba",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=_rules,
    expected=_expected,
    ignore=lambda layout: NON_MIXER if layout.layers else (),
    owns=everything,  # a whole model's non-mixer keys are listed in ignore (or reported)
    meta=lambda layout, config: {"layers": list(layout.layers) or None},
)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> tuple[dict, dict]:
    """A bare mixer state dict -> (Mamba params, meta); a MambaModel / MambaForCausalLM one -> params
    ``{"layers_{i}": <Mamba params>}`` for every mixer, its norms, embeddings and head listed in ``meta``
    as dropped. All layers must share one configuration."""
    return convert_family(MAMBA, state_dict, source)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str) -> tuple[dict, dict]:
    """Reads a MambaMixer / MambaModel / MambaForCausalLM checkpoint (file or HF folder) -> (params, meta).

    ``meta["config"]`` holds the :class:`~wimfris_jax.ssm.Mamba` arguments that fit the weights;
    ``meta["source_dtypes"]`` counts the converted tensors by their stored dtype.
    """
    return port(MAMBA, src)
