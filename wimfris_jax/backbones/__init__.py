"""The frozen encoders of WIMFRIS: DINOv2 (vision) and the CLIP text tower, each with an adapter seam."""

from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config, interpolate_pos_embed, pos_embed_matrices

__all__ = ["ClipText", "DinoV2", "dinov2_config", "interpolate_pos_embed", "pos_embed_matrices"]
