"""Config files and overrides: the one place that turns ``--config FILE[:ARG]`` and ``--set KEY=VALUE`` into a
ConfigDict (big_vision's form: a Python file with ``get_config(arg=None)`` returning an ml_collections
ConfigDict; the argument, after a colon, picks a variant such as the dataset: ``configs/wimfris_b.py:refcoco+``).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

from wimfris_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad --set / --config.KEY override or --init argument."""


def apply_overrides(config: Any, items: Sequence[str]) -> Any:
    """Applies ``KEY=VALUE`` overrides (dotted keys into the ConfigDict) in place; returns the config."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "nothing (not a group)"
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i]) or 'config'} holds {known}")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(old, str) and not isinstance(value, str):
            value = raw
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot set {key}={raw!r}: {e}") from e
    return config


def load_config(path: str) -> Any:
    """``get_config(arg)`` of a config file ``FILE`` or ``FILE:ARG`` (the file's repository root is put on sys.path
    so that configs can ``from configs import common``)."""
    file, arg = path, None
    if not os.path.isfile(path) and ":" in os.path.basename(path):
        file, _, arg = path.rpartition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file!r} not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_wimfris_config_{abs(hash(os.path.abspath(file)))}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {file!r} defines no get_config()")
    if arg is None:
        return get_config()
    if not inspect.signature(get_config).parameters:
        raise ConfigError(f"config file {file!r} takes no argument (got {arg!r})")
    try:
        return get_config(arg)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
