"""Model families: each is a package of one shape and one :class:`Family` row (its ``__init__.py`` holds ``FAMILY``);
the registry of rows is :mod:`wimfris_jax.model`, which training, evaluation, prediction, the demo, the summary and
config validation read. A family package holds its module(s), its builder, its loss and its structural config check;
parts only it uses live inside it (WIMFRIS's adapters, neck and decoder under ``families/wimfris/``). Shared parts
(backbones, the selective scan, attention, layers, shared losses) stay outside.

Adding a family is one package and one row (docs/ARCHITECTURE.md "Model families";
``tests/families/test_families.py`` builds,
trains and summarises a toy family registered at run time)::

    FAMILY = Family(name="toy", build=build_toy, loss=toy_loss)
    wimfris_jax.model.register_family(FAMILY)       # or list it in wimfris_jax.model.FAMILIES
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# attention key biases: a softmax over the keys ignores a shift common to them all (docs/ARCHITECTURE.md
# "Untrainable parameters"); families with softmax attention list it among their untrainable parameters.
KEY_BIAS = r"(^|/)(key|k)/bias$"


def family_inputs(name: str, images: Any, ids: Any, logits_only: bool, train: bool | None) -> bool:
    """Every family module's input contract: images (B, S, S, 3) and ids (B, L) of one batch, else a ValueError naming
    the family; returns whether to give the logits alone (``logits_only`` and no ``train`` given: evaluation)."""
    if images.ndim != 4 or ids.ndim != 2 or images.shape[0] != ids.shape[0]:
        raise ValueError(f"{name} expects images (B, S, S, 3) and ids (B, L); got {images.shape}, {ids.shape}")
    return logits_only and train is None


def _no_lines(model_config: Any) -> list[str]:
    return []


def _no_problems(model_config: Any, module: Any) -> list[str]:
    return []


def _nothing(model_config: Any) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (``config.model.family``).

    Attributes:
      name: the ``config.model.family`` value.
      build: ``(config.model, dtype=None, remat_mode="none") -> flax module`` taking ``(images (B, S, S, 3),
        ids (B, L), train=)`` and returning a dict with "logits" (B, h, w) (the logits alone when cloned with
        ``logits_only=True`` and called without ``train``).
      loss: ``(config.model, outputs, mask (B, Hm, Wm)) -> (scalar, {name: scalar})``.
      untrainable: regexes of parameters no loss can train, never trained whatever ``config.train.trainable`` says.
      summary_groups: ``(label, path prefix)`` rows of ``wimfris summary`` after the two backbones.
      summary_sums: ``(label, labels summed)`` rows after them (WIMFRIS's "PET (adapters)").
      describe: ``config.model -> lines`` printed by the summary above its table.
      source_only: ``config.model -> count`` of source-checkpoint entries the model does not store (DETRIS).
      check: ``(config.model, built module) -> problems`` (one line each) that a config can cause and the module
        would only meet at its first call (:mod:`wimfris_jax.config_check`).
      pretrained: ``{subtree: converter}``: which ``python -m port_weights`` converter turns a source named for that
        subtree (``config.init``, ``wimfris train --init``) into its params, e.g. ``{"image_encoder": "dinov2"}``.
    """

    name: str
    build: Callable[..., Any]
    loss: Callable[..., tuple]
    untrainable: tuple[str, ...] = ()
    summary_groups: tuple[tuple[str, str], ...] = ()
    summary_sums: tuple[tuple[str, tuple[str, ...]], ...] = ()
    describe: Callable[[Any], list[str]] = _no_lines
    source_only: Callable[[Any], int] = _nothing
    check: Callable[[Any, Any], list[str]] = _no_problems
    pretrained: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def groups(self) -> Sequence[tuple[str, str]]:
        """The summary's rows: the two backbones, then the family's groups."""
        return (("text backbone", "text_encoder"), ("vision backbone", "image_encoder"), *self.summary_groups)

    def sums(self) -> Mapping[str, tuple[str, ...]]:
        return dict(self.summary_sums)
