"""DETRIS checkpoint -> Flax: rule builders for the task decoder and the projector (mask head).

DETRIS (jiaqihuang01/DETRIS) names, listed in detris_state_dict_keys.txt: ``decoder.layers.{i}.{norm1,norm2,
norm3,self_attn_norm,cross_attn_norm}``, ``decoder.layers.{i}.{self_attn,multihead_attn}`` (fused
``in_proj_weight``/``in_proj_bias`` + ``out_proj``), ``decoder.layers.{i}.ffn.{0,3,4}``, ``decoder.norm``,
``proj.vis.{1,3}.{0 (conv), 1 (BatchNorm)}``, ``proj.vis.4`` (1x1 conv), ``proj.txt``.

Targets carry the variable collection as their first component (``params/...`` and, for BatchNorm running
statistics, ``batch_stats/...``), so one ``convert(state_dict, rules, expected=<full variables>)`` call fills
both collections of :class:`wimfris_jax.decoder.Decoder` / :class:`wimfris_jax.decoder.Projector` (or of a whole
model holding them under ``dst``). ``num_batches_tracked`` is dropped: list :data:`IGNORE` in ``convert``.
"""

from __future__ import annotations

import re

from port_weights.common import Rule, conv2d, heads_out, linear, split_in_proj

# BatchNorm step counters: PyTorch bookkeeping with no Flax counterpart (momentum is fixed).
IGNORE = [r"(module\.)?(.*\.)?num_batches_tracked"]

_LN = r"(norm1|norm2|norm3|self_attn_norm|cross_attn_norm)"


def decoder_rules(src: str = "decoder.", dst: str = "decoder", num_heads: int = 8) -> list[Rule]:
    """Rules mapping DETRIS ``{src}layers.{i}.*`` / ``{src}norm.*`` onto :class:`Decoder` params under ``dst``.

    Args:
      src: prefix of the decoder's keys in the state dict (after stripping ``module.``).
      dst: '/'-path of the Decoder inside the Flax variables (without the collection).
      num_heads: attention heads, needed to split the fused in-projection per head.
    """
    s, d = re.escape(src), f"params/{dst}"
    lay = rf"{s}layers\.(\d+)\."
    attn = lay + r"(self_attn|multihead_attn)\."
    return [
        Rule(attn + r"in_proj_(weight|bias)", rf"{d}/layers_\1/\2", split_in_proj(num_heads)),
        Rule(attn + r"out_proj\.weight", rf"{d}/layers_\1/\2/out/kernel", heads_out(num_heads)),
        Rule(attn + r"out_proj\.bias", rf"{d}/layers_\1/\2/out/bias"),
        Rule(lay + r"ffn\.(0|4)\.weight", rf"{d}/layers_\1/ffn_\2/kernel", linear),
        Rule(lay + r"ffn\.(0|4)\.bias", rf"{d}/layers_\1/ffn_\2/bias"),
        Rule(lay + r"ffn\.3\.weight", rf"{d}/layers_\1/ffn_3/scale"),
        Rule(lay + r"ffn\.3\.bias", rf"{d}/layers_\1/ffn_3/bias"),
        Rule(lay + _LN + r"\.weight", rf"{d}/layers_\1/\2/scale"),
        Rule(lay + _LN + r"\.bias", rf"{d}/layers_\1/\2/bias"),
        Rule(rf"{s}norm\.weight", f"{d}/norm/scale"),
        Rule(rf"{s}norm\.bias", f"{d}/norm/bias"),
    ]


def projector_rules(src: str = "proj.", dst: str = "projector") -> list[Rule]:
    """Rules mapping DETRIS ``{src}vis.*`` / ``{src}txt.*`` onto :class:`Projector` variables under ``dst``.

    BatchNorm ``running_mean``/``running_var`` go to ``batch_stats/{dst}/vis_{1,3}_1/{mean,var}``.
    """
    s, p, b = re.escape(src), f"params/{dst}", f"batch_stats/{dst}"
    return [
        Rule(rf"{s}vis\.(1|3)\.0\.weight", rf"{p}/vis_\1_0/kernel", conv2d),
        Rule(rf"{s}vis\.(1|3)\.1\.weight", rf"{p}/vis_\1_1/scale"),
        Rule(rf"{s}vis\.(1|3)\.1\.bias", rf"{p}/vis_\1_1/bias"),
        Rule(rf"{s}vis\.(1|3)\.1\.running_mean", rf"{b}/vis_\1_1/mean"),
        Rule(rf"{s}vis\.(1|3)\.1\.running_var", rf"{b}/vis_\1_1/var"),
        Rule(rf"{s}vis\.4\.weight", f"{p}/vis_4/kernel", conv2d),
        Rule(rf"{s}vis\.4\.bias", f"{p}/vis_4/bias"),
        Rule(rf"{s}txt\.weight", f"{p}/txt/kernel", linear),
        Rule(rf"{s}txt\.bias", f"{p}/txt/bias"),
    ]
