"""The structural part of config validation (:mod:`wimfris_jax.config_check`), read off a built model: each
function takes ``config.model`` and the module :func:`wimfris_jax.model.build_model` made of it (so presets are
expanded exactly as the builder expands them, nothing is initialised) and returns problems, one line each.

:func:`heads_problems` walks any module tree; :data:`FAMILY_CHECKS` holds, per family of
:data:`wimfris_jax.model.FAMILIES` (tests/test_config_validation.py checks that none is missing), what crosses
config groups: which widths a heads count splits, the ViT patch vs the image size, the stages of a hierarchical
backbone. Each rule is one the model would otherwise break on at its first call (a reshape, a ValueError in a
module, a silently cropped image) -- after the workdir was made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from wimfris_jax.backbones.dinov2 import INTERPOLATIONS
from wimfris_jax.config_fields import choice, is_int
from wimfris_jax.errors import ConfigError
from wimfris_jax.neck.wmf import WindowMambaFuser
from wimfris_jax.tfanet.ablations import TransformerCrossAttention
from wimfris_jax.tfanet.mlam import MLAM
from wimfris_jax.vipa.fusion import default_fusion_heads

WIDTHS = ("dim", "d_model", "width")  # the width a group's num_heads splits: the first of these it holds
# built-module attribute -> config.model group, where the names differ
GROUPS = {"text_encoder": "text", "image_encoder": "vision", "text_kwargs": "text_adapter",
          "vision_kwargs": "vision_adapter"}  # fmt: skip


def _fields(node: Any) -> dict[str, Any]:
    if isinstance(node, nn.Module):
        return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name not in ("parent", "name")}
    return dict(node) if isinstance(node, Mapping) else {}


def heads_problems(node: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Every module or keyword group under ``node`` whose ``num_heads`` does not divide its width (:data:`WIDTHS`)."""
    fields, problems = _fields(node), []
    heads = fields.get("num_heads")
    width = next((k for k in WIDTHS if is_int(fields.get(k))), None)
    if is_int(heads) and heads > 0 and width and fields[width] % heads:
        key = ".".join([GROUPS.get(path[0], path[0]), *path[1:]]) if path else "model"
        problems.append(f"config.model.{key}.num_heads={heads}: must divide {key}.{width}={fields[width]}")
    for name, value in fields.items():
        if isinstance(value, (nn.Module, Mapping)):
            problems += heads_problems(value, (*path, name))
    return problems


def word_len_problems(model_config: Any, module: nn.Module) -> list[str]:
    """``word_len`` longer than the text tower's position table (ClipText ``context_length``, Bert
    ``max_positions``)."""
    text = getattr(module, "text_encoder", None)
    key = next((k for k in ("context_length", "max_positions") if is_int(getattr(text, k, None))), None)
    n = model_config.get("word_len")
    if key and is_int(n) and n > getattr(text, key):
        return [f"config.model.word_len={n}: must be at most the text tower's text.{key}={getattr(text, key)}"]
    return []


def _divides(key: str, heads: Any, widths: Sequence[int], what: str) -> list[str]:
    """``config.model.<key>`` (heads) must divide each of ``widths`` (``what`` names them)."""
    bad = [w for w in widths if is_int(heads) and heads > 0 and w % heads]
    if not bad:
        return []
    if len(widths) == 1:
        return [f"config.model.{key}={heads}: must divide {what}={widths[0]}"]
    tail = "" if len(bad) == len(widths) else f" (not {bad})"
    return [f"config.model.{key}={heads}: must divide each of {what} {list(widths)}{tail}"]


def _choice(group: Mapping[str, Any], key: str, default: str, choices: Sequence[str], where: str) -> list[str]:
    try:
        choice(group, key, default, choices, where)
    except ConfigError as e:
        return [str(e)]
    return []


def _wimfris(cfg: Any, m: nn.Module) -> list[str]:
    """DINOv2 crops an image whose side is not a multiple of the patch (VALID conv); the WMF gate's heads split the
    neck width; the position-resampling rule (read at the first call)."""
    vit, size = m.image_encoder, int(cfg.image_size)
    problems = []
    if size % vit.patch_size:
        problems.append(
            f"config.model.image_size={size}: must be a multiple of the ViT patch, vision.patch_size={vit.patch_size} "
            f"(the last {size % vit.patch_size} px of each side would be dropped)"
        )
    if getattr(m.neck, "use_wmf", False):
        gate = dict(m.neck.wmf or {}).get("gate_heads", WindowMambaFuser.gate_heads)
        problems += _divides("neck.wmf.gate_heads", gate, [m.neck.dim], "neck.dim")
    return problems + _choice({"interpolation": vit.interpolation}, "interpolation", "", INTERPOLATIONS, "vision")


def _stages(key: str, values: Sequence[Any], depths: Sequence[int]) -> list[str]:
    if len(values) != len(depths):
        return [f"config.model.vision.{key}={tuple(values)}: needs one entry per stage of vision.depths={depths}"]
    return []


def _tfanet(cfg: Any, m: nn.Module) -> list[str]:
    """VMamba stages; the heads of the level's attention split the stage widths (MLAM: its ``dim`` if set) and, for
    the transformer stand-in, the text width too. The image size vs the VMamba stride: the builder's check."""
    vmamba, level = m.image_encoder, dict(m.level or {})
    dims, depths = tuple(vmamba.dims), tuple(vmamba.depths)
    problems = _stages("dims", dims, depths)
    if level.get("attention") == "mlam":
        mlam = dict(level.get("mlam") or {})
        widths, what = ([mlam["dim"]], "level.mlam.dim") if mlam.get("dim") else (dims, "the stage widths vision.dims")
        problems += _divides("level.mlam.num_heads", mlam.get("num_heads", MLAM.num_heads), widths, what)
    elif level.get("attention") == "transformer":
        heads = dict(level.get("transformer") or {}).get("num_heads", TransformerCrossAttention.num_heads)
        problems += _divides("level.transformer.num_heads", heads, [*dims, m.text_encoder.width],
                             "the stage widths vision.dims and the text width")  # fmt: skip
    return problems


def _vipa(cfg: Any, m: nn.Module) -> list[str]:
    """Swin stages: stage i is embed_dim * 2**i wide, split by num_heads[i] and by the fusion's default heads; the
    text cross-attention's ``fusion_heads`` split the BERT width. Swin pads any image size: not refused."""
    swin, depths = m.image_encoder, tuple(m.image_encoder.depths)
    heads = tuple(swin.num_heads) if isinstance(swin.num_heads, (tuple, list)) else (swin.num_heads,) * len(depths)
    problems = _stages("num_heads", heads, depths)
    widths = [swin.embed_dim * 2**i for i in range(len(depths))]
    for i, (h, c) in enumerate(zip(heads, widths) if not problems else ()):
        problems += _divides(f"vision.num_heads[{i}]", h, [c], f"stage {i}'s width vision.embed_dim * 2**{i}")
    unfused = [c for c in widths if c % default_fusion_heads(c)]
    if unfused:
        problems.append(f"config.model.vision.embed_dim={swin.embed_dim}: stage widths {unfused} do not split into "
                        "the fusion's heads (width // 64 of them)")  # fmt: skip
    if "fusion_heads" in cfg:
        problems += _divides("fusion_heads", m.fusion_heads, [m.text_encoder.width], "text.width")
    return problems


FAMILY_CHECKS: dict[str, Callable[[Any, nn.Module], list[str]]] = {
    "wimfris": _wimfris,  # WIMFRIS and DETRIS
    "tfanet": _tfanet,
    "vipa": _vipa,
}
