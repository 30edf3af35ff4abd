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
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections

from wimfris_jax.config_check import validate
from wimfris_jax.errors import ConfigError, one_line
from wimfris_jax.io import read_json_object

__all__ = ["ConfigError", "apply_overrides", "load_config", "read_run_config", "upgrade_model_config"]


def _validate(config: Any, training: bool = True) -> Any:
    return validate(config, training=training)


def apply_overrides(config: Any, items: Sequence[str]) -> Any:
    """Applies ``KEY=VALUE`` overrides (dotted keys into the ConfigDict) in place and validates the result
    (:mod:`wimfris_jax.config_check`; not when there are none: the config was validated where it came from);
    returns the config."""
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
    return _validate(config) if items else config


def _line(error: BaseException, file: str) -> str:
    """``", line N"`` of the last traceback frame of ``error`` in ``file`` (or of a SyntaxError in it), else ""."""
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        same = os.path.abspath(error.filename) == os.path.abspath(file)
        return f", line {error.lineno}" if same else f" ({error.filename}, line {error.lineno})"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == file]
    return f", line {frames[-1].lineno}" if frames else ""


def load_config(path: str) -> Any:
    """``get_config(arg)`` of a config file ``FILE`` or ``FILE:ARG`` (the file's repository root is put on sys.path
    so that configs can ``from configs import common``), validated (:mod:`wimfris_jax.config_check`).

    A file that cannot be imported (a syntax error, a failing import), defines no ``get_config``, whose
    ``get_config`` fails or returns anything but an ml_collections ConfigDict is a ConfigError naming the file (and
    the line); ``--debug`` shows the traceback."""
    file, arg = path, None
    if not os.path.isfile(path) and ":" in os.path.basename(path):
        file, _, arg = path.rpartition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file!r} not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_wimfris_config_{abs(hash(os.path.abspath(file)))}", file)
    if spec is None:
        raise ConfigError(f"config file {file!r} is not a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's Python: a syntax error, a failing import, ...
        why = f"syntax error: {e.msg}" if isinstance(e, SyntaxError) else f"fails to import: {one_line(e)}"
        raise ConfigError(f"config file {file!r}{_line(e, os.path.abspath(file))}: {why}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {file!r} defines no get_config()")
    if arg is not None and not inspect.signature(get_config).parameters:
        raise ConfigError(f"config file {file!r} takes no argument (got {arg!r})")
    try:
        config = get_config() if arg is None else get_config(arg)
    except ValueError as e:  # configs/common.py: a dataset argument that does not exist
        raise ConfigError(f"{path}: {e}") from e
    except Exception as e:
        call = f"get_config({arg!r})" if arg is not None else "get_config()"
        raise ConfigError(f"config file {file!r}{_line(e, os.path.abspath(file))}: {call} fails: {one_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {file!r}: get_config() returned {type(config).__name__}, not an ml_collections ConfigDict"
        )
    return _validate(config)


def upgrade_model_config(model: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``config.model`` dict in the adapter schema (``text_adapter`` / ``vision_adapter`` with a ``kind``) from
    one written before it (a run's config.json): returns (the new dict, the old keys replaced; empty when it
    was already current). Parameter names did not change, so the run's checkpoints load as they are.

    Old WIMFRIS keys: use_mta, mta_layers, mta_scale, mta {dim, zero_init_up}, use_msa, msa_layers, msa {...};
    old DETRIS keys: adapter_kind="detris" with text_adapter / vision_adapter without a kind."""
    model = dict(model)
    kind = model.pop("adapter_kind", None)
    old = [k for k in ("use_mta", "use_msa", "mta_layers", "msa_layers", "mta_scale", "mta", "msa") if k in model]
    if kind is None and not old:
        return model, []
    if kind == "detris":
        model["text_adapter"] = {"kind": "dmoc", **dict(model["text_adapter"])}
        model["vision_adapter"] = {"kind": "dense_aligner", **dict(model["vision_adapter"])}
        return model, ["adapter_kind", *old]
    use_mta, use_msa = model.pop("use_mta", True), model.pop("use_msa", True)
    model["text_adapter"] = {
        "kind": "mta" if use_mta else "none",
        "layers": tuple(model.pop("mta_layers", ())),
        "scale": model.pop("mta_scale", 0.2),
        **dict(model.pop("mta", {})),
    }
    model["vision_adapter"] = {
        "kind": "msa" if use_msa else "none",
        "layers": tuple(model.pop("msa_layers", ())),
        **dict(model.pop("msa", {})),
    }
    return model, (["adapter_kind"] if kind else []) + old


def read_run_config(path: str) -> ml_collections.ConfigDict:
    """The ``config.json`` a training run wrote, as a ConfigDict; a model config in the schema before
    text_adapter / vision_adapter is upgraded (:func:`upgrade_model_config`, with a warning naming the old keys).
    Its model and data are validated (:mod:`wimfris_jax.config_check`), not its finished training's settings."""
    config = read_json_object(path, ConfigError)
    if isinstance(config.get("model"), dict):
        config["model"], old = upgrade_model_config(config["model"])
        if old:
            warnings.warn(f"{path}: model config upgraded to the adapter schema (old keys {old})", stacklevel=2)
    try:
        return _validate(ml_collections.ConfigDict(config), training=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def resolve_config(spec: Any = None, checkpoint: str | os.PathLike | None = None) -> tuple[Any, str]:
    """The one config resolver: ``(config, name)`` from ``spec``, a config file (``configs/detris_b.py``, with an
    optional ``:arg``), a config name under configs/ (``"detris_b"``) or a ConfigDict (a whole config or its ``model``
    alone; its model and data validated), or, without ``spec``, from the ``config.json`` of the run that wrote
    ``checkpoint`` (the run directory, or the run of a step folder ``<run>/checkpoints/<N>``; old schemas upgraded).
    Every other way in (``wimfris eval / predict``, ``load_model``, the DETRIS converter) resolves through here."""
    if spec is None:
        if checkpoint is None:
            raise ConfigError("no config: pass --config (a config file) or a checkpoint with a config.json beside it")
        path = os.fspath(checkpoint)
        if not os.path.exists(path):
            raise ConfigError(f"no such checkpoint: {path}")
        start = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        for d in (start, os.path.dirname(start), os.path.dirname(os.path.dirname(start))):
            if os.path.isfile(os.path.join(d, "config.json")):
                return read_run_config(os.path.join(d, "config.json")), os.path.join(d, "config.json")
        raise ConfigError(f"no config.json found beside {path}; pass --config")
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.split(":")[0].endswith(".py"):
            return load_config(text), text
        configs = os.path.dirname(importlib.util.find_spec("configs").origin)
        return load_config(os.path.join(configs, f"{text}.py")), text
    _validate(spec if hasattr(spec, "model") else {"model": spec}, training=False)
    return spec, "the given config"

