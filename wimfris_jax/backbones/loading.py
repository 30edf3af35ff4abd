"""A converted backbone on its own: ``load_backbone(path)`` -> a ready module and its variables.

    python -m port_weights swin swin_base_patch4_window12_384_22k.pth swin_b.msgpack
    >>> from wimfris_jax.backbones import load_backbone
    >>> swin, variables = load_backbone("swin_b.msgpack")
    >>> out = swin.apply(variables, images)            # images (B, H, W, 3), ImageNet-normalised
    >>> out["hidden_states"][1:]                       # the four stage maps (B, h_i, w_i, C_i)

The file's ``meta`` (written by ``python -m port_weights``) names the converter (``meta["family"]``) and the
module's fields (``meta["config"]``); every backbone answers in the one output convention of
:mod:`wimfris_jax.backbones`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from wimfris_jax.backbones.bert import Bert
from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2
from wimfris_jax.backbones.swin import Swin
from wimfris_jax.backbones.vmamba import VMamba
from wimfris_jax.io import ParamsFileError, load_params

BACKBONES: Mapping[str, type[nn.Module]] = {
    "bert": Bert,
    "clip": ClipText,
    "dinov2": DinoV2,
    "swin": Swin,
    "vmamba": VMamba,
}


def _field(value: Any) -> Any:
    """JSON lists back to the tuples a frozen flax dataclass needs (nested too)."""
    return tuple(_field(v) for v in value) if isinstance(value, list) else value


def load_backbone(path: str | os.PathLike, **fields: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(module, {"params": ...})`` of a backbone converted by ``python -m port_weights`` (bert, clip, dinov2, swin,
    vmamba). ``fields`` override or add module fields (``dtype``, ``attention``, ``remat_mode``, ...).

    Raises FileNotFoundError / ParamsFileError naming the file: missing, not a converted file, or converted by a
    converter that does not write a backbone (detris: :func:`wimfris_jax.load_model`; mamba: a single block).
    """
    params, meta = load_params(path)
    family, config = meta.get("family"), meta.get("config")
    if family not in BACKBONES or not isinstance(config, dict):
        raise ParamsFileError(
            f"{os.fspath(path)}: written by the {family!r} converter, not a backbone ({sorted(BACKBONES)}); "
            "a converted DETRIS checkpoint loads with wimfris_jax.load_model"
        )
    cls = BACKBONES[family]
    unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_backbone: {cls.__name__} has no field(s) {unknown}")
    module = cls(**{**{k: _field(v) for k, v in config.items()}, **fields})
    return module, {"params": params}
