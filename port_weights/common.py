"""The converter core: a table of regex rules from PyTorch names to Flax paths, checked all at once.

Every converter in this package (Mamba, DINOv2, CLIP, DETRIS) is a list of :class:`Rule` handed to
:func:`convert`. ``convert`` walks every source key, applies the first rule whose pattern fully matches,
and then compares what it produced with the parameter shapes the Flax model expects. All problems —
source keys no rule maps, expected parameters nothing produced, shape mismatches, two sources writing the
same target — are collected and raised together in one :class:`ConversionError`, so a user with a
renamed or truncated checkpoint sees every bad key in one run.

PyTorch is imported lazily, only by :func:`load_torch_checkpoint`; files are read with
``weights_only=True`` (or from safetensors), never with plain pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import numpy as np

from wimfris_jax.errors import UserError
from wimfris_jax.io import flatten, unflatten

Array = np.ndarray
# A transform maps the source tensor to the target array, or to {relative target path: array} when one
# source key fans out to several targets (e.g. a fused qkv weight split into q, k and v).
Transform = Callable[[Array], Union[Array, Mapping[str, Array]]]


class ConversionError(UserError, ValueError):
    """Raised with one line per problem when a checkpoint does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, full match on the source key) -> ``target`` (a ``re`` template, '/'-separated).

    When ``transform`` returns a dict, each of its keys is appended to the expanded target with a '/'
    (use an empty target prefix ``""`` to give absolute paths).
    """

    pattern: str
    target: str
    transform: Transform | None = None

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


# ----------------------------------------------------------------------------------------- transforms
def identity(x: Array) -> Array:
    return x


def linear(x: Array) -> Array:
    """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x.T)


def conv2d(x: Array) -> Array:
    """torch Conv2d weight (O, I, kh, kw) -> flax Conv kernel (kh, kw, I, O)."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv1d(x: Array) -> Array:
    """torch Conv1d weight (O, I, k) -> flax Conv kernel (k, I, O)."""
    return np.ascontiguousarray(x.transpose(2, 1, 0))


def conv_transpose2d(x: Array) -> Array:
    """torch ConvTranspose2d weight (I, O, kh, kw) -> flax ConvTranspose kernel (kh, kw, I, O).

    Exact for 1×1 kernels; a larger kernel would also need a spatial flip (flax does not flip).
    """
    return np.ascontiguousarray(x.transpose(2, 3, 0, 1))


def heads_in(num_heads: int) -> Transform:
    """torch Linear (H*Dh, C) weight or (H*Dh,) bias -> flax MultiHeadDotProductAttention q/k/v
    kernel (C, H, Dh) or bias (H, Dh)."""

    def f(x: Array) -> Array:
        if x.ndim == 1:
            return x.reshape(num_heads, -1)
        return np.ascontiguousarray(x.T.reshape(x.shape[1], num_heads, -1))

    return f


def heads_out(num_heads: int) -> Transform:
    """torch Linear (C, H*Dh) out-projection weight -> flax MHA ``out`` kernel (H, Dh, C); bias unchanged."""

    def f(x: Array) -> Array:
        if x.ndim == 1:
            return x
        return np.ascontiguousarray(x.T.reshape(num_heads, -1, x.shape[0]))

    return f


def split_in_proj(num_heads: int) -> Transform:
    r"""torch ``nn.MultiheadAttention`` fused ``in_proj_weight`` (3C, C) / ``in_proj_bias`` (3C,) ->
    ``{"query|key|value/kernel|bias": ...}`` of flax ``MultiHeadDotProductAttention``.

    Use with a target naming the attention module, e.g. ``Rule(r"(.*)\.in_proj_(weight|bias)", ...)``
    with one rule per kind; the returned dict keys are relative to that target.
    """
    to_heads = heads_in(num_heads)

    def f(x: Array) -> dict[str, Array]:
        leaf = "bias" if x.ndim == 1 else "kernel"
        return {f"{n}/{leaf}": to_heads(part) for n, part in zip(("query", "key", "value"), np.split(x, 3))}

    return f


def split_qkv_rules(src: str, dst: str, num_heads: int) -> list[Rule]:
    r"""Separate q/k/v ``Linear`` layers -> flax ``MultiHeadDotProductAttention`` ``{dst}{query,key,value}/...``.

    ``src`` is a regex template ending in '.' with ``{short}`` (q, k, v) and/or ``{long}`` (query, key, value)
    placeholders, e.g. ``r"layers\.(\d+)\.self_attn\.{short}_proj\."``; ``dst`` ends in '/' and may reference
    src's groups.
    """
    out = []
    for short, long in (("q", "query"), ("k", "key"), ("v", "value")):
        qkv = src.format(short=short, long=long)
        out += [
            Rule(qkv + "weight", f"{dst}{long}/kernel", heads_in(num_heads)),
            Rule(qkv + "bias", f"{dst}{long}/bias", heads_in(num_heads)),
        ]
    return out


# ------------------------------------------------------------------------------------------ loading
def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, Array]:
    """Reads a PyTorch checkpoint into ``{name: float32/int numpy array}``.

    Accepts safetensors files, ``.bin``/``.pth``/``.pt`` files saved with ``torch.save`` (read with
    ``weights_only=True``), TorchScript archives (OpenAI CLIP's ``ViT-B-16.pt``), and a Hugging Face
    model folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or not). Training checkpoints
    that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_hf_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return {k: np.asarray(v) for k, v in load_file(path).items()}
    import torch  # only here: the model's import path never imports torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a TorchScript archive, or not a checkpoint at all
        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise ValueError(
                f"{path!r} is neither a weights-only PyTorch checkpoint nor a TorchScript archive: {err}"
            ) from err
    return _to_numpy_state_dict(obj, path)


