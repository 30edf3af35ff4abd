"""TFANet's three alignment stages (Lu et al., "TFANet: Three-Stage Image-Text Feature Alignment Network for
Robust Referring Image Segmentation"), as backbone-independent Flax modules; decisions in docs/TFANET.md.

- KPS: :class:`MLAM` (eqs. 4-15) and :class:`FusionBlock` (eqs. 16-19),
- KFS: :class:`CFSM` with :class:`CSSM` (eqs. 20-22),
- KIS: :class:`WFDM` (eqs. 23-26) and :func:`tfanet_loss`,
- :class:`TFANetLevel`: MLAM -> fusion block -> CFSM on one level (eq. 2's delta_i),
- Table 3's ablation stand-ins: :class:`TransformerCrossAttention`, :class:`ConvFusion`, :class:`SimpleDecoder`.
"""

from wimfris_jax.tfanet.ablations import ConvFusion, SimpleDecoder, TransformerCrossAttention
from wimfris_jax.tfanet.cfsm import CFSM, CSSM
from wimfris_jax.tfanet.fusion import FusionBlock
from wimfris_jax.tfanet.level import TFANetLevel
from wimfris_jax.tfanet.losses import foreground_logits, tfanet_loss
from wimfris_jax.tfanet.mlam import MLAM, linear_attention, xnorm
from wimfris_jax.tfanet.wfdm import WFDM

__all__ = [
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
