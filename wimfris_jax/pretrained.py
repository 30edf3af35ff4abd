"""A config's pretrained weights by name: ``config.init`` + ``--init`` -> converted files (``wimfris train``), and
``wimfris weights list|fetch``.

    wimfris weights list [CONFIG ...]        every config's sources (default: all of configs/), sizes, licences, cached
    wimfris weights fetch CONFIG [--init SUBTREE=SOURCE|none ...] [--set KEY=VALUE ...]
                                             download and convert them now (and the WordPiece vocabulary it names)

``config.init`` maps a model subtree (``image_encoder``, ``text_encoder``) to a source (:mod:`wimfris_jax.weights.
sources`: ``hf:ORG/NAME[@REV]``, ``openai:ViT-B/16``, ``https://...#sha256=...`` or a local file); ``--init
SUBTREE=SOURCE`` replaces one, ``--init SUBTREE=none`` drops one (that subtree starts from random values). The model
family's ``pretrained`` row names the converter of each subtree (``dinov2``, ``clip``, ``vmamba``, ``swin``,
``bert``); a local ``.msgpack`` or training run directory is loaded as it is. Each source is converted once into
the cache (:mod:`port_weights.cache`); later runs start at once.
"""

from __future__ import annotations

import glob
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from wimfris_jax.config import ConfigError, load_config
from wimfris_jax.model import family
from wimfris_jax.weights.catalog import entry
from wimfris_jax.weights.sources import cache_dir, is_named, parse_source

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def init_sources(config: Any, items: Sequence[str] = ()) -> dict[str, str]:
    """``{subtree: source}``: ``config.init``'s non-empty entries, then the ``--init SUBTREE=SOURCE|none`` items;
    each source parsed (one-line SourceError for a malformed one) and each subtree given a converter when named."""
    sources = {k: str(v) for k, v in dict(config.get("init", {})).items() if v}
    for item in items:
        prefix, sep, spec = item.partition("=")
        prefix, spec = prefix.strip().strip("/"), spec.strip()
        if not sep or not prefix or not spec:
            raise ConfigError(f"--init {item!r} is not SUBTREE=SOURCE (e.g. image_encoder=hf:ORG/NAME or =FILE)")
        if spec == "none":
            sources.pop(prefix, None)
        else:
            sources[prefix] = spec
    from port_weights.cache import used_as_is

    converters = family(config.model).pretrained
    for prefix, spec in sources.items():
        if prefix not in converters and not used_as_is(parse_source(spec)):
            known = ", ".join(f"{k} ({v})" for k, v in converters.items()) or "none"
            raise ConfigError(f"--init {prefix}={spec}: no converter for subtree {prefix!r} of this model family "
                              f"(known: {known}); give a converted .msgpack or a run directory")  # fmt: skip
    return sources


def resolve(config: Any, sources: dict[str, str], *, progress: bool = True) -> dict[str, str]:
    """``{subtree: local .msgpack or run directory}``: each source fetched and converted into the cache, or found
    there (:func:`port_weights.cache.resolve`)."""
    from port_weights.cache import resolve as resolve_one  # lazy: the converters (and jax's model code) when needed

    converters = family(config.model).pretrained
    return {k: resolve_one(spec, converters.get(k, ""), progress=progress) for k, spec in sources.items()}


def local_checkpoint(checkpoint: str | os.PathLike, config: Any = None, *, progress: bool = True) -> str:
    """A released whole-model checkpoint by name (``hf:thuteam/DETRIS/base/base_refcoco.pth``, a URL) -> its
    conversion in the cache by DETRIS's converter (the one whole-model converter; ``config``, a config file or
    ConfigDict, sizes it, else its DINOv2 width picks configs/detris_b.py or detris_l.py); anything else unchanged."""
    checkpoint = os.fspath(checkpoint)
    if not is_named(checkpoint):
        return checkpoint
    from port_weights.cache import resolve as resolve_one

    return resolve_one(checkpoint, "detris", options={"config": config} if config else None, progress=progress)


def vocabulary_source(config: Any) -> str | None:
    """The named WordPiece vocabulary of ``config.data.tokenizer`` (``wordpiece:hf:...``), None for any other."""
    kind, _, vocab = str(config.get("data", {}).get("tokenizer", "clip")).partition(":")
    return vocab if kind == "wordpiece" and is_named(vocab) else None


def _has_config(path: str) -> bool:
    """Whether the file defines ``get_config`` (configs/common.py and __init__.py do not)."""
    with open(path, encoding="utf-8") as f:
        return "\ndef get_config(" in f.read()


def list_sources(paths: Sequence[str] = ()) -> str:
    """The table of ``wimfris weights list``: per config, each subtree's source, converter, size, licence and
    whether it is converted in the cache; a catalogue note under each row."""
    from port_weights.cache import cached

    lines = [f"converted weights are cached in {os.path.join(cache_dir(), 'converted')} (WIMFRIS_CACHE); Hugging Face "
             "files in its own cache (HF_HUB_CACHE)"]  # fmt: skip
    for path in paths or sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.py")) if _has_config(p)):
        config = load_config(path)
        sources = init_sources(config)
        vocab = vocabulary_source(config)
        if not sources and not vocab and not paths:
            continue  # the tiny and demo configs start from random values
        lines.append(os.path.relpath(path, os.path.dirname(CONFIGS)) if path.startswith(CONFIGS) else path)
        if not sources:
            lines.append("  (no pretrained sources: every parameter starts from random values)")
        converters = family(config.model).pretrained
        rows = [(k, spec, converters.get(k, "-")) for k, spec in sources.items()]
        for prefix, spec, converter in rows:
            row = entry(spec)
            state = "converted" if cached(spec, converter) else "not fetched"
            size, licence = (row.size, row.licence) if row else ("?", "?")
            lines += [f"  {prefix:<14} {spec}", f"  {'':<14} {converter}, {size}, {licence}, {state}"]
            lines += textwrap.wrap(row.note, 118, initial_indent=" " * 17, subsequent_indent=" " * 17) if row else []
        if vocab:
            lines.append(f"  {'vocabulary':<14} {vocab} (its vocab.txt, data.tokenizer)")
    return "\n".join(lines)


def fetch_all(config: Any, items: Sequence[str] = ()) -> list[str]:
    """Downloads and converts every source of ``config`` (``--init`` items applied) and its named vocabulary;
    returns a line per source (its local file and the time it took)."""
    from data_pipeline.wordpiece import vocab_file

    lines = []
    for prefix, spec in init_sources(config, items).items():
        t0 = time.perf_counter()
        path = resolve(config, {prefix: spec})[prefix]
        lines.append(f"{prefix}: {spec} -> {path} ({time.perf_counter() - t0:.1f} s)")
    vocab = vocabulary_source(config)
    if vocab:
        lines.append(f"vocabulary: {vocab} -> {vocab_file(vocab)}")
    if not lines:
        lines.append("this config names no pretrained sources")
    return lines


def main(args: Any) -> None:
    """``wimfris weights list|fetch`` (arguments parsed by :mod:`wimfris_jax.cli`)."""
    from wimfris_jax.config import apply_overrides

    if args.action == "list":
        print(list_sources(args.config))
        return
    if len(args.config) != 1:
        raise ConfigError("wimfris weights fetch takes one config")
    config = apply_overrides(load_config(args.config[0]), args.set)
    for line in fetch_all(config, args.init):
        print(line, file=sys.stdout)
