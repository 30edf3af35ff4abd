"""Reading and writing converted parameter files (no PyTorch needed).

A converted file is flax msgpack of ``{"params": <nested dict of arrays>, "meta": <json string>}``.
``meta`` records what the converter knew about the source (model family, architecture sizes,
position-embedding interpolation rule, ...) so that a config can be checked against the weights.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization, traverse_util

from wimfris_jax.errors import UserError, one_line


class ParamsFileError(UserError, ValueError):
    """A file that is not a parameter file written by :func:`save_params` (truncated, another format, ...)."""


class OutputError(UserError, OSError):
    """An output path (``--out``, ``--json``) that cannot be written; the message names it."""


def _unwritable(folder: str) -> str | None:
    """Why no file can be written in ``folder`` (created if missing; a probe file is made and removed), or None."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "it is a file"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Creates folder ``path`` if missing and checks that files can be written in it; returns the path.
    Raises :class:`OutputError` naming ``what`` and ``path`` otherwise."""
    path = os.fspath(path)
    why = _unwritable(path)
    if why:
        raise OutputError(f"{what} {path} is not a writable folder ({why})")
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> str:
    """Checks, without creating it, that file ``path`` can be written (its folder is created if missing); returns
    the path. Raises :class:`OutputError` naming ``what`` and ``path`` otherwise."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    reason = None if os.path.isdir(path) else _unwritable(folder)
    if os.path.isdir(path):
        why = "it is a folder"
    elif reason:
        why = f"folder {folder}: {reason}"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        why = "the file is read-only"
    else:
        return path
    raise OutputError(f"{what} {path} cannot be written ({why})")


MAX_JSON_BYTES = 1 << 30  # 1 GiB: a COCO instances file is ~0.1-0.4 GB (parsing costs ~10x its size in memory)


def check_file_size(path: str | os.PathLike, max_bytes: int, what: str, error: type[Exception] = UserError) -> int:
    """The size in bytes of the file ``path``; ``error`` with one line naming the file, its size and the limit
    (``"<path>: 1,234 bytes, over the 1,000-byte limit of <what>"``) when it is larger than ``max_bytes``, before
    anything reads it. FileNotFoundError (naming it) when it is missing."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise error(f"{os.fspath(path)}: {size:,} bytes, over the {max_bytes:,}-byte limit of {what}")
    return size


def read_json_object(
    path: str | os.PathLike, error: type[Exception] = UserError, max_bytes: int = MAX_JSON_BYTES
) -> dict[str, Any]:
    """The JSON object in the file ``path``; ``error`` with one line naming the file when it is larger than
    ``max_bytes`` (checked before reading), is not valid UTF-8 JSON, nests too deeply for the parser, or holds
    something else than an object."""
    check_file_size(path, max_bytes, "a JSON file", error)
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"{path} is not valid JSON: {one_line(e)}") from e
        except RecursionError as e:
            raise error(f"{path} is not valid JSON: nested too deeply to parse") from e
    if not isinstance(value, dict):
        raise error(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def save_params(path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Writes ``params`` (nested dict of arrays) and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    tree = {"params": _to_numpy(params), "meta": json.dumps(dict(meta or {}), sort_keys=True)}
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    os.replace(tmp, path)


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns ``(params, meta)`` from a file written by :func:`save_params`.

    Raises FileNotFoundError (naming the file) when it is missing, :class:`ParamsFileError` when it cannot be
    decoded (truncated, random bytes, another format) or holds no params.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no parameter file", path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
        meta = json.loads(tree.get("meta", "{}")) if isinstance(tree, dict) else None
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types (ExtraData, ValueError, ...)
        raise ParamsFileError(f"{path} is not a parameter file written by save_params ({one_line(e)})") from e
    if not isinstance(tree, dict) or "params" not in tree or not isinstance(meta, dict):
        raise ParamsFileError(f"{path} has no 'params' entry; was it written by `python -m port_weights`?")
    return tree["params"], meta


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> ``{"a/b/kernel": leaf}``."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}`` -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _to_numpy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return unflatten({k: np.asarray(v) for k, v in flatten(tree).items()})
