"""Attention implementations side by side: ``python benchmarks/bench_attention.py [--quick]``.

Times :func:`wimfris_jax.attention.dot_product_attention` for each implementation (``xla`` = jax.nn's XLA path,
``chunked`` at several query-chunk sizes) beside PyTorch (``scaled_dot_product_attention``, a fused kernel on
CPU, and the explicit ``softmax(q k^T) v`` that the official DINOv2 code runs without xFormers), forward and
forward+backward (gradient w.r.t. q, k, v), float32, at the model's shapes: DINOv2-B self-attention over 1,029
tokens (12 heads of 64), the decoder's self-attention over 1,024 pixels (8 heads of 64), and the cross-attention
of 1,024 pixels to 17 words. Medians of ``--repeats`` after a warm-up; both frameworks on the same threads
(``--threads``, default every core). These rows set ``auto``'s CPU rule in wimfris_jax/attention.py
(``CHUNKED_MIN_KEYS``, ``DEFAULT_CHUNK``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import median_ms  # noqa: E402
from wimfris_jax.attention import chunked_attention, dot_product_attention  # noqa: E402

CASES = [  # label, (B, Tq, Tk, H, D)
    ("DINOv2-B self, b1", (1, 1029, 1029, 12, 64)),
    ("DINOv2-B self, b2", (2, 1029, 1029, 12, 64)),
    ("decoder self, b2", (2, 1024, 1024, 8, 64)),
    ("keys 256, b2", (2, 1024, 256, 8, 64)),
    ("keys 128, b2", (2, 1024, 128, 8, 64)),
    ("cross to 17 words, b2", (2, 1024, 17, 8, 64)),
]
QUICK = [CASES[1], CASES[4], CASES[5]]


def jax_rows(shape, repeats: int, chunks) -> list[tuple[str, float, float]]:
    b, tq, tk, h, d = shape
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(b, tq, h, d)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, tk, h, d)), jnp.float32) for _ in range(2))
    impls = [("xla", functools.partial(dot_product_attention, implementation="xla"))]
    impls += [(f"chunked {c}", functools.partial(chunked_attention, chunk_size=c)) for c in chunks]
    rows = []
    for name, f in impls:
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * q), argnums=(0, 1, 2)))
        times = [median_ms(lambda g=g: jax.block_until_ready(g(q, k, v)), repeats) for g in (fwd, bwd)]
        rows.append((name, *times))
    return rows


def torch_rows(shape, repeats: int) -> list[tuple[str, float, float]]:
    import torch

    b, tq, tk, h, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, tq, d, generator=g, requires_grad=True)
    k, v = (torch.randn(b, h, tk, d, generator=g, requires_grad=True) for _ in range(2))

    def explicit(q, k, v):
        return ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

    rows = []
    for name, f in (("torch SDPA", torch.nn.functional.scaled_dot_product_attention), ("torch explicit", explicit)):
        def fwd(f=f):
            with torch.no_grad():
                f(q, k, v)

        def bwd(f=f):
            torch.autograd.grad((f(q, k, v) * q).sum(), (q, k, v))

        rows.append((name, median_ms(fwd, repeats), median_ms(bwd, repeats)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three cases, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA: every core)")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    chunks = (128,) if args.quick else (64, 128, 256)
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    print(f"# attention, float32, {jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores; "
          f"median of {repeats}; torch threads {args.threads}")  # fmt: skip
    print("| case | (B, Tq, Tk, H, D) | implementation | fwd ms | fwd+bwd ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for label, shape in QUICK if args.quick else CASES:
        rows = jax_rows(shape, repeats, chunks) + ([] if args.no_torch else torch_rows(shape, repeats))
        for name, f, fb in rows:
            print(f"| {label} | {shape} | {name} | {f:.1f} | {fb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
