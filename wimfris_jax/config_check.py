"""Config validation, in one place: :func:`validate` checks a whole config before anything runs or is written, and
raises one :class:`~wimfris_jax.config.ConfigError` listing every problem found (``; ``-separated), each naming the
key, the value and what is allowed: ``config.train.global_batch_size=0: must be a positive integer``.

Where it runs: :func:`wimfris_jax.config.load_config` (a config file as it comes), ``apply_overrides`` (after the
overrides), ``read_run_config`` and :func:`wimfris_jax.load.load_model` (model and data only: the training settings
of a finished run do not matter for eval / predict), and the commands that train (``wimfris train``, ``demo``), which
add the device count the global batch must split over. So every command refuses a bad config before it creates its
workdir or output folder.

What is checked:

- sizes, by name: every value of ``config.model`` and ``config.data`` whose key says it counts or measures something
  (:data:`SIZE_KEY`: ``*dim``, ``width``, ``depth(s)``, ``*heads``, ``*_size``, ``*_len``, ``num_*``, ...) must be a
  positive integer or a non-empty tuple of them (``num_registers`` may be 0; None means "the module's default").
  By name, not by a list of keys, so that every family's keys are covered -- a new family's too, if its names follow
  the convention; odd sizes for ``kernels`` / ``scales`` (same-padding kernels).
- the model family's structure (only when the sizes are sound): the family's builder runs
  (:func:`wimfris_jax.model.build_model`: its own checks of adapters, taps, widths, windows and switches), then the
  built module's effective values (presets expanded) are read: every group holding ``num_heads`` and a width
  (``dim``, ``d_model`` or ``width``) must split it evenly (found by walking the module tree, any family); what
  crosses groups is per family (:mod:`wimfris_jax.families.checks`): patch vs image size, stage widths vs heads, ...;
  ``word_len`` fits the text tower's position table.
- data vs model: ``config.data.image_size`` and ``word_len`` equal the model's (the model is built for them).
- training: batch, epochs, steps, intervals, lr and decay values, the dtype / remat / schedule switches, and every
  regex of ``trainable`` / ``no_decay`` / ``lr_scale`` compiles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from wimfris_jax import model as model_lib
from wimfris_jax.config_fields import choice, is_int
from wimfris_jax.errors import ConfigError, one_line
from wimfris_jax.families.checks import heads_problems, word_len_problems
from wimfris_jax.layers import REMAT_MODES
from wimfris_jax.train.optim import LR_SCHEDULES
from wimfris_jax.train.step import COMPUTE_DTYPES

# keys that count or measure something: a positive integer (or a tuple of them) whatever the family
SIZE_KEY = re.compile(
    r"(^num_\w+|dims?|width|depths?|heads|_size|_len|length|grid|d_state|d_conv|d_model|dim_ffn|expand|_res|channels"
    r"|features|positions|kernels|scales)$"
)
MAY_BE_ZERO = frozenset({"num_registers"})  # counts where 0 means "none" (plain DINOv2 has no registers)
ODD_KEY = re.compile(r"(kernels|scales)$")  # kernel sizes with same padding


def _number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# config.train: (keys, test, what is allowed); a key that is absent is not checked, None only where it means "default"
TRAIN_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("global_batch_size", "epochs", "keep_last", "fsdp_min_size"), lambda v: is_int(v) and v >= 1,
     "must be a positive integer"),
    (("steps_per_epoch", "log_every", "ckpt_every", "eval_every", "eval_every_epochs", "eval_batch_size"),
     lambda v: v is None or (is_int(v) and v >= 0), "must be an integer >= 0"),
    (("eval_max_examples",), lambda v: v is None or (is_int(v) and v >= 1), "must be None or a positive integer"),
    (("lr", "lr_decay", "lr_power"), lambda v: _number(v) and v > 0, "must be a number > 0"),
    (("weight_decay",), lambda v: _number(v) and v >= 0, "must be a number >= 0"),
    (("lr_milestones",), lambda v: isinstance(v, (tuple, list)) and all(is_int(m) and m >= 0 for m in v),
     "must be a tuple of epochs >= 0"),
)  # fmt: skip
TRAIN_CHOICES = {"compute_dtype": ("float32", COMPUTE_DTYPES), "remat": ("auto", ("auto", *REMAT_MODES)),
                 "lr_schedule": ("step", LR_SCHEDULES)}  # fmt: skip


def validate(config: Any, *, training: bool = True, devices: int | None = None) -> Any:
    """Checks ``config`` (a ConfigDict or mapping with any of "model", "data", "train"; module docstring) and returns
    it; raises one ConfigError listing every problem. ``training``: check config.train too; ``devices``: the number
    of devices the global batch is split over (the training loop needs a multiple)."""
    problems = []
    model, data = config.get("model"), config.get("data")
    if model is not None:
        problems += model_problems(model)
    if data is not None:
        problems += size_problems(data, "data")
        for key in ("image_size", "word_len"):
            d, m = data.get(key), model.get(key) if model is not None else None
            if is_int(d) and is_int(m) and d != m:
                problems.append(f"config.data.{key}={d}: must equal config.model.{key}={m} (the model is built for it)")
    if training and config.get("train") is not None:
        problems += train_problems(config["train"], devices)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def size_problems(group: Mapping[str, Any], prefix: str) -> list[str]:
    """Every size of ``group`` (config.<prefix>, nested groups included) that is not a positive integer."""
    problems = []
    for key in group:
        value, name = group[key], f"{prefix}.{key}"
        if hasattr(value, "keys"):
            problems += size_problems(value, name)
            continue
        if value is None or not SIZE_KEY.search(key):
            continue
        low, odd = (0 if key in MAY_BE_ZERO else 1), bool(ODD_KEY.search(key))
        what = f"{'non-negative' if low == 0 else 'positive'}{' odd' if odd else ''} integer"
        if isinstance(value, (tuple, list)):
            if not value or not all(_size_ok(v, low, odd) for v in value):
                problems.append(f"config.{name}={tuple(value)}: must be a non-empty tuple of {what}s")
        elif not _size_ok(value, low, odd):
            problems.append(f"config.{name}={value!r}: must be a {what}")
    return problems


def _size_ok(value: Any, low: int, odd: bool) -> bool:
    return is_int(value) and value >= low and (not odd or value % 2 == 1)


def model_problems(model: Any) -> list[str]:
    """Sizes of config.model, then (if they are sound) its family's structure."""
    problems = size_problems(model, "model")
    if problems:  # the builders divide by these
        return problems
    row = model_lib.family(model)
    try:
        module = row.build(model)
    except ConfigError as e:
        return [str(e)]
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # an unknown field or preset, a missing group
        return [f"config.model does not build a {row.name!r} model: {one_line(e)}"]
    return heads_problems(module) + word_len_problems(model, module) + row.check(model, module)


