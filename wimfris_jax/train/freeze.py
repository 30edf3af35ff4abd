"""Choosing trainable parameters by path patterns, big_vision style.

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

from wimfris_jax.io import flatten, unflatten


def path_selected(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` ('a/b/kernel') matches any of the regexes in ``patterns`` and none of those given as
    ``"!regex"``."""
    if any(p.startswith("!") and re.search(p[1:], path) for p in patterns):
        return False
    return any(not p.startswith("!") and re.search(p, path) for p in patterns)


def split(params: Mapping[str, Any], patterns: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns ``(trainable, frozen)`` nested dicts; each holds only its own leaves.

    Raises:
      ValueError: when a pattern selects nothing (almost always a typo in a config).
    """
    flat = flatten(params)
    for p in patterns:  # an exclusion may match nothing (a family without that part)
        if not p.startswith("!") and not any(re.search(p, k) for k in flat):
            raise ValueError(f"trainable pattern {p!r} matches no parameter; paths look like {next(iter(flat))!r}")
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
