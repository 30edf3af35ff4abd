"""The encoders: DINOv2 (vision) and the CLIP text tower of WIMFRIS, each with an adapter seam; VMamba (TFANet);
Swin and BERT (VIPA), run stage by stage by the model that fuses them.

One output convention: every backbone's ``__call__`` returns a dict with

- ``"hidden_states"``: a tuple, the embedding's output first, then each layer's (DINOv2, CLIP, BERT: (B, T, C)
  tokens, depth + 1 entries) or each stage's (VMamba, Swin: (B, h_i, w_i, C_i) maps before the stage's
  downsample, stages + 1 entries; ``hidden_states[1:]`` are the multi-scale features);
- ``"last_hidden_state"``: the final features (after the model's final norm where it has one: DINOv2, CLIP, Swin);
- where the model defines them: ``"pooled"`` (CLIP's EOT token, BERT's pooler), ``"text_embeds"`` (CLIP's
  projection), ``"grid"`` (DINOv2's patch grid).

Models that interleave their own layers with a backbone's use its stage methods: ``embed``, ``blocks(i, x)``,
``downsample(i, x)`` (VMamba, Swin); ``embed``, ``layer(j, x, pad_mask)``, ``pool`` (BERT).
:func:`load_backbone` builds any of them from a converted file.
"""

from wimfris_jax.backbones.bert import Bert, bert_config
from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config, interpolate_pos_embed, pos_embed_matrices
from wimfris_jax.backbones.loading import BACKBONES, load_backbone
from wimfris_jax.backbones.swin import Swin, swin_config
from wimfris_jax.backbones.vmamba import VMamba, vmamba_config

__all__ = [
    "BACKBONES",
    "Bert",
    "ClipText",
    "DinoV2",
    "Swin",
    "VMamba",
    "bert_config",
    "dinov2_config",
    "interpolate_pos_embed",
    "load_backbone",
    "pos_embed_matrices",
    "swin_config",
    "vmamba_config",
]
