"""Converted weights, cached: a source (:mod:`wimfris_jax.weights.sources`) -> a ``.msgpack`` the model loads.

    path, hit = converted("hf:facebook/dinov2-with-registers-base", "dinov2")   # first run: fetch + convert
    path, hit = converted("hf:facebook/dinov2-with-registers-base", "dinov2")   # later: hit=True, at once

The file is ``<cache>/converted/<family>-<key>.msgpack`` (``<cache>``: ``$WIMFRIS_CACHE``, else
``~/.cache/wimfris_jax``), the key a hash of the source's identity (the Hugging Face commit, the sha256 of a
download, a local file's size and mtime), the converter (``port_weights.<family>``), its ``VERSION`` and
:data:`FORMAT`; a new revision upstream or a new converter version converts again, nothing else does. The file's meta
records the source and its identity. It is written under a lock (processes of one multi-host job on a shared disk
convert once) and renamed into place (:func:`wimfris_jax.io.save_params`): an interrupted conversion leaves nothing
that looks finished.

A local ``.msgpack`` or training run directory is used as it is (:func:`resolve`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from port_weights.__main__ import FAMILIES, convert
from wimfris_jax.errors import UserError
from wimfris_jax.weights.sources import Fetched, Source, cache_dir, fetch, local, parse_source

FORMAT = 1  # of the shared converter code (port_weights.common / protocol / checkpoint) and the file layout


def key(fetched: Fetched, family: str, options: Mapping[str, Any] | None = None) -> str:
    """The cache key of ``fetched`` converted by ``family`` with ``options`` (e.g. DETRIS's ``config``: a file name or
    a ConfigDict, keyed by its JSON): 20 hex digits."""
    if family not in FAMILIES:
        raise UserError(f"unknown converter {family!r}; known: {', '.join(sorted(FAMILIES))}")
    version = importlib.import_module(FAMILIES[family]).VERSION
    shown = {k: v.to_json(sort_keys=True) if hasattr(v, "to_json") else str(v) for k, v in (options or {}).items()}
    text = json.dumps([fetched.identity, family, version, FORMAT, shown], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_path(fetched: Fetched, family: str, options: Mapping[str, Any] | None = None) -> str:
    """Where the conversion of ``fetched`` by ``family`` (with ``options``) is (or will be) cached."""
    return os.path.join(cache_dir(), "converted", f"{family}-{key(fetched, family, options)}.msgpack")


def cached(spec: str, family: str) -> bool:
    """Whether ``spec`` is ready without network or conversion: a local converted file, or converted in the cache."""
    source = parse_source(spec)
    if used_as_is(source):
        return True
    fetched = local(source)
    return fetched is not None and family in FAMILIES and os.path.exists(cached_path(fetched, family))


def used_as_is(source: Source) -> bool:
    """Whether ``source`` is a local file or folder the model reads as it is, unconverted: a ``.msgpack`` or a training
    run (step) folder (a Hugging Face folder holds weights files; a run directory, checkpoints/ and config.json)."""
    path = source.location
    if source.kind != "file" or not os.path.exists(path):
        return False
    if os.path.isfile(path):
        return path.endswith(".msgpack")
    return not any(n.endswith((".safetensors", ".bin", ".pth", ".pt")) for n in os.listdir(path))


def resolve(spec: str, family: str, *, options: Mapping[str, Any] | None = None, progress: bool = True) -> str:
    """The ``.msgpack`` (or run directory) for ``spec``: a local converted file or run as it is, else
    :func:`converted`."""
    source = parse_source(spec)
    if used_as_is(source):
        return source.location
    return converted(source, family, options=options, progress=progress)[0]


def converted(
    source: Source | str,
    family: str,
    *,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
    prog: str = "wimfris",
) -> tuple[str, bool]:
    """``(path, hit)``: the cached conversion of ``source`` by the ``family`` converter (``from_checkpoint(path,
    **options)``), made now if missing (hit False). Converter warnings are printed as one ``{prog}: warning:`` line
    each."""
    fetched = fetch(source, progress=progress)
    out = cached_path(fetched, family, options)
    if os.path.exists(out):
        return out, True
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _locked(out + ".lock"):
        if os.path.exists(out):  # another process converted it while we waited
            return out, True
        if progress:
            print(f"converting {fetched.source.spec} ({family}) into {out}", file=sys.stderr)
        meta = {"source": fetched.source.spec, "identity": fetched.identity}
        convert(family, fetched.path, out, meta=meta, prog=prog, options=dict(options or {}))  # atomic: save_params
    return out, False


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive OS lock on ``path`` (released when the process ends, even by a crash)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
