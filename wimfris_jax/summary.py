"""Parameter counts of a config, per group, without allocating the model (``jax.eval_shape``).

    python -m wimfris_jax.summary --config configs/wimfris_b.py
    python -m wimfris_jax.summary --config configs/tfanet_b.py --set model.decoder.kind=simple --detail level_0

Groups: frozen text backbone ("text_encoder"), frozen vision backbone ("image_encoder"), MTA ("mta_*"),
MSA ("msa_*"), neck, decoder, projector; then the trainable total (``config.train.trainable`` patterns),
the PET total (MTA + MSA, the paper's "Params" of Table 3b) and the total. DETRIS configs show the text
adapter (D-MoC) and Dense Aligner groups instead of MTA / MSA, and the total as in the official checkpoint.
Compare with Table 3b (WIMFRIS-B: MSA 0.8M, MTA 2.2M, 3.0M together). The groups, the header lines and the
checkpoint-only entries are the family's (its :class:`~wimfris_jax.families.Family` row): TFANet and VIPA configs show
theirs (alignment units; vision fusion, text cross layers, stage norms, VEG). ``--set KEY=VALUE`` overrides the config
as ``wimfris train --set`` does (:func:`wimfris_jax.config.apply_overrides`); ``--detail PREFIX`` adds the counts of
the sub-modules of every top-level module whose name starts with PREFIX (``level_`` -> ``level_0/mlam``, ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

from wimfris_jax.checkpoints import expected_variables
from wimfris_jax.config import apply_overrides, load_config
from wimfris_jax.io import flatten
from wimfris_jax.model import build_model, family, trainable_patterns
from wimfris_jax.paths import path_selected


def abstract_params(model_config: Any) -> dict[str, Any]:
    """The model's params as ShapeDtypeStructs (nothing allocated), for a batch of one."""
    return dict(expected_variables(build_model(model_config), model_config)["params"])


def count_params(params: Mapping[str, Any], trainable: tuple[str, ...], model_config: Any = None) -> dict[str, int]:
    """Counts per group of the family of ``model_config`` (default WIMFRIS; groups the model lacks are left out),
    its sums (WIMFRIS's "PET (adapters)", Table 3b's "Params"; only when non-zero), "trainable" and "total"."""
    row = family(model_config or {})
    flat = {k: int(np.prod(v.shape)) for k, v in flatten(params).items()}
    counts = {name: sum(n for k, n in flat.items() if k.startswith(prefix)) for name, prefix in row.groups()}
    counts = {name: n for name, n in counts.items() if n}
    for name, labels in row.sums().items():
        if any(label in counts for label in labels):
            counts[name] = sum(counts.get(label, 0) for label in labels)
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


def format_table(counts: Mapping[str, int]) -> str:
    lines = [f"{'group':<28}{'parameters':>14}{'millions':>10}", "-" * 52]
    for name, n in counts.items():
        if name == "trainable" or name.startswith("PET"):
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
    row = family(m)
    counts = count_params(params, trainable_patterns(config), m)
    extra = row.source_only(m)
    if extra:
        counts["total as in the checkpoint"] = counts["total"] + extra
    overrides = f" with {' '.join(args.set)}" if args.set else ""
    print(f"{args.config}{overrides}: image {m.image_size}, words {m.word_len}, vision {dict(m.vision)}")
    for line in row.describe(m):
        print(line)
    print(format_table(counts))
    if m.get("paper_params"):
        total = counts["total"]
        print(f"paper: {m.paper_params / 1e6:.2f}M parameters; ours {total / 1e6:.2f}M ({total / m.paper_params:.1%})")
    for rows in details.values():
        print(format_table(rows))


if __name__ == "__main__":
    main()
