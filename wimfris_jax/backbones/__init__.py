"""The encoders: DINOv2 (vision) and the CLIP text tower of WIMFRIS, each with an adapter seam; VMamba (TFANet)."""

from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config, interpolate_pos_embed, pos_embed_matrices
from wimfris_jax.backbones.vmamba import VMamba, vmamba_config

__all__ = [
    "ClipText",
    "DinoV2",
    "VMamba",
    "dinov2_config",
    "interpolate_pos_embed",
    "pos_embed_matrices",
    "vmamba_config",
]
