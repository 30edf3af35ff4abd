"""Reading PyTorch checkpoints into ``{name: numpy array}`` and finding what they hold (layout, blocks, heads).

Tensors keep their stored dtype (float16, bfloat16 via ``ml_dtypes``, integers, bool): :func:`port_weights.common.
convert` checks and casts them, so the converters can refuse integer weights and report upcasts. Files are read
with ``weights_only=True`` (or from safetensors), never with plain pickle; a file that weights-only loading refuses
is reported as unsafe in one line (torch's advice to load it with ``weights_only=False`` is not repeated).
PyTorch is imported lazily, only for ``.bin``/``.pth``/``.pt`` files.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, deserialize

from port_weights.common import ConversionError, as_numpy
from wimfris_jax.errors import UserError

Array = np.ndarray
# safetensors dtype codes -> numpy; BF16 through ml_dtypes, which safetensors.numpy does not use.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "C64": np.complex64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
# Sentences of torch's messages that are advice or internals, not the reason: dropped by clean_message.
_NOISE = re.compile(
    r"weights_only|will likely succeed|trusted source|safe_globals|documentation of torch\.load|file an issue|"
    r"two options|recommended steps|internal miniz error|high likelihood|checkpoint was not saved properly",
    re.IGNORECASE,
)


_NOT_TORCH = "not a PyTorch checkpoint (.pth/.bin/.pt) or TorchScript archive"


class MissingCheckpointError(UserError, FileNotFoundError):
    """Raised when the checkpoint file or folder does not exist or holds no weights file."""


# ------------------------------------------------------------------------------------------- messages
def clean_message(err: BaseException) -> str:
    """``err``'s message in one line, without object reprs (``<_io.BytesIO object at 0x…>``), terminal colour
    codes, or torch's advice; the exception's type name when nothing is left."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", text)
    sentences = re.split(r"(?<=[.:])\s+|\n+", text)
    kept = " ".join(s.strip() for s in sentences if s.strip() and not _NOISE.search(s))
    kept = re.sub(r"\s+", " ", kept).strip().rstrip(":").strip()
    return kept if kept and not kept.isdigit() else type(err).__name__


def _refusal(path: str, err: BaseException) -> ConversionError:
    """The one-line error for a file that ``torch.load(weights_only=True)`` refused."""
    text = str(err)
    if m := re.search(r"GLOBAL ([\w.]+)", text):
        why = f"loading it would import {m.group(1)}; only tensors and plain containers (a state_dict) are allowed"
        return ConversionError(f"{path}: refused as unsafe: {why}")
    if m := re.search(r"Unsupported operand (\d+)", text):
        return ConversionError(f"{path}: {_NOT_TORCH}: unknown pickle opcode {m.group(1)}")
    return ConversionError(f"{path}: refused as unsafe: {clean_message(err)}")


def _unreadable(path: str, err: BaseException) -> ConversionError:
    """The one-line error for a file that is not a PyTorch checkpoint at all."""
    why = clean_message(err)
    if isinstance(err, EOFError):
        why = "the file ends early (empty or truncated)"
    elif isinstance(err, (KeyError, IndexError)) or why == type(err).__name__:
        why = "unrecognised format"
    return ConversionError(f"{path}: {_NOT_TORCH}: {why}")


# -------------------------------------------------------------------------------------------- loading
def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, Array]:
    """Reads a PyTorch checkpoint into ``{name: numpy array}`` in the stored dtypes.

    Accepts safetensors files, ``.bin``/``.pth``/``.pt`` files saved with ``torch.save`` (read with
    ``weights_only=True``), TorchScript archives (OpenAI CLIP's ``ViT-B-16.pt``), and a Hugging Face
    model folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or not). Training checkpoints
    that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises:
      MissingCheckpointError: no such file or folder, or a folder without weights.
      ConversionError: a file that is unsafe or not a checkpoint, in one line naming it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_hf_folder(path)
    if not os.path.exists(path):
        raise MissingCheckpointError(f"no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    import torch  # only here: the model's import path never imports torch

    if _is_torchscript(path):
        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as err:
            raise ConversionError(f"{path}: damaged TorchScript archive: {clean_message(err)}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refusal(path, err) from err
        except Exception as err:
            raise _unreadable(path, err) from err
    return _to_numpy_state_dict(obj, path)


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip holding ``constants.pkl`` (torch.save files do not)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _load_safetensors(path: str) -> dict[str, Array]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        views = deserialize(data)
    except SafetensorError as err:
        raise ConversionError(f"{path}: not a safetensors file: {clean_message(err)}") from err
    out = {}
    for name, v in views:
        if v["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {v['dtype']}, which the converter cannot read")
        out[name] = np.frombuffer(v["data"], dtype=_SAFETENSORS_DTYPES[v["dtype"]]).reshape(v["shape"])
    return out


def _load_hf_folder(path: str) -> dict[str, Array]:
    names = sorted(os.listdir(path))
    st = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
    files = st or bins
    if not files:
        raise MissingCheckpointError(f"{path!r} holds no *.safetensors or pytorch_model*.bin file")
    out: dict[str, Array] = {}
    for n in files:
        out.update(load_torch_checkpoint(os.path.join(path, n)))
    return out


def _to_numpy_state_dict(obj: Any, path: str) -> dict[str, Array]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            try:
                out[k] = as_numpy(v)
            except TypeError as err:
                raise ConversionError(f"{path}: tensor {k!r} has dtype {v.dtype}, which numpy cannot hold") from err
    return out


def strip_prefix(state_dict: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    """Removes ``prefix`` from every key that has it (e.g. DistributedDataParallel's ``module.``)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def read_hf_config(src: str, section: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face folder ``src`` (or beside the file ``src``), its ``section``
    (e.g. "text_config") when present; {} when there is none."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: holds a {type(cfg).__name__}, not a JSON object")
    return dict(cfg.get(section, cfg)) if section else cfg


# ---------------------------------------------------------------------------------- reading a layout
def only_one(found: list[tuple[str, str]], source: str, what: str) -> tuple[str, str]:
    """The single ``(layout, key prefix)`` in ``found``; else a ConversionError naming ``what`` was searched."""
    if len(found) != 1:
        n = "no" if not found else f"{len(found)} ({[p for _, p in found]})"
        raise ConversionError(f"{source}: found {n} {what}; cannot tell which weights to convert")
    return found[0]


def block_count(state_dict: Mapping[str, Any], block: re.Pattern, source: str, what: str) -> int:
    """How many blocks the keys matching ``block`` (group 1: the block index) hold; they must be 0..n-1."""
    layers = {int(m.group(1)) for k in state_dict if (m := block.match(k))}
    if not layers or layers != set(range(len(layers))):
        raise ConversionError(f"{source}: {what} blocks must be numbered 0..n-1, found {sorted(layers)}")
    return len(layers)


def infer_num_heads(width: int, num_heads: int | None, hf_config: Mapping[str, Any], source: str) -> int:
    """``num_heads`` if given, else ``config.json``'s ``num_attention_heads``, else head size 64; must divide width."""
    heads = int(num_heads or hf_config.get("num_attention_heads") or max(1, width // 64))
    if width % heads:
        raise ConversionError(f"{source}: width {width} is not divisible by {heads} heads")
    return heads


def dropped_keys(keys: Iterable[str], ignore: Iterable[str]) -> list[str]:
    """The ``keys`` that an ``ignore`` regex fully matches, sorted (what ``convert`` dropped on purpose)."""
    ignore = list(ignore)
    return sorted(k for k in keys if any(re.fullmatch(p, k) for p in ignore))
