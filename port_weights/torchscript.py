"""TorchScript archives (OpenAI CLIP's ``ViT-B-16.pt``) read as data: no code of the archive is ever run.

``torch.jit.load`` executes the archive's TorchScript: a module's ``__setstate__`` in ``code/`` runs while loading,
and it can write any file the user can (``torch.from_file(path, shared=True)``). This reader never imports torch.
It unpickles ``data.pkl`` with an unpickler that knows a handful of globals -- TorchScript classes become
:class:`ScriptObject` records (class name + pickled attributes), tensors are rebuilt as numpy arrays from the
archive's ``data/<key>`` storages, ``OrderedDict`` and TorchScript's list builders are plain containers -- and
refuses every other global in one line. The state dict is then the module tree's parameters and buffers, named as
``torch.jit.load(path).state_dict()`` names them: which attributes are parameters or buffers is read from the
``__parameters__`` / ``__buffers__`` lists of each class in ``code/`` (as text). A class that restores itself with
its own ``__setstate__`` is refused: its attributes are whatever that code would make of the pickled state.

Memory is bounded before anything is decompressed (:func:`check_zip_sizes`): the members' declared sizes may not
exceed :func:`memory_budget` of the file's size, and the tensors built from the storages may not exceed it either
(a tensor viewing more elements than its storage holds, or many tensors viewing one storage, cannot multiply it).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np

from port_weights.common import ConversionError

Array = np.ndarray
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}  # fmt: skip
# TorchScript's pickled list builders (torch.jit._pickle): the list itself.
_LIST_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")
MEMORY_FACTOR = 2  # a file may claim at most this many times its own size in memory ...
MEMORY_SLACK = 64 * 2**20  # ... plus this many bytes


def memory_budget(file_size: int) -> int:
    """Bytes a weight file of ``file_size`` bytes may make us hold: decompressed members, or built tensors."""
    return MEMORY_FACTOR * file_size + MEMORY_SLACK


def check_zip_sizes(path: str, z: zipfile.ZipFile) -> None:
    """Refuses (one line) a zip whose members declare more bytes than :func:`memory_budget` of the file allows --
    a zip bomb -- before any member is decompressed (``ZipFile.read`` stops at the declared size)."""
    declared = sum(i.file_size for i in z.infolist())
    budget = memory_budget(os.path.getsize(path))
    if declared > budget:
        raise ConversionError(
            f"{path}: its zip members declare {declared / 2**20:,.0f} MiB uncompressed, more than a "
            f"{os.path.getsize(path) / 2**20:,.1f} MiB weight file can hold (limit {budget / 2**20:,.0f} MiB); "
            "refused as a possible zip bomb"
        )


class ScriptObject:
    """A TorchScript object as pickled: ``cls`` (e.g. ``__torch__.torch.nn.modules.linear.Linear``) and ``state``
    (its attributes, or whatever its ``__getstate__`` returned). Holds data only; nothing of the class is run."""

    cls = ""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage:
    """A storage of the archive: its zip member, dtype and element count, read on first use."""

    def __init__(self, dtype: Any, member: str, numel: int) -> None:
        self.dtype, self.member, self.numel = np.dtype(dtype), member, int(numel)


class _Unpickler(pickle.Unpickler):
    """``data.pkl`` -> Python values; globals outside the allowlist raise a one-line :class:`ConversionError`."""

    def __init__(self, data: bytes, reader: _ArchiveReader) -> None:
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"cls": qualname})
            return self.classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self.reader.rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _type: value
        raise ConversionError(
            f"{self.reader.path}: refused as unsafe: its data.pkl names {qualname}; a TorchScript archive is read as "
            "data (modules, tensors, containers) and nothing else is imported"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise ConversionError(f"{self.reader.path}: unrecognised storage reference {str(pid)[:80]} in data.pkl")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, type) or not isinstance(numel, int) or numel < 0:
            raise ConversionError(f"{self.reader.path}: bad storage reference {str(pid)[:80]} in data.pkl")
        return _Storage(dtype, f"{self.reader.root}/data/{key}", numel)


class _ArchiveReader:
    """One TorchScript archive: its zip, root folder, storages read so far and the bytes built so far."""

    def __init__(self, path: str, z: zipfile.ZipFile) -> None:
        self.path, self.z = path, z
        self.budget, self.built = memory_budget(os.path.getsize(path)), 0
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
        if len(roots) != 1:
            raise ConversionError(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
        self.root = roots.pop()
        self.names = set(names)
        self.buffers: dict[str, bytes] = {}
        order = f"{self.root}/byteorder"
        self.big_endian = order in self.names and z.read(order).strip() == b"big"

    def member(self, name: str) -> bytes:
        if name not in self.names:
            raise ConversionError(f"{self.path}: data.pkl refers to {name}, which the archive does not hold")
        if name not in self.buffers:
            self.buffers[name] = self.z.read(name)
        return self.buffers[name]

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> Array:
        """``torch._utils._rebuild_tensor_v2`` as numpy: a copy of the strided view, bounds checked."""
        shape, strides = tuple(size), tuple(stride)
        if not isinstance(storage, _Storage) or len(shape) != len(strides):
            raise ConversionError(f"{self.path}: malformed tensor in data.pkl (size {shape}, stride {strides})")
        ints = (offset, *shape, *strides)
        if not all(isinstance(v, int) and v >= 0 for v in ints):
            raise ConversionError(f"{self.path}: malformed tensor in data.pkl (size {shape}, stride {strides})")
        numel = int(np.prod(shape, dtype=np.int64))
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides)) if numel else offset - 1
        if numel > storage.numel or last >= storage.numel:
            raise ConversionError(
                f"{self.path}: a tensor of size {shape} (stride {strides}, offset {offset}) reaches beyond its "
                f"storage {storage.member} of {storage.numel} elements"
            )
        self.built += numel * storage.dtype.itemsize
        if self.built > self.budget:
            raise ConversionError(f"{self.path}: its tensors claim more than {self.budget / 2**20:,.0f} MiB, more "
                                  "than the file can hold; refused")  # fmt: skip
        raw = self.member(storage.member)
        if len(raw) < storage.numel * storage.dtype.itemsize:
            raise ConversionError(f"{self.path}: storage {storage.member} holds {len(raw)} bytes, fewer than the "
                                  f"{storage.numel} x {storage.dtype} its tensors read")  # fmt: skip
        flat = np.frombuffer(raw, storage.dtype, count=storage.numel)
        if self.big_endian:
            flat = flat.byteswap()
        item = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape, tuple(s * item for s in strides), writeable=False)
        return np.array(view)


def _class_tensor_names(code: str, name: str) -> tuple[set[str], bool] | None:
    """``(parameter and buffer names, defines __setstate__)`` of class ``name`` in a ``code/`` file's text, or
    None when the class is not there."""
    blocks = re.split(r"^(?=class )", code, flags=re.MULTILINE)
    block = next((b for b in blocks if re.match(rf"class {re.escape(name)}\b", b)), None)
    if block is None:
        return None
    names: set[str] = set()
    for key in ("__parameters__", "__buffers__"):
        if m := re.search(rf"^\s+{key} = \[(.*?)\]", block, flags=re.MULTILINE | re.DOTALL):
            names.update(a or b for a, b in re.findall(r"\"([^\"]+)\"|'([^']+)'", m.group(1)))
    return names, bool(re.search(r"^\s+def __setstate__\(", block, flags=re.MULTILINE))


def _tensor_names(reader: _ArchiveReader, cls: str) -> set[str] | None:
    """Parameter and buffer names of TorchScript class ``cls`` from ``code/`` (None: unknown, keep every tensor);
    refuses a class with its own ``__setstate__``."""
    module, _, name = cls.rpartition(".")
    member = f"{reader.root}/code/{module.replace('.', '/')}.py"
    if member not in reader.names:
        return None
    found = _class_tensor_names(reader.member(member).decode("utf-8", "replace"), name)
    if found is None:
        return None
    names, custom_setstate = found
    if custom_setstate:
        raise ConversionError(
            f"{reader.path}: refused: class {cls} restores itself with its own __setstate__ (TorchScript code, "
            "which this converter never runs); save the model's state_dict() with torch.save instead"
        )
    return names


def _flatten(reader: _ArchiveReader, obj: ScriptObject, prefix: str, out: dict[str, Array]) -> None:
    if not isinstance(obj.state, dict):
        raise ConversionError(
            f"{reader.path}: refused: {obj.cls} was pickled through its own __getstate__ "
            f"({type(obj.state).__name__} state), which only its TorchScript code can restore"
        )
    names = _tensor_names(reader, obj.cls)
    for attr, value in obj.state.items():
        if isinstance(value, ScriptObject):
            _flatten(reader, value, f"{prefix}{attr}.", out)
        elif isinstance(value, np.ndarray) and (names is None or attr in names):
            out[f"{prefix}{attr}"] = value


def load_torchscript(path: str) -> dict[str, Array]:
    """The state dict (``{name: array}``, stored dtypes) of the TorchScript archive ``path``, read as data.

    Raises:
      ConversionError: one line naming the file: not an archive, damaged, a global outside the allowlist, a class
        with its own ``__setstate__``, sizes beyond :func:`memory_budget`.
    """
    try:
        with zipfile.ZipFile(path) as z:
            check_zip_sizes(path, z)
            reader = _ArchiveReader(path, z)
            root = _Unpickler(reader.member(f"{reader.root}/data.pkl"), reader).load()
            if not isinstance(root, ScriptObject):
                raise ConversionError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
            out: dict[str, Array] = {}
            _flatten(reader, root, "", out)
            return out
    except ConversionError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as err:
        raise ConversionError(f"{path}: damaged TorchScript archive: {type(err).__name__}: {err}"[:300]) from err
