"""Parameter counts of a WIMFRIS config, per group, without allocating the model (``jax.eval_shape``).

    python -m wimfris_jax.summary --config configs/wimfris_b.py
    python -m wimfris_jax.summary --config configs/tfanet_b.py --set model.decoder.kind=simple --detail level_0

Groups: frozen text backbone ("text_encoder"), frozen vision backbone ("image_encoder"), MTA ("mta_*"),
MSA ("msa_*"), neck, decoder, projector; then the trainable total (``config.train.trainable`` patterns),
the PET total (MTA + MSA, the paper's "Params" of Table 3b) and the total. DETRIS configs show the text
adapter (D-MoC) and Dense Aligner groups instead of MTA / MSA, and the total as in the official checkpoint.
Compare with Table 3b (WIMFRIS-B: MSA 0.8M, MTA 2.2M, 3.0M together). TFANet and VIPA configs add their own
rows (alignment units; vision fusion, text cross layers, stage norms, VEG). ``--set KEY=VALUE`` overrides the config
as ``wimfris train --set`` does (:func:`wimfris_jax.config.apply_overrides`); ``--detail PREFIX`` adds the counts of
the sub-modules of every top-level module whose name starts with PREFIX (``level_`` -> ``level_0/mlam``, ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

from wimfris_jax.adapters import ADAPTERS
from wimfris_jax.checkpoints import expected_variables
from wimfris_jax.config import apply_overrides, load_config
from wimfris_jax.io import flatten
from wimfris_jax.model import build_model, trainable_patterns, vision_fields
from wimfris_jax.paths import path_selected

GROUPS = (
    ("text backbone", "text_encoder"),
    ("vision backbone", "image_encoder"),
    *((a.label, f"{a.prefix}_") for a in ADAPTERS.values()),  # one row per adapter kind
    ("alignment units (TFANet)", "level_"),
    ("vision fusion (VIPA)", "vision_fusion_"),
    ("text cross layers (VIPA)", "text_cross_"),
    ("stage norms (VIPA)", "stage_norm_"),
    ("VEG (VIPA)", "veg"),
    ("neck", "neck"),
    ("decoder", "decoder"),
    ("projector", "projector"),
)


def abstract_params(model_config: Any) -> dict[str, Any]:
    """The model's params as ShapeDtypeStructs (nothing allocated), for a batch of one."""
    return dict(expected_variables(build_model(model_config), model_config)["params"])


def count_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> dict[str, int]:
    """Counts per group of :data:`GROUPS` (groups the model lacks are left out), plus "PET (adapters)" (the
    backbone adapters, Table 3b's "Params"; models with adapters only), "trainable" and "total"."""
    flat = {k: int(np.prod(v.shape)) for k, v in flatten(params).items()}
    counts = {name: sum(n for k, n in flat.items() if k.startswith(prefix)) for name, prefix in GROUPS}
    counts = {name: n for name, n in counts.items() if n}
    labels = {a.label for a in ADAPTERS.values()}
    adapters = [n for name, n in counts.items() if name in labels]
    if adapters:
        counts["PET (adapters)"] = sum(adapters)
    counts["trainable"] = sum(n for k, n in flat.items() if path_selected(k, trainable))
    counts["total"] = sum(flat.values())
    return counts


def child_counts(params: Mapping[str, Any], prefix: str) -> dict[str, int]:
    """Counts per sub-module ``<top>/<child>`` of the top-level modules whose name starts with ``prefix``, in the
    params' order (a parameter directly under ``<top>`` counts as its own child)."""
    counts: dict[str, int] = {}
    for key, leaf in flatten(params).items():
        top, child = key.split("/")[:2]
        if top.startswith(prefix):
            counts[f"{top}/{child}"] = counts.get(f"{top}/{child}", 0) + int(np.prod(leaf.shape))
    return counts


def source_only_count(model_config: Any) -> int:
    """Values of ``config.model.source_only_params``: entries of the source checkpoint (DETRIS's) that the forward
    never reads and the model does not store (DINOv2's mask_token, CLIP's logit_scale)."""
    names = tuple(model_config.get("source_only_params", ()))
    if not names:
        return 0
    sizes = {"image_encoder/mask_token": int(vision_fields(model_config)["width"]), "text_encoder/logit_scale": 1}
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise ValueError(f"config.model.source_only_params: unknown entries {unknown}; known: {sorted(sizes)}")
    return sum(sizes[n] for n in names)


def format_table(counts: Mapping[str, int]) -> str:
    lines = [f"{'group':<28}{'parameters':>14}{'millions':>10}", "-" * 52]
    for name, n in counts.items():
        if name in ("PET (adapters)", "trainable"):
            lines.append("-" * 52)
        lines.append(f"{name:<28}{n:>14,}{n / 1e6:>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/wimfris_b.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--detail", action="append", default=[], metavar="PREFIX",
                        help="also count the sub-modules of the top-level modules PREFIX* (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(args.config), args.set)
    m = config.model
    params = abstract_params(m)
    details = {prefix: child_counts(params, prefix) for prefix in args.detail}
    unknown = [prefix for prefix, rows in details.items() if not rows]
    if unknown:
        parser.error(f"--detail {unknown[0]}: no top-level module starts with it; the model has {sorted(params)}")
    counts = count_params(params, trainable_patterns(config))
    extra = source_only_count(m)
    if extra:
        counts["total as in the checkpoint"] = counts["total"] + extra
    overrides = f" with {' '.join(args.set)}" if args.set else ""
    print(f"{args.config}{overrides}: image {m.image_size}, words {m.word_len}, vision {dict(m.vision)}")
    for side in ("text", "vision"):
        if f"{side}_adapter" in m:
            spec = dict(m[f"{side}_adapter"])
            kind, layers = spec.pop("kind", "none"), tuple(spec.pop("layers", ()))
            print(f"{side} adapter: {kind} at layers {layers if kind != 'none' and layers else 'off'}; {spec}")
    if "neck" in m:
        window = f", window {m.neck.window}" if m.neck.kind == "hmf" else ""
        print(f"neck {m.neck.kind}, C={m.neck.dim}{window}")
    if "level" in m:
        print(f"alignment units: {m.level.to_dict()}; decoder {m.decoder.to_dict()}")
    if "veg" in m:
        print(f"fusion {m.fusion}, text stages {tuple(m.text_stages)}, key-value {m.key_value}; VEG {m.veg.to_dict()}")
    print(format_table(counts))
    if m.get("paper_params"):
        total = counts["total"]
        print(f"paper: {m.paper_params / 1e6:.2f}M parameters; ours {total / 1e6:.2f}M ({total / m.paper_params:.1%})")
    for rows in details.values():
        print(format_table(rows))


if __name__ == "__main__":
    main()
