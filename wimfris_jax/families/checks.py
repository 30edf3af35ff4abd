"""The structural part of config validation (:mod:`wimfris_jax.config_check`), read off a built model: the helpers
each family's ``check`` (its :class:`~wimfris_jax.families.Family` row) is written with. A check takes ``config.model``
and the module the family's builder made of it (so presets are expanded exactly as the builder expands them, nothing
is initialised) and returns problems, one line each: what crosses config groups (which widths a heads count splits,
the ViT patch vs the image size, the stages of a hierarchical backbone), each a rule the model would otherwise break
on at its first call (a reshape, a ValueError in a module, a silently cropped image) -- after the workdir was made.

:func:`heads_problems` and :func:`word_len_problems` run for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from wimfris_jax.config_fields import choice, is_int
from wimfris_jax.errors import ConfigError

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


def divides(key: str, heads: Any, widths: Sequence[int], what: str) -> list[str]:
    """``config.model.<key>`` (heads) must divide each of ``widths`` (``what`` names them)."""
    bad = [w for w in widths if is_int(heads) and heads > 0 and w % heads]
    if not bad:
        return []
    if len(widths) == 1:
        return [f"config.model.{key}={heads}: must divide {what}={widths[0]}"]
    tail = "" if len(bad) == len(widths) else f" (not {bad})"
    return [f"config.model.{key}={heads}: must divide each of {what} {list(widths)}{tail}"]


def choice_problems(group: Mapping[str, Any], key: str, default: str, choices: Sequence[str], where: str) -> list[str]:
    try:
        choice(group, key, default, choices, where)
    except ConfigError as e:
        return [str(e)]
    return []


def stage_problems(key: str, values: Sequence[Any], depths: Sequence[int]) -> list[str]:
    if len(values) != len(depths):
        return [f"config.model.vision.{key}={tuple(values)}: needs one entry per stage of vision.depths={depths}"]
    return []
