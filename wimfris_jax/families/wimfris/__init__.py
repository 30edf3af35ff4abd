"""WIMFRIS (and DETRIS, a configuration of the same parts): frozen CLIP text + DINOv2 towers tuned by adapters, a neck
and DETRIS's decoder and projector. The parts only this family uses live here: ``adapters/`` (MTA, MSA, DETRIS's
D-MoC and Dense Aligner), ``neck/`` (HMF, the Window Mamba Fuser, DETRIS's neck), ``decoder/``; the module, builder and
loss in :mod:`.model` and :mod:`.losses`; its registry row is :data:`FAMILY`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from wimfris_jax.backbones.dinov2 import INTERPOLATIONS
from wimfris_jax.families import KEY_BIAS, Family
from wimfris_jax.families.checks import choice_problems, divides
from wimfris_jax.families.wimfris.adapters import ADAPTERS
from wimfris_jax.families.wimfris.model import Wimfris, build_wimfris, vision_fields, wimfris_loss_fn
from wimfris_jax.families.wimfris.neck.wmf import WindowMambaFuser


def describe(m: Any) -> list[str]:
    """The summary's header: the adapters and the neck."""
    lines = []
    for side in ("text", "vision"):
        if f"{side}_adapter" in m:
            spec = dict(m[f"{side}_adapter"])
            kind, layers = spec.pop("kind", "none"), tuple(spec.pop("layers", ()))
            lines.append(f"{side} adapter: {kind} at layers {layers if kind != 'none' and layers else 'off'}; {spec}")
    window = f", window {m.neck.window}" if m.neck.kind == "hmf" else ""
    return [*lines, f"neck {m.neck.kind}, C={m.neck.dim}{window}"]


def source_only(m: Any) -> int:
    """Values of ``config.model.source_only_params``: entries of the source checkpoint (DETRIS's) that the forward
    never reads and the model does not store (DINOv2's mask_token, CLIP's logit_scale)."""
    names = tuple(m.get("source_only_params", ()))
    sizes = {"image_encoder/mask_token": int(vision_fields(m)["width"]), "text_encoder/logit_scale": 1}
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise ValueError(f"config.model.source_only_params: unknown entries {unknown}; known: {sorted(sizes)}")
    return sum(sizes[n] for n in names)


def check_wimfris(cfg: Any, m: nn.Module) -> list[str]:
    """DINOv2 crops an image whose side is not a multiple of the patch (VALID conv); the WMF gate's heads split the
    neck width; the position-resampling rule (read at the first call)."""
    vit, size = m.image_encoder, int(cfg.image_size)
    problems = []
    if size % vit.patch_size:
        problems.append(
            f"config.model.image_size={size}: must be a multiple of the ViT patch, vision.patch_size={vit.patch_size} "
            f"(the last {size % vit.patch_size} px of each side would be dropped)"
        )
    if getattr(m.neck, "use_wmf", False):
        gate = dict(m.neck.wmf or {}).get("gate_heads", WindowMambaFuser.gate_heads)
        problems += divides("neck.wmf.gate_heads", gate, [m.neck.dim], "neck.dim")
    return problems + choice_problems({"interpolation": vit.interpolation}, "interpolation", "", INTERPOLATIONS,
    "vision")


FAMILY = Family(
    name="wimfris",
    build=build_wimfris,
    loss=wimfris_loss_fn,
    untrainable=(
        KEY_BIAS,
        r"^neck/fusion\d/multihead_attn/(query|key)/",  # DETRIS's text gates attend to one key: its weight is 1
        r"dense_branch\w*/conv/bias$",  # DETRIS's Dense Aligner: a conv bias before train-mode BatchNorm cancels
    ),
    summary_groups=(
        *((a.label, f"{a.prefix}_") for a in ADAPTERS.values()),  # one row per adapter kind
        ("neck", "neck"),
        ("decoder", "decoder"),
        ("projector", "projector"),
    ),
    summary_sums=(("PET (adapters)", tuple(a.label for a in ADAPTERS.values())),),  # Table 3b's "Params"
    describe=describe,
    source_only=source_only,
    check=check_wimfris,
    pretrained={"image_encoder": "dinov2", "text_encoder": "clip"},
)

__all__ = ["FAMILY", "Wimfris", "build_wimfris", "wimfris_loss_fn"]
