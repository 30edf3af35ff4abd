"""BERT checkpoints (transformers) -> :class:`wimfris_jax.backbones.bert.Bert` params.

Layouts (detected from the key names; a foreign prefix such as ``text_encoder.`` is found and kept, and keys
outside it are skipped and counted):

- "hf": transformers ``BertModel``, keys with no ``bert.``: the in-memory ``state_dict()`` names of transformers 5
  and the names ``save_pretrained`` writes (v4 and v5 alike: BERT's names did not change in v5, checked with
  transformers 5.24).
- "hf-heads": ``BertForMaskedLM`` / ``BertForPreTraining`` (and the other ``BertFor*`` heads of ``cls.``), as
  ``bert-base-uncased`` ships them: the encoder under ``bert.``; ``cls.*`` (MLM / NSP heads) is dropped and listed
  in ``meta["dropped"]``.

    transformers key (under [prefix][bert.])              Flax path                           transform
    embeddings.word_embeddings.weight                      embeddings/word/embedding           -
    embeddings.position_embeddings.weight                  embeddings/position/embedding       -
    embeddings.token_type_embeddings.weight                embeddings/token_type/embedding     -
    embeddings.LayerNorm.{weight|gamma, bias|beta}         embeddings/norm/{scale, bias}       -
    encoder.layer.{i}.attention.self.{query,key,value}.*   layers_{i}/attn/{query,key,value}/* heads_in (W, H, D)
    encoder.layer.{i}.attention.output.dense.*             layers_{i}/attn/out/*               heads_out (H, D, W)
    encoder.layer.{i}.attention.output.LayerNorm.*         layers_{i}/attn_norm/*              -
    encoder.layer.{i}.intermediate.dense.*                 layers_{i}/mlp/fc1/*                linear (transpose)
    encoder.layer.{i}.output.dense.*                       layers_{i}/mlp/fc2/*                linear (transpose)
    encoder.layer.{i}.output.LayerNorm.*                   layers_{i}/mlp_norm/*               -
    pooler.dense.*                                         pooler_dense/*                      linear (transpose)
    embeddings.{position_ids, token_type_ids}              dropped (buffers of older transformers files)
    cls.*  (hf-heads, under [prefix])                      dropped (MLM / next-sentence heads)

``gamma`` / ``beta`` are the LayerNorm names of old checkpoints (the original ``bert-base-uncased``
``pytorch_model.bin``); both spellings are accepted. Sizes come from the shapes, ``pooler`` is True iff the pooler
weights are present; the head count (which no shape shows) is ``num_heads`` if given, else the
``num_attention_heads`` of a ``config.json`` beside the weights, else head size 64 (BERT-base: 12, BERT-large: 16).
``ln_eps`` is the config's ``layer_norm_eps``, else BERT's 1e-12. A full bert-base / bert-large encoder gives
:func:`~wimfris_jax.backbones.bert.bert_config` ("base" / "large") plus ``pooler``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from port_weights.common import ConversionError, Rule, heads_out, linear, path_prefix, split_qkv_rules
from port_weights.protocol import (
    Family,
    Layout,
    block_count,
    convert_family,
    infer_num_heads,
    only_one,
    param_shapes,
    port,
)
from wimfris_jax.backbones.bert import Bert

LAYOUTS = ("hf", "hf-heads")
_WORD = "embeddings.word_embeddings.weight"
_HEADS = "bert."  # the encoder attribute of transformers' BertFor* models


def encoder_prefix(src_prefix: str, layout: str) -> str:
    """The literal prefix of the encoder's keys: ``src_prefix``, plus ``bert.`` for "hf-heads"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return src_prefix + (_HEADS if layout == "hf-heads" else "")


def rules(src_prefix: str = "", dst_prefix: str = "", *, num_heads: int, layout: str = "hf") -> list[Rule]:
    """Rules mapping BERT keys under ``src_prefix`` onto :class:`Bert` params under ``dst_prefix``.

    Args:
      src_prefix: literal prefix of the keys (without the ``bert.`` of "hf-heads"), e.g. ``"text_encoder."``.
      dst_prefix: '/'-path of the Bert module in the Flax tree, e.g. ``"params/text_encoder"`` ("" at the root).
      num_heads: attention heads (needed to split projections per head).
      layout: "hf" or "hf-heads".
    """
    m, h, d = re.escape(encoder_prefix(src_prefix, layout)), num_heads, path_prefix(dst_prefix)
    scale, bias = r"LayerNorm\.(?:weight|gamma)", r"LayerNorm\.(?:bias|beta)"
    e = m + r"embeddings\."
    lay = m + r"encoder\.layer\.(\d+)\."
    b = d + r"layers_\1/"
    out = [
        Rule(e + r"word_embeddings\.weight", d + "embeddings/word/embedding"),
        Rule(e + r"position_embeddings\.weight", d + "embeddings/position/embedding"),
        Rule(e + r"token_type_embeddings\.weight", d + "embeddings/token_type/embedding"),
        Rule(e + scale, d + "embeddings/norm/scale"),
        Rule(e + bias, d + "embeddings/norm/bias"),
        Rule(lay + r"attention\.output\.dense\.weight", b + "attn/out/kernel", heads_out(h)),
        Rule(lay + r"attention\.output\.dense\.bias", b + "attn/out/bias"),
        Rule(lay + r"attention\.output\." + scale, b + "attn_norm/scale"),
        Rule(lay + r"attention\.output\." + bias, b + "attn_norm/bias"),
        Rule(lay + r"intermediate\.dense\.weight", b + "mlp/fc1/kernel", linear),
        Rule(lay + r"intermediate\.dense\.bias", b + "mlp/fc1/bias"),
        Rule(lay + r"output\.dense\.weight", b + "mlp/fc2/kernel", linear),
        Rule(lay + r"output\.dense\.bias", b + "mlp/fc2/bias"),
        Rule(lay + r"output\." + scale, b + "mlp_norm/scale"),
        Rule(lay + r"output\." + bias, b + "mlp_norm/bias"),
        Rule(m + r"pooler\.dense\.weight", d + "pooler_dense/kernel", linear),
        Rule(m + r"pooler\.dense\.bias", d + "pooler_dense/bias"),
    ]
    return out + split_qkv_rules(lay + r"attention\.self\.{long}\.", b + "attn/", h)


