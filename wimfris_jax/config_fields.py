"""Reading a config group's fields, for the builders and checks below the config files: a preset expanded
(:func:`expand_preset`) and a switch checked against its choices (:func:`choice`, one-line :class:`ConfigError`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from wimfris_jax.errors import ConfigError


def expand_preset(group: Any, presets: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A config group's module fields: its ``preset`` (if any) expanded by ``presets(name)``, then the group's
    explicit fields on top (``vision=dict(preset="b14_reg4", pos_grid=16)``)."""
    fields = dict(group)
    preset = fields.pop("preset", None)
    return {**presets(preset), **fields} if preset is not None else fields


def choice(group: Any, key: str, default: str, choices: Sequence[str], where: str = "", section: str = "model") -> str:
    """``group[key]`` (``default`` when absent), one of ``choices``; else a ConfigError naming
    ``config.<section>.<where>.<key>`` and the sorted choices (a model's switch, e.g. ``fusion`` or ``level.mixer``;
    a training one, ``section="train"``)."""
    value = group.get(key, default)
    if value not in choices:
        name = f"{where}.{key}" if where else key
        raise ConfigError(f"config.{section}.{name}={value!r}: choose one of {sorted(choices)}")
    return value


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
