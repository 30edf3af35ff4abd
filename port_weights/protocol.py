"""The converter protocol: a checkpoint family is one :class:`Family`, and :func:`convert_family` converts them all.

A family states only what differs between checkpoints (their key names and how sizes show in their shapes); the
skeleton is the same for every family and lives here. Its functions:

- ``detect_layout(state_dict, source) -> Layout``: the naming the keys use (``"openai"``, ``"hf-v5"``,
  ``"torchhub"``, ...) and the literal key prefix they sit under (DETRIS's ``txt_backbone.``, DDP's ``module.``);
  :func:`only_one` refuses zero or several candidates.
- ``infer_config(state_dict, layout, source, **options) -> config``: the model's constructor arguments, read from
  the shapes (:func:`block_count`, :func:`infer_num_heads`); ``options`` are the family's own keywords, e.g.
  ``num_heads`` and ``hf_config`` (the ``config.json`` beside the weights, read by :func:`port` when the family
  names its ``hf_model_type``).
- ``rules(layout, config) -> list[Rule]``: the regex table (:mod:`port_weights.common`).
- ``expected(layout, config)``: the shapes of the Flax params (:func:`param_shapes`: ``jax.eval_shape`` of the
  model's ``init``).
- optional: ``ignore(layout)`` (regexes of source keys dropped on purpose), ``owns(key, layout)`` (the keys of this
  model; the others, e.g. the rest of a DETRIS checkpoint, are skipped and counted), ``meta(layout, config)``
  (entries added to or replacing the standard meta).

:func:`convert_family` detects, sizes, builds the table and converts the owned keys, reporting every unmapped,
missing, mis-shaped or non-float key in one :class:`~port_weights.common.ConversionError` and counting the source
dtypes; it returns ``(params, meta)``, meta holding ``family``, ``layout``, ``prefix``, ``config``, ``dropped``,
``skipped`` and ``source_dtypes``. :func:`port` reads the checkpoint (and ``config.json``) first.

Adding a family, e.g. a torch ``nn.Sequential(nn.Linear(4, H), nn.ReLU(), nn.Linear(H, 2))`` saved as
``{0,2}.{weight,bias}`` for a flax module ``Mlp(hidden)`` with ``Dense`` layers ``fc_0`` and ``fc_2``::

    def detect_layout(sd, source):
        found = [Layout("torch", k[: -len("0.weight")]) for k in sd if k.endswith("0.weight")]
        return only_one(found, source, "first layer(s) ('0.weight')")

    def rules(layout, config):
        s = re.escape(layout.prefix)
        return [Rule(s + r"(\\d)\\.weight", r"fc_\\1/kernel", linear), Rule(s + r"(\\d)\\.bias", r"fc_\\1/bias")]

    MLP = Family(
        name="mlp",
        detect_layout=detect_layout,
        infer_config=lambda sd, layout, source: {"hidden": int(np.shape(sd[layout.prefix + "0.weight"])[0])},
        rules=rules,
        expected=lambda layout, config: param_shapes(Mlp(**config), jax.ShapeDtypeStruct((1, 4), jnp.float32)),
    )
    params, meta = port(MLP, "mlp.pth")  # or convert_family(MLP, state_dict)

For ``python -m port_weights mlp SRC OUT``, give the module a ``from_checkpoint(src)`` returning ``port(MLP, src)``
and list it in :data:`port_weights.__main__.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from port_weights.checkpoint import load_torch_checkpoint, read_hf_config
from port_weights.common import ConversionError, Rule, convert_with_dtypes

StateDict = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's weights sit in a state dict: the naming (``name``), the literal key ``prefix`` kept on every
    key, and for checkpoints holding several independent copies of the model (Mamba's layers) their indices."""

    name: str
    prefix: str = ""
    layers: tuple[int, ...] = ()