def ignore_patterns(src_prefix: str = "", layout: str = "hf") -> list[str]:
    """Source keys dropped on purpose: the embeddings' index buffers and (hf-heads) the ``cls.*`` heads."""
    out = [re.escape(encoder_prefix(src_prefix, layout)) + r"embeddings\.(?:position_ids|token_type_ids)"]
    return out + ([re.escape(src_prefix) + r"cls\..*"] if layout == "hf-heads" else [])


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> Layout:
    """The layout ("hf" or "hf-heads") and foreign key prefix of the BERT weights in ``state_dict``."""
    found = []
    for k in state_dict:
        if k == _WORD or k.endswith("." + _WORD):
            p = k[: -len(_WORD)]
            found.append(Layout("hf-heads", p[: -len(_HEADS)]) if p.endswith(_HEADS) else Layout("hf", p))
    return only_one(found, source, f"BERT word embedding(s) ('{_WORD}')")


def infer_config(
    state_dict: Mapping[str, np.ndarray],
    layout: Layout,
    source: str = "checkpoint",
    *,
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The :class:`Bert` fields that fit the weights of ``layout``; the head count is ``num_heads``, else
    ``hf_config``'s, else width // 64."""
    m = encoder_prefix(layout.prefix, layout.name)
    hf_config = dict(hf_config or {})
    emb = {n: m + f"embeddings.{n}_embeddings.weight" for n in ("word", "position", "token_type")}
    missing = [k for k in emb.values() if k not in state_dict]
    if missing:
        raise ConversionError(f"{source}: cannot size the BERT encoder, missing key(s) {missing}")
    vocab, width = np.shape(state_dict[emb["word"]])
    blk = re.compile(re.escape(m) + r"encoder\.layer\.(\d+)\.")
    depth = block_count(state_dict, blk, source, "BERT encoder")
    fc1 = next(
        (np.shape(v)[0] for k, v in state_dict.items() if blk.match(k) and k.endswith("intermediate.dense.weight")),
        None,
    )
    if fc1 is None:
        raise ConversionError(f"{source}: no MLP weight (intermediate.dense.weight) found in the BERT layers")
    if "hidden_size" in hf_config and int(hf_config["hidden_size"]) != int(width):
        raise ConversionError(
            f"{source}: config.json hidden_size={hf_config['hidden_size']} but the BERT weights have width {width}; "
            "it describes another model (its head count would be wrong)"
        )
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{source}: config.json hidden_act={act!r}; Bert implements the exact (erf) GELU only")
    pos_type = hf_config.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConversionError(
            f"{source}: config.json position_embedding_type={pos_type!r}; Bert implements absolute positions only"
        )
    return dict(
        vocab_size=int(vocab),
        width=int(width),
        depth=depth,
        num_heads=infer_num_heads(int(width), num_heads, hf_config, source),
        mlp_dim=int(fc1),
        max_positions=int(np.shape(state_dict[emb["position"]])[0]),
        type_vocab_size=int(np.shape(state_dict[emb["token_type"]])[0]),
        ln_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        pooler=m + "pooler.dense.weight" in state_dict,
    )


def expected_params(config: Mapping[str, Any]) -> dict:
    """Shapes of the params of ``Bert(**config)`` (nothing is allocated)."""
    return param_shapes(Bert(**config), jax.ShapeDtypeStruct((1, 2), jnp.int32))


BERT = Family(
    name="bert",
    detect_layout=detect_layout,
    infer_config=infer_config,
    rules=lambda layout, config: rules(layout.prefix, num_heads=config["num_heads"], layout=layout.name),
    expected=lambda layout, config: expected_params(config),
    ignore=lambda layout: ignore_patterns(layout.prefix, layout.name),
    hf_model_type="bert",
)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    source: str = "checkpoint",
    num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """BERT weights in any supported layout -> (Bert params, meta). Keys outside the detected foreign prefix are
    skipped and counted in ``meta["skipped"]``; ``cls.*`` heads and index buffers are listed in ``meta["dropped"]``."""
    return convert_family(BERT, state_dict, source, num_heads=num_heads, hf_config=hf_config)


VERSION = 1  # of this converter's output; bump it when that changes (the key of port_weights.cache)


def from_checkpoint(src: str, num_heads: int | None = None) -> tuple[dict, dict]:
    """Reads a BERT checkpoint (HF folder / .safetensors / .bin, e.g. ``bert-base-uncased``) -> (params, meta);
    ``meta["config"]`` holds the :class:`~wimfris_jax.backbones.bert.Bert` fields and ``meta["source_dtypes"]``
    counts the converted tensors by their stored dtype."""
    return port(BERT, src, num_heads=num_heads)
