"""The converter core: a table of regex rules from PyTorch names to Flax paths, checked all at once.

Every converter in this package (Mamba, DINOv2, CLIP, DETRIS) is a list of :class:`Rule` handed to
:func:`convert`. ``convert`` walks every source key, applies the first rule whose pattern fully matches,
and then compares what it produced with the parameter shapes the Flax model expects. All problems —
source keys no rule maps, expected parameters nothing produced, shape mismatches, two sources writing the
same target — are collected and raised together in one :class:`ConversionError`, so a user with a
renamed or truncated checkpoint sees every bad key in one run; a missing parameter is named by its Flax path
and by the source key(s) the table expects for it (:func:`port_weights.names.source_names`). How a family finds
its layout and sizes and builds its table is the protocol of :mod:`port_weights.protocol`.

Source tensors arrive in their stored dtypes (files are read by :mod:`port_weights.checkpoint`): integer or bool
tensors for float parameters are refused, float16/bfloat16 ones are upcast with one :class:`UpcastWarning`, and
the dtype counts are returned for the converters' ``meta["source_dtypes"]``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import ml_dtypes
import numpy as np

from port_weights.names import source_names
from wimfris_jax.errors import UserError
from wimfris_jax.io import flatten, unflatten

Array = np.ndarray
# A transform maps the source tensor to the target array, or to {relative target path: array} when one
# source key fans out to several targets (e.g. a fused qkv weight split into q, k and v).
Transform = Callable[[Array], Union[Array, Mapping[str, Array]]]


class ConversionError(UserError, ValueError):
    """Raised with one line per problem when a checkpoint does not fit the model."""


class UpcastWarning(UserWarning):
    """Emitted once per conversion that widened float16/bfloat16 tensors to the model's float32."""


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


# ------------------------------------------------------------------------------------------ targets
def path_prefix(dst_prefix: str) -> str:
    """A '/'-path as the prefix of rule targets: ``"params/text_encoder/"``, or ``""`` for the root."""
    d = dst_prefix.strip("/")
    return f"{d}/" if d else ""


