"""Parameter paths and the regex rules that select them, big_vision style: the trainable set
(``config.train.trainable``), weight decay (``no_decay``) and per-group learning rates (``lr_scale``) all match
paths here, with one error for a pattern that selects nothing.

A parameter's path is its keys joined by '/', e.g. ``msa_1/cross_attn/query/kernel``. A config lists
regexes (``re.search``); a parameter matching any of them trains, every other one is frozen. A pattern that
starts with ``!`` excludes: a parameter matching it never trains (the families' untrainable parameters,
:func:`wimfris_jax.model.trainable_patterns`, are added so).

Frozen parameters are split off rather than masked: the train step differentiates with respect to the
trainable dict only, so frozen backbones get no gradient at all (none is computed, none is stored) and
the optimiser state covers the trainable parameters alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from wimfris_jax.errors import ConfigError
from wimfris_jax.io import flatten, unflatten

DEFAULT_TRAINABLE: tuple[str, ...] = (r"^(?!text_encoder/|image_encoder/)",)  # everything but the two backbones


def key_path(keys: tuple) -> str:
    """A ``jax.tree_util`` key path -> 'a/b/kernel'."""
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def tree_paths(tree: Any) -> list[str]:
    """Every leaf's path of a nested dict, in tree order."""
    return [key_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_patterns(patterns: Sequence[str], paths: Sequence[str], what: str, among: str = "parameter") -> None:
    """A :class:`ConfigError` naming ``config.<what>`` for the first pattern (exclusions ``!regex`` aside, which may
    match nothing: a family without that part) that matches none of ``paths`` -- almost always a typo."""
    for p in patterns:
        if not p.startswith("!") and not any(re.search(p, k) for k in paths):
            like = f" (paths look like {paths[0]!r})" if paths else ""
            raise ConfigError(f"config.{what}: pattern {p!r} matches no {among}{like}")


def path_selected(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` ('a/b/kernel') matches any of the regexes in ``patterns`` and none of those given as
    ``"!regex"``."""
    if any(p.startswith("!") and re.search(p[1:], path) for p in patterns):
        return False
    return any(not p.startswith("!") and re.search(p, path) for p in patterns)


def split(params: Mapping[str, Any], patterns: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns ``(trainable, frozen)`` nested dicts; each holds only its own leaves.

    Raises:
      ConfigError: when a pattern selects nothing (:func:`check_patterns`).
    """
    flat = flatten(params)
    check_patterns(patterns, list(flat), "train.trainable")
    trainable = {k: v for k, v in flat.items() if path_selected(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split`."""
    a, b = flatten(trainable), flatten(frozen)
    clash = set(a) & set(b)
    if clash:
        raise ValueError(f"parameters both trainable and frozen: {sorted(clash)[:5]}")
    return unflatten({**a, **b})
