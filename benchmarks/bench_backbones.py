"""Forward time of the two frozen encoders: ours (jax.jit, compile excluded) beside PyTorch (eval, no_grad).

Same machine, same random weights (converted with port_weights), same inputs, float32. Prints the median over
``--repeats`` timed runs after one warm-up run, and the ratio ours / PyTorch (< 1: ours is faster).

    python -m benchmarks.bench_backbones [--repeats 5] [--only dinov2|clip] [--torch-threads N]

Cases: DINOv2-B/14 + 4 registers at 448 x 448, batch 1 and 8 (from a transformers Dinov2WithRegistersModel, so both
sides resample positions with its rule), and the CLIP ViT-B/16 text tower on 32 sentences of 17 tokens.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import median_ms


def bench_dinov2(batches: list[int], repeats: int) -> list[tuple]:
    from port_weights import dinov2 as port
    from torch_ref.backbones import dinov2_b14_reg4
    from wimfris_jax.backbones import DinoV2

    ref = dinov2_b14_reg4(seed=0)
    params, meta = port.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    model = DinoV2(**meta["config"])
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)["last_hidden_state"])
    rows = []
    for b in batches:
        x = np.random.default_rng(0).normal(size=(b, 3, 448, 448)).astype(np.float32)
        xj, xt = jnp.asarray(x.transpose(0, 2, 3, 1)), torch.from_numpy(x)
        ours = median_ms(lambda xj=xj: fwd(params, xj).block_until_ready(), repeats)
        with torch.no_grad():
            theirs = median_ms(lambda xt=xt: ref(xt).last_hidden_state, repeats)
        rows.append(("DINOv2-B/14-reg4 448x448", f"{b}", ours, theirs))
    return rows


def bench_clip(batch: int, length: int, repeats: int) -> list[tuple]:
    from port_weights import clip as port
    from torch_ref.backbones import clip_b16_text
    from wimfris_jax.backbones import ClipText

    ref = clip_b16_text(seed=0)
    params, meta = port.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, num_heads=8)
    model = ClipText(**meta["config"])
    fwd = jax.jit(lambda p, ids: model.apply({"params": p}, ids)["text_embeds"])
    ids = np.random.default_rng(0).integers(1, 49406, size=(batch, length))
    ids[:, 0], ids[:, -1] = 49406, 49407
    idj, idt = jnp.asarray(ids, jnp.int32), torch.from_numpy(ids)
    ours = median_ms(lambda: fwd(params, idj).block_until_ready(), repeats)
    with torch.no_grad():
        theirs = median_ms(lambda: ref(idt).text_embeds, repeats)
    return [("CLIP B/16 text tower", f"{batch}x{length}", ours, theirs)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["dinov2", "clip"], default=None)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    args = ap.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = []
    if args.only in (None, "dinov2"):
        rows += bench_dinov2([1, 8], args.repeats)
    if args.only in (None, "clip"):
        rows += bench_clip(32, 17, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"{'encoder':<26} {'batch':>6} {'ours ms':>10} {'torch ms':>10} {'ours/torch':>11}")
    for name, batch, ours, theirs in rows:
        print(f"{name:<26} {batch:>6} {ours:>10.1f} {theirs:>10.1f} {ours / theirs:>11.2f}")


if __name__ == "__main__":
    main()
