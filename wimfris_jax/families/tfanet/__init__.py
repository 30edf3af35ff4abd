"""TFANet's three alignment stages (Lu et al., "TFANet: Three-Stage Image-Text Feature Alignment Network for
Robust Referring Image Segmentation"), as backbone-independent Flax modules; decisions in docs/TFANET.md.

- KPS: :class:`MLAM` (eqs. 4-15) and :class:`FusionBlock` (eqs. 16-19),
- KFS: :class:`CFSM` with :class:`CSSM` (eqs. 20-22),
- KIS: :class:`WFDM` (eqs. 23-26) and :func:`tfanet_loss`,
- :class:`TFANetLevel`: MLAM -> fusion block -> CFSM on one level (eq. 2's delta_i),
- Table 3's ablation stand-ins: :class:`TransformerCrossAttention`, :class:`ConvFusion`, :class:`SimpleDecoder`.
"""

from typing import Any

import flax.linen as nn

from wimfris_jax.families import Family
from wimfris_jax.families.checks import divides, stage_problems
from wimfris_jax.families.tfanet.ablations import ConvFusion, SimpleDecoder, TransformerCrossAttention
from wimfris_jax.families.tfanet.cfsm import CFSM, CSSM
from wimfris_jax.families.tfanet.fusion import FusionBlock
from wimfris_jax.families.tfanet.level import TFANetLevel
from wimfris_jax.families.tfanet.losses import foreground_logits, tfanet_loss
from wimfris_jax.families.tfanet.mlam import MLAM, linear_attention, xnorm
from wimfris_jax.families.tfanet.model import TFANet, build_tfanet, tfanet_loss_fn
from wimfris_jax.families.tfanet.wfdm import WFDM


def describe(m: Any) -> list[str]:
    """The summary's header: the alignment units and the decoder."""
    return [f"alignment units: {m.level.to_dict()}; decoder {m.decoder.to_dict()}"]


def check_tfanet(cfg: Any, m: nn.Module) -> list[str]:
    """VMamba stages; the heads of the level's attention split the stage widths (MLAM: its ``dim`` if set) and, for
    the transformer stand-in, the text width too. The image size vs the VMamba stride: the builder's check."""
    vmamba, level = m.image_encoder, dict(m.level or {})
    dims, depths = tuple(vmamba.dims), tuple(vmamba.depths)
    problems = stage_problems("dims", dims, depths)
    if level.get("attention") == "mlam":
        mlam = dict(level.get("mlam") or {})
        widths, what = ([mlam["dim"]], "level.mlam.dim") if mlam.get("dim") else (dims, "the stage widths vision.dims")
        problems += divides("level.mlam.num_heads", mlam.get("num_heads", MLAM.num_heads), widths, what)
    elif level.get("attention") == "transformer":
        heads = dict(level.get("transformer") or {}).get("num_heads", TransformerCrossAttention.num_heads)
        problems += divides("level.transformer.num_heads", heads, [*dims, m.text_encoder.width],
                             "the stage widths vision.dims and the text width")  # fmt: skip
    return problems


FAMILY = Family(
    name="tfanet",
    build=build_tfanet,
    loss=tfanet_loss_fn,
    untrainable=(  # MLAM's keys are no softmax attention's (X-Norm, Q (K^T V)): its key biases learn
        r"^text_encoder/.*/key/bias$",
        r"^text_encoder/text_projection$",  # F_T is a mean pool of the words (docs/TFANET.md)
    ),
    summary_groups=(("alignment units", "level_"), ("decoder", "decoder")),
    describe=describe,
    check=check_tfanet,
    pretrained={"image_encoder": "vmamba", "text_encoder": "clip"},
)

__all__ = [
    "FAMILY",
    "TFANet",
    "build_tfanet",
    "tfanet_loss_fn",
    "CFSM",
    "CSSM",
    "MLAM",
    "ConvFusion",
    "SimpleDecoder",
    "TransformerCrossAttention",
    "WFDM",
    "FusionBlock",
    "TFANetLevel",
    "foreground_logits",
    "linear_attention",
    "tfanet_loss",
    "xnorm",
]
