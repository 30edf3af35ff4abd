"""How far eq. (2)'s Gumbel noise moves the VEG's selection: overlap of the training (noised) and evaluation top-k.

    python -m benchmarks.veg_overlap RUN [RUN ...] [--draws 8] [--scales 1 10] [--max-examples N]
    python -m benchmarks.veg_overlap --random [--draws 8] [--scales 1 10]

For each trained VIPA run directory (its config.json and checkpoint, e.g. a ``wimfris demo --config
configs/vipa_tiny.py`` workdir), the validation set goes through the model in evaluation mode once; the VEG's
relevance scores S_c (B, L, N) and its noise-free selection M_eval are captured there, and ``--draws`` training
selections M_train are drawn from the same scores with the VEG's own retrieval (``retrieval_mask`` with its
learned tau and its ``score_scale``), so only the noise differs, not the features. Printed per run: N, k, the
chance level k / N (two independent uniform draws), and the mean over real cue rows (the VEG's expression_mask:
no padding, no unpicked or skipped cues) of |M_train n M_eval| / k at the run's scale and at each of ``--scales``
(the same trained scores, another scale), with the run's demo mIoU (true / swapped sentences) when its
demo_results.json exists. ``--random``: a random-init VEG of VIPA-B's sizes (D 256, 8 heads, r 0.3) on random
features of VIPA-B's shapes at 480 px (a 15 x 15 map of 1024 channels, 21 words of 768; N = 225, k = 68).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.preprocess import preprocess_eval
from data_pipeline.sources import build_source
from wimfris_jax.evaluate import data_settings
from wimfris_jax.families.vipa.veg import VEG, retrieval_mask, retrieved_count, selection_overlap
from wimfris_jax.load import load_model
from wimfris_jax.predict import find_config


def _overlaps(veg: VEG, tau: jax.Array, batches: list[dict[str, jax.Array]], scales: list[float], draws: int):
    """{scale: mean overlap} over ``draws`` noised selections per batch; batches: "scores" (B, L, N), "retrieved"
    (B, L, N) M_eval, "rows" (B, L) the real cues."""

    @jax.jit
    def one(scores: jax.Array, retrieved: jax.Array, rows: jax.Array, key: jax.Array, scale: float) -> jax.Array:
        train = retrieval_mask(scores, veg.ratio, tau, key, scale)
        return selection_overlap(train, retrieved, rows) * rows.sum()

    out = {}
    for scale in scales:
        total, count = 0.0, 0
        for i, b in enumerate(batches):
            for d in range(draws):
                total += float(one(b["scores"], b["retrieved"], b["rows"], jax.random.key(1000 * i + d), scale))
            count += draws * int(b["rows"].sum())
        out[scale] = total / max(count, 1)
    return out


def run_batches(run: str, batch_size: int, max_examples: int | None) -> tuple[VEG, jax.Array, list[dict]]:
    """(the run's VEG, its tau, the captured evaluation batches) over its validation set."""
    config = find_config(run)
    model, variables = load_model(config, run)
    settings = data_settings(config)
    val = build_source(config.data, "val")
    n = len(val) if max_examples is None else min(len(val), max_examples)

    is_veg = lambda module, method: isinstance(module, VEG) and method == "__call__"  # noqa: E731

    @jax.jit
    def capture(images: jax.Array, ids: jax.Array) -> dict[str, jax.Array]:
        _, state = model.apply(variables, images, ids, train=False, mutable=["intermediates"],
                               capture_intermediates=is_veg)  # fmt: skip
        veg = state["intermediates"]["veg"]["__call__"][0]
        return {"scores": veg["scores"], "retrieved": veg["retrieved"], "rows": veg["expression_mask"]}

    batches = []
    for start in range(0, n, batch_size):
        recs = [preprocess_eval(val[i], **settings) for i in range(start, min(start + batch_size, n))]
        real = len(recs)
        recs += [recs[-1]] * (batch_size - real)  # one compiled shape; the copies' rows are dropped below
        b = capture(np.stack([r["image"] for r in recs]), np.stack([r["ids"] for r in recs]))
        b["rows"] = b["rows"] & (jnp.arange(batch_size) < real)[:, None]
        batches.append(b)
    return model.veg, jnp.exp(variables["params"]["veg"]["log_tau"]), batches


def random_batches(batch_size: int = 16, seed: int = 0) -> tuple[VEG, jax.Array, list[dict]]:
    """A random-init VIPA-B-sized VEG on random features at 480 px (module docstring); sentence lengths 4..21."""
    veg = VEG(dim=256, num_heads=8, ratio=0.3)
    keys = jax.random.split(jax.random.key(seed), 4)
    vision = jax.random.normal(keys[0], (batch_size, 15, 15, 1024))
    words = jax.random.normal(keys[1], (batch_size, 21, 768))
    lengths = jax.random.randint(keys[2], (batch_size, 1), 4, 22)
    pad = jnp.arange(21)[None] >= lengths
    params = jax.jit(veg.init)(keys[3], vision, words, pad)
    out = jax.jit(veg.apply)(params, vision, words, pad)
    batch = {"scores": out["scores"], "retrieved": out["retrieved"], "rows": out["expression_mask"]}
    return veg, jnp.exp(params["params"]["log_tau"]), [batch]


def _demo_miou(run: str) -> str:
    path = os.path.join(run, "demo_results.json")
    if not os.path.isfile(path):
        return "-"
    with open(path, encoding="utf-8") as f:
        res = json.load(f)["results"]
    return f"{100 * res['val (true sentences)']['mIoU']:.1f} / {100 * res['val (swapped sentences)']['mIoU']:.1f}"


def measure(name: str, veg: VEG, tau: jax.Array, batches: list[dict], scales: list[float], draws: int) -> dict:
    """One table row: N, k, chance, tau and the overlaps at the VEG's own scale and at ``scales``."""
    n = int(batches[0]["scores"].shape[-1])
    k = retrieved_count(n, veg.ratio)
    own = float(veg.score_scale)
    overlaps = _overlaps(veg, tau, batches, sorted({own, *scales}), draws)
    return {"run": name, "score_scale": own, "N": n, "k": k, "chance": k / n, "tau": float(tau),
            "overlap": overlaps[own], "at_scales": {s: overlaps[s] for s in scales}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="trained VIPA run directories")
    p.add_argument("--random", action="store_true", help="a random-init VIPA-B-sized VEG at 480 px")
    p.add_argument("--draws", type=int, default=8, help="noised selections per batch")
    p.add_argument("--scales", type=float, nargs="*", default=[1.0, 10.0], help="other scales on the same scores")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not args.runs and not args.random:
        p.error("give run directories and/or --random")
    rows = [measure(run, *run_batches(run, args.batch_size, args.max_examples), args.scales, args.draws)
            for run in args.runs]  # fmt: skip
    for row, run in zip(rows, args.runs):
        row["mIoU true / swapped"] = _demo_miou(run)
    if args.random:
        rows.append(measure("random VIPA-B VEG, 480 px", *random_batches(), args.scales, args.draws))
        rows[-1]["mIoU true / swapped"] = "-"
    head = ["run", "score_scale", "N", "k", "chance k/N", "tau", "overlap", *(f"at scale {s:g}" for s in args.scales),
            "mIoU true / swapped"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["run"], f"{r['score_scale']:g}", r["N"], r["k"], f"{r['chance']:.3f}", f"{r['tau']:.3f}",
                 f"{r['overlap']:.3f}", *(f"{v:.3f}" for v in r["at_scales"].values()),
                 r["mIoU true / swapped"]]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
