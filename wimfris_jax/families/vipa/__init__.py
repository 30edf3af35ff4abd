"""VIPA (Cho et al.): Swin-B + BERT-base with early fusion, the Visual Expression Generator, and a decoder that
attends to the visual expression; a model family of the library (``config.model.family = "vipa"``), its registry row
:data:`FAMILY`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from wimfris_jax.families import KEY_BIAS, Family
from wimfris_jax.families.checks import divides, stage_problems
from wimfris_jax.families.vipa.fusion import default_fusion_heads
from wimfris_jax.families.vipa.model import VIPA, build_vipa, vipa_loss_fn


def describe(m: Any) -> list[str]:
    """The summary's header: fusion, text stages, key-value set and the VEG."""
    return [f"fusion {m.fusion}, text stages {tuple(m.text_stages)}, key-value {m.key_value}; VEG {m.veg.to_dict()}"]


def check_vipa(cfg: Any, m: nn.Module) -> list[str]:
    """Swin stages: stage i is embed_dim * 2**i wide, split by num_heads[i] and by the fusion's default heads; the
    text cross-attention's ``fusion_heads`` split the BERT width. Swin pads any image size: not refused."""
    swin, depths = m.image_encoder, tuple(m.image_encoder.depths)
    heads = tuple(swin.num_heads) if isinstance(swin.num_heads, (tuple, list)) else (swin.num_heads,) * len(depths)
    problems = stage_problems("num_heads", heads, depths)
    widths = [swin.embed_dim * 2**i for i in range(len(depths))]
    for i, (h, c) in enumerate(zip(heads, widths) if not problems else ()):
        problems += divides(f"vision.num_heads[{i}]", h, [c], f"stage {i}'s width vision.embed_dim * 2**{i}")
    unfused = [c for c in widths if c % default_fusion_heads(c)]
    if unfused:
        problems.append(f"config.model.vision.embed_dim={swin.embed_dim}: stage widths {unfused} do not split into "
                        "the fusion's heads (width // 64 of them)")  # fmt: skip
    if "fusion_heads" in cfg:
        problems += divides("fusion_heads", m.fusion_heads, [m.text_encoder.width], "text.width")
    return problems


FAMILY = Family(
    name="vipa",
    build=build_vipa,
    loss=vipa_loss_fn,
    untrainable=(
        KEY_BIAS,
        r"^text_encoder/pooler_dense/",  # the pooled [CLS] feeds no loss
        r"^vision_fusion_\d/(query|value|out)/bias$",  # constant over the tokens, removed by an instance norm
        r"^vision_fusion_3/gate_",  # the last stage's v' has no next stage (only r goes on, to the decoder)
    ),
    summary_groups=(
        ("vision fusion", "vision_fusion_"),
        ("text cross layers", "text_cross_"),
        ("stage norms", "stage_norm_"),
        ("VEG", "veg"),
        ("decoder", "decoder"),
        ("language projection", "le_proj"),
    ),
    describe=describe,
    check=check_vipa,
    pretrained={"image_encoder": "swin", "text_encoder": "bert"},
)

__all__ = ["FAMILY", "VIPA", "build_vipa", "vipa_loss_fn"]
