"""Reading PyTorch checkpoints into ``{name: numpy array}`` (and the ``config.json`` beside them).

Tensors keep their stored dtype (float16, bfloat16 via ``ml_dtypes``, integers, bool): :func:`port_weights.common.
convert` checks and casts them, so the converters can refuse integer weights and report upcasts. Files are read
with ``weights_only=True`` (or from safetensors), never with plain pickle; a file that weights-only loading refuses
is reported as unsafe in one line (torch's advice to load it with ``weights_only=False`` is not repeated).
TorchScript archives are read as data by :mod:`port_weights.torchscript` (``torch.jit.load`` would run their
code), and a zip whose members declare more bytes than the file can hold is refused before anything is
decompressed. A yacs
config pickled beside the weights (VMamba's and Swin's training checkpoints) is read as an ``OrderedDict``
(:class:`ConfigNode`) without importing yacs.
PyTorch is imported lazily, only for ``.bin``/``.pth``/``.pt`` files.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, deserialize

from port_weights.common import ConversionError, as_numpy
from port_weights.torchscript import check_zip_sizes, load_torchscript
from wimfris_jax.errors import UserError
from wimfris_jax.io import read_json_object

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


class ConfigNode:
    """Stands in for the config classes of :data:`CONFIG_CLASSES` while unpickling: creating one gives an
    ``OrderedDict`` (which the weights-only reader fills and whose ``__dict__`` takes the attributes, e.g. yacs's
    immutability flag). No code of the real class is imported or run, so the reader stays as safe as for a bare
    state dict."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# Config classes that training checkpoints pickle beside their weights: yacs's CfgNode (VMamba's and Swin's training
# code save ``{"model": ..., "config": CfgNode}``), read as :class:`ConfigNode`.
CONFIG_CLASSES = ("yacs.config.CfgNode",)


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
    ``weights_only=True``), TorchScript archives (OpenAI CLIP's ``ViT-B-16.pt``, read as data: none of their code
    runs), and a Hugging Face model folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or not).
    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

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
    if _is_torchscript(path):
        return load_torchscript(path)  # as data: torch.jit.load would run the archive's code
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                check_zip_sizes(path, z)  # before torch decompresses anything
        except zipfile.BadZipFile as err:
            raise _unreadable(path, err) from err
    import torch  # lazy: torch is heavy and optional, needed only for .bin/.pth/.pt files

    try:
        with torch.serialization.safe_globals([(ConfigNode, name) for name in CONFIG_CLASSES]):
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


def read_hf_config(src: str, model_type: str = "", section: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face folder ``src`` (or beside the file ``src``), its ``section``
    (e.g. "text_config") when present; {} when there is none or its ``model_type`` does not start with
    ``model_type`` (a config of another model)."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    cfg = read_json_object(path, ConversionError)
    if not str(cfg.get("model_type", "")).startswith(model_type):
        return {}
    return dict(cfg.get(section, cfg)) if section else cfg