def train_problems(train: Any, devices: int | None = None) -> list[str]:
    """Problems of config.train (module docstring); ``devices``: see :func:`validate`."""
    problems = []
    for keys, ok, allowed in TRAIN_RULES:
        problems += [f"config.train.{k}={train[k]!r}: {allowed}" for k in keys if k in train and not ok(train[k])]
    for key, (default, choices) in TRAIN_CHOICES.items():
        try:
            choice(train, key, default, choices, section="train")
        except ConfigError as e:
            problems.append(str(e))
    for key in ("trainable", "no_decay", "lr_scale"):
        problems += _regex_problems(key, train.get(key, ()))
    gbs = train.get("global_batch_size")
    if devices and is_int(gbs) and gbs >= 1 and gbs % devices:
        problems.append(
            f"config.train.global_batch_size={gbs}: must be a multiple of the {devices} devices (each gets an equal "
            "share of every batch)"
        )
    return problems


def _regex_problems(key: str, value: Any) -> list[str]:
    """``train.trainable`` / ``no_decay``: a tuple of regexes; ``lr_scale``: of (regex, factor) pairs."""
    pairs = key == "lr_scale"
    form = "(regex, factor) pairs" if pairs else "regexes"
    if value is None or isinstance(value, str) or not isinstance(value, (tuple, list)):
        return [f"config.train.{key}={value!r}: must be a tuple of {form}"]
    problems = []
    for entry in value:
        if pairs and not (isinstance(entry, (tuple, list)) and len(entry) == 2 and _number(entry[1]) and entry[1] >= 0):
            problems.append(f"config.train.{key}: {entry!r} is not a (regex, factor >= 0) pair")
            continue
        pattern = entry[0] if pairs else entry
        if not isinstance(pattern, str):
            problems.append(f"config.train.{key}: {pattern!r} is not a regex string")
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"config.train.{key}: pattern {pattern!r} is not a valid regex ({e})")
    return problems