def under_prefix(foreign: str | None = None) -> Callable[[str, Layout], bool]:
    """An ``owns``: the keys under the layout's prefix, less those whose rest matches the regex ``foreign`` (e.g.
    DETRIS's adapters inside a backbone's blocks)."""

    def owns(key: str, layout: Layout) -> bool:
        rest = key[len(layout.prefix) :]
        return key.startswith(layout.prefix) and not (foreign and re.match(foreign, rest))

    return owns


def everything(key: str, layout: Layout) -> bool:
    """An ``owns`` for families whose rule table or ``ignore`` must account for every key of the checkpoint."""
    return True


def _no_ignore(layout: Layout) -> Sequence[str]:
    return ()


def _no_meta(layout: Layout, config: Any) -> Mapping[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Family:
    """A checkpoint family: the functions of the module docstring. ``hf_model_type``: when set, :func:`port` reads
    the ``config.json`` beside the weights if its ``model_type`` starts with it (its ``hf_section``, e.g.
    ``"text_config"``, when that is present) and passes it to ``infer_config`` as ``hf_config``."""

    name: str
    detect_layout: Callable[[StateDict, str], Layout]
    infer_config: Callable[..., Any]  # (state_dict, layout, source, **options) -> config
    rules: Callable[[Layout, Any], list[Rule]]
    expected: Callable[[Layout, Any], Mapping[str, Any]]
    ignore: Callable[[Layout], Sequence[str]] = _no_ignore
    owns: Callable[[str, Layout], bool] = under_prefix()
    meta: Callable[[Layout, Any], Mapping[str, Any]] = _no_meta
    hf_model_type: str | None = None
    hf_section: str | None = None


def convert_family(
    family: Family, state_dict: StateDict, source: str = "checkpoint", **options: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts ``state_dict`` with ``family`` -> ``(params, meta)``; ``options`` go to ``family.infer_config``.

    Raises:
      ConversionError: no or several layouts, a model that cannot be sized, or (all at once) every unmapped,
        missing, mis-shaped, non-float or clashing key.
    """
    layout = family.detect_layout(state_dict, source)
    config = family.infer_config(state_dict, layout, source, **options)
    own = {k: v for k, v in state_dict.items() if family.owns(k, layout)}
    ignore = list(family.ignore(layout))
    table = family.rules(layout, config)
    params, dtypes = convert_with_dtypes(own, table, family.expected(layout, config), ignore, source)
    meta = {
        "family": family.name,
        "layout": layout.name,
        "prefix": layout.prefix,
        "config": config,
        "dropped": dropped_keys(own, ignore),
        "skipped": len(state_dict) - len(own),
        "source_dtypes": dtypes,
    }
    return params, {**meta, **family.meta(layout, config)}


def port(family: Family, src: str, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads the checkpoint ``src`` (file or Hugging Face folder, see
    :func:`~port_weights.checkpoint.load_torch_checkpoint`) and converts it with ``family``."""
    if family.hf_model_type is not None and options.get("hf_config") is None:
        options["hf_config"] = read_hf_config(src, family.hf_model_type, family.hf_section)
    return convert_family(family, load_torch_checkpoint(src), src, **options)


# ------------------------------------------------------------------- helpers for detect_layout, infer_config
def param_shapes(module: Any, *inputs: jax.ShapeDtypeStruct) -> dict[str, Any]:
    """The body of a family's ``expected``: the shapes of ``module``'s params for inputs of these shapes
    (``jax.eval_shape`` of its ``init``: nothing is allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def only_one(found: list[Layout], source: str, what: str) -> Layout:
    """The single layout in ``found``; else a ConversionError naming ``what`` was searched."""
    if len(found) != 1:
        n = "no" if not found else f"{len(found)} ({[f.prefix for f in found]})"
        raise ConversionError(f"{source}: found {n} {what}; cannot tell which weights to convert")
    return found[0]


def block_count(state_dict: StateDict, block: re.Pattern, source: str, what: str) -> int:
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