def _load_hf_folder(path: str) -> dict[str, Array]:
    names = sorted(os.listdir(path))
    st = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
    files = st or bins
    if not files:
        raise FileNotFoundError(f"{path!r} holds no *.safetensors or pytorch_model*.bin file")
    out: dict[str, Array] = {}
    for n in files:
        out.update(load_torch_checkpoint(os.path.join(path, n)))
    return out


def _to_numpy_state_dict(obj: Any, path: str) -> dict[str, Array]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()
            out[k] = v.numpy()
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
        cfg = json.load(f)
    return dict(cfg.get(section, cfg)) if section else cfg


# ---------------------------------------------------------------------------------- reading a layout
def path_prefix(dst_prefix: str) -> str:
    """A '/'-path as the prefix of rule targets: ``"params/text_encoder/"``, or ``""`` for the root."""
    d = dst_prefix.strip("/")
    return f"{d}/" if d else ""


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


# --------------------------------------------------------------------------------------- converting
def convert(
    state_dict: Mapping[str, Array],
    rules: Iterable[Rule],
    expected: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Maps ``state_dict`` through ``rules`` into a nested Flax params dict.

    Args:
      state_dict: ``{torch name: array}``.
      rules: tried in order; the first whose pattern fully matches a key wins.
      expected: the params the model expects (nested dict of arrays or ``jax.ShapeDtypeStruct``, e.g.
        from ``jax.eval_shape(model.init, ...)["params"]``). When given, every expected path must be
        produced exactly once with the expected shape, and nothing else may be produced.
      ignore: regexes of source keys that are known and deliberately dropped (buffers, heads, ...).
      source: a name for the checkpoint used in error messages (its path, say).

    Returns:
      The nested params dict, arrays cast to the expected dtype (float32 when ``expected`` is None).

    Raises:
      ConversionError: listing every unmapped source key, missing target, shape mismatch and clash.
    """
    rules = list(rules)
    ignore_re = [re.compile(p) for p in ignore]
    produced: dict[str, Array] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for key in sorted(state_dict):
        rule, m = next(((r, m) for r in rules if (m := r.match(key))), (None, None))
        if rule is None:
            if not any(p.fullmatch(key) for p in ignore_re):
                problems.append(f"unexpected key {key!r} {tuple(np.shape(state_dict[key]))}: no rule maps it")
            continue
        target = m.expand(rule.target)
        value = (rule.transform or identity)(np.asarray(state_dict[key]))
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        for sub, arr in items:
            path = "/".join(p for p in (target, sub) if p)
            if path in produced:
                problems.append(f"{key!r} and {origin[path]!r} both map to {path!r}")
            produced[path], origin[path] = np.asarray(arr), key
    if expected is not None:
        want = {k: v for k, v in flatten(expected).items()}
        for path, arr in produced.items():
            if path not in want:
                problems.append(f"{origin[path]!r} maps to {path!r}, which the model does not have")
            elif tuple(arr.shape) != tuple(want[path].shape):
                problems.append(
                    f"{origin[path]!r} -> {path!r}: shape {tuple(arr.shape)} from the checkpoint, "
                    f"the model expects {tuple(want[path].shape)}"
                )
        for path in sorted(set(want) - set(produced)):
            problems.append(f"missing: the model's {path!r} {tuple(want[path].shape)} has no source key")
        if not problems:
            produced = {p: a.astype(np.dtype(want[p].dtype)) for p, a in produced.items()}
    else:
        produced = {p: (a.astype(np.float32) if a.dtype.kind == "f" else a) for p, a in produced.items()}
    if problems:
        raise ConversionError(
            f"{source}: {len(problems)} problem(s) converting to the Flax model:\n  " + "\n  ".join(problems)
        )
    return unflatten(produced)
