"""The encoders: DINOv2 (vision) and the CLIP text tower of WIMFRIS, each with an adapter seam; VMamba (TFANet);
Swin and BERT (VIPA), run stage by stage by the model that fuses them."""

from wimfris_jax.backbones.bert import Bert, bert_config
from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config, interpolate_pos_embed, pos_embed_matrices
from wimfris_jax.backbones.swin import Swin, swin_config
from wimfris_jax.backbones.vmamba import VMamba, vmamba_config

__all__ = [
    "Bert",
    "ClipText",
    "DinoV2",
    "Swin",
    "VMamba",
    "bert_config",
    "dinov2_config",
    "interpolate_pos_embed",
    "pos_embed_matrices",
    "swin_config",
    "vmamba_config",
]
