"""Reading and writing converted parameter files (no PyTorch needed).

A converted file is flax msgpack of ``{"params": <nested dict of arrays>, "meta": <json string>}``.
``meta`` records what the converter knew about the source (model family, architecture sizes,
position-embedding interpolation rule, ...) so that a config can be checked against the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization, traverse_util


def save_params(path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Writes ``params`` (nested dict of arrays) and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    tree = {"params": _to_numpy(params), "meta": json.dumps(dict(meta or {}), sort_keys=True)}
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    os.replace(tmp, path)


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns ``(params, meta)`` from a file written by :func:`save_params`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no parameter file at {path!r}")
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types
            raise ValueError(f"{path!r} is not a parameter file written by save_params: {e}") from e
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{path!r} has no 'params' entry; was it written by `python -m port_weights`?")
    return tree["params"], json.loads(tree.get("meta", "{}"))


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> ``{"a/b/kernel": leaf}``."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}`` -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _to_numpy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return unflatten({k: np.asarray(v) for k, v in flatten(tree).items()})