# --------------------------------------------------------------------------------------- converting
def convert(
    state_dict: Mapping[str, Any],
    rules: Iterable[Rule],
    expected: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Maps ``state_dict`` through ``rules`` into a nested Flax params dict: :func:`convert_with_dtypes` without
    the dtype counts."""
    return convert_with_dtypes(state_dict, rules, expected, ignore, source)[0]


def convert_with_dtypes(
    state_dict: Mapping[str, Any],
    rules: Iterable[Rule],
    expected: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> tuple[dict[str, Any], dict[str, int]]:
    """Maps ``state_dict`` through ``rules`` into a nested Flax params dict.

    Args:
      state_dict: ``{torch name: array or torch tensor}``, in the stored dtypes.
      rules: tried in order; the first whose pattern fully matches a key wins.
      expected: the params the model expects (nested dict of arrays or ``jax.ShapeDtypeStruct``, e.g.
        from ``jax.eval_shape(model.init, ...)["params"]``). When given, every expected path must be
        produced exactly once with the expected shape, nothing else may be produced, and float parameters
        only from float tensors.
      ignore: regexes of source keys that are known and deliberately dropped (buffers, heads, ...).
      source: a name for the checkpoint used in error messages (its path, say).

    Returns:
      ``(params, source_dtypes)``: the nested params dict, arrays cast to the expected dtype (floats to float32
      when ``expected`` is None), and how many of the converted source tensors had each dtype
      (``{"float16": 196}``, what the converters record as ``meta["source_dtypes"]``). Upcasting float16 or
      bfloat16 tensors emits one :class:`UpcastWarning` with their count.

    Raises:
      ConversionError: listing every unmapped source key, missing target (with the source key(s) that would
        have filled it), shape mismatch, integer or bool tensor for a float parameter, and clash.
    """
    rules = list(rules)
    ignore_re = [re.compile(p) for p in ignore]
    produced: dict[str, Array] = {}
    origin: dict[str, str] = {}
    src_dtype: dict[str, np.dtype] = {}  # of the source keys a rule mapped
    problems: list[str] = []
    for key in sorted(state_dict):
        rule, m = next(((r, m) for r in rules if (m := r.match(key))), (None, None))
        if rule is None:
            if not any(p.fullmatch(key) for p in ignore_re):
                problems.append(f"unexpected key {key!r} {tuple(np.shape(state_dict[key]))}: no rule maps it")
            continue
        target = m.expand(rule.target)
        array = as_numpy(state_dict[key])
        src_dtype[key] = array.dtype
        value = (rule.transform or identity)(array)
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        for sub, arr in items:
            path = "/".join(p for p in (target, sub) if p)
            if path in produced:
                problems.append(f"{key!r} and {origin[path]!r} both map to {path!r}")
            produced[path], origin[path] = np.asarray(arr), key
    if expected is not None:
        want = flatten(expected)
        not_float: dict[str, str] = {}  # source key -> a float parameter it would fill
        for path, arr in produced.items():
            if path not in want:
                problems.append(f"{origin[path]!r} maps to {path!r}, which the model does not have")
                continue
            if tuple(arr.shape) != tuple(want[path].shape):
                problems.append(
                    f"{origin[path]!r} -> {path!r}: shape {tuple(arr.shape)} from the checkpoint, "
                    f"the model expects {tuple(want[path].shape)}"
                )
            if is_float(want[path].dtype) and not is_float(arr.dtype):
                not_float.setdefault(origin[path], path)
        for key, path in not_float.items():
            problems.append(
                f"{key!r} holds {src_dtype[key]} values, but the model's {path!r} is a {np.dtype(want[path].dtype)} "
                "weight (integer and bool tensors are not weights)"
            )
        for path in sorted(set(want) - set(produced)):
            names = source_names(path, rules)
            looked = f"; looked for {' or '.join(map(repr, names))}" if names else ""
            problems.append(f"missing: the model's {path!r} {tuple(want[path].shape)} has no source key{looked}")
        dtypes = {p: np.dtype(want[p].dtype) for p in produced if p in want}
    else:
        dtypes = {p: np.dtype(np.float32) if is_float(a.dtype) else a.dtype for p, a in produced.items()}
    if problems:
        raise ConversionError(
            f"{source}: {len(problems)} problem(s) converting to the Flax model:\n  " + "\n  ".join(problems)
        )
    _warn_upcast({origin[p]: dtypes[p] for p, a in produced.items() if _widens(a.dtype, dtypes[p])}, src_dtype, source)
    counts = Counter(d.name for d in src_dtype.values())
    return unflatten({p: a.astype(dtypes[p]) for p, a in produced.items()}), dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------- dtypes
def as_numpy(value: Any) -> Array:
    """A torch tensor or array-like as a numpy array of the same dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if not hasattr(value, "detach"):
        return np.asarray(value)
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
        import torch  # lazy, torch being heavy and optional; loaded already, as ``value`` is a torch tensor

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating-point type (numpy's, or ``ml_dtypes``' bfloat16 and float8 types)."""
    d = np.dtype(dtype)
    return d.kind == "f" or "float" in d.name


def _widens(src: np.dtype, dst: np.dtype) -> bool:
    return is_float(src) and is_float(dst) and src.itemsize < dst.itemsize


def _warn_upcast(upcast: Mapping[str, np.dtype], src_dtype: Mapping[str, np.dtype], source: str) -> None:
    """One :class:`UpcastWarning` saying how many tensors of each narrow float dtype were widened to what."""
    if not upcast:
        return
    counts = Counter(src_dtype[k].name for k in upcast)
    what = " and ".join(f"{n} {d}" for d, n in sorted(counts.items()))
    to = "/".join(sorted({d.name for d in upcast.values()}))
    warnings.warn(UpcastWarning(f"{source}: upcast {what} tensor(s) to {to}"), stacklevel=3)
