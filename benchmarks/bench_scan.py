"""Selective-scan benchmark: ``python -m benchmarks.bench_scan [--quick] [--repeats N] [--no-torch]``.

Times the full ``selective_scan`` as the Mamba block calls it (D skip, SiLU(z) gate, delta_bias + softplus)
at WIMFRIS's shapes (B, L, D=d_inner, N), forward and forward+backward (gradient w.r.t. every input), for
each JAX implementation and for transformers' PyTorch ``MambaMixer`` slow path (``mamba_selective_scan``,
its sequential loop) on the same shapes, and prints one table (medians of ``--repeats`` runs after a warm-up,
fewer where a cell would exceed ``BUDGET_S``; the slow path's backward is quadratic in L).

Peak memory is the memory a call needs beyond its (already allocated) inputs:
* JAX: XLA's compiled memory analysis, ``temp_size_in_bytes + output_size_in_bytes`` of the jitted call.
* PyTorch: the rise of the process's resident-set high-water mark (``VmHWM`` in /proc/self/status) over the
  resident size just before the first call, measured in a fresh subprocess per shape and pass (allocator
  caches of earlier cases cannot hide it). Linux only; "n/a" elsewhere.

PyTorch runs with ``torch.set_num_threads(--torch-threads)``, default every core, as XLA:CPU's thread pool
(both frameworks get the same machine; on a *busy* machine OpenMP's spin-waiting can make several torch threads
slower than one, so pass ``--torch-threads 1`` to see that case).

``sequential (no remat)`` is ``sequential`` with the chunked ``jax.checkpoint`` turned off
(``scan.SEQ_CHUNK = 0``); ``unrolled`` is the step fully unrolled (``lax.scan(..., unroll=L)``). These rows are
the measurements behind :func:`wimfris_jax.ssm.scan.default_impl` (CPU: "unrolled" for short sequences with a
small state, else "sequential"; GPU/TPU: "associative", unmeasured: run this, or benchmarks/device_check.py, on
the device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

# (label, (B, L, D, N)). WIMFRIS-B: batch 2 here; WMF: 32x32 map, 4x4 windows -> 64 windows per image,
# 16 pixels + class token prepended and appended = 18 tokens, d_inner = 2 * 512; MTA: d = 168 -> d_inner 336,
# 17 words (22 for G-Ref); one long sequence (a 32x32 map flattened + class token, d_inner 512).
FULL = [
    ("WMF  (2x64 win, 18 tok)", (128, 18, 1024, 16)),
    ("MTA  (L=17)", (2, 17, 336, 16)),
    ("MTA  (L=22, G-Ref)", (2, 22, 336, 16)),
    ("long (L=1025)", (2, 1025, 512, 16)),
]
QUICK = [
    ("WMF  (16 win, 18 tok)", (16, 18, 1024, 16)),
    ("MTA  (L=17)", (2, 17, 336, 16)),
    ("long (L=257)", (2, 257, 256, 16)),
]
JAX_IMPLS = ("associative", "sequential", "sequential (no remat)", "unrolled")
BUDGET_S = 20.0  # per timed cell; a cell that needs more reports fewer runs (marked * in the table)


def _inputs(b: int, length: int, d: int, n: int, channels_last: bool = True) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    f = lambda *s: r.normal(size=s).astype(np.float32)
    x = dict(u=f(b, length, d), delta=f(b, length, d), B=f(b, length, n), C=f(b, length, n), z=f(b, length, d))
    if not channels_last:  # PyTorch's layout: (B, D, L) / (B, N, L)
        x = {k: np.ascontiguousarray(v.transpose(0, 2, 1)) for k, v in x.items()}
    x.update(A=-np.exp(f(d, n)), D=f(d), delta_bias=f(d))
    return x


def _median_ms(fn: Callable[[], object], repeats: int, spent_s: float = 0.0) -> tuple[float, int]:
    """(median ms, runs): up to ``repeats`` timed calls, fewer once BUDGET_S (minus ``spent_s``) is used up."""
    times: list[float] = []
    start = time.perf_counter() - spent_s
    while len(times) < repeats and (not times or time.perf_counter() - start < BUDGET_S):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), len(times)


@contextlib.contextmanager
def _seq_chunk(value):
    from wimfris_jax.ssm import scan

    old, scan.SEQ_CHUNK = scan.SEQ_CHUNK, value
    try:
        yield
    finally:
        scan.SEQ_CHUNK = old


def bench_jax(shape: tuple[int, int, int, int], impl: str, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from wimfris_jax.ssm import selective_scan

    x = {k: jnp.asarray(v) for k, v in _inputs(*shape).items()}
    w = jnp.asarray(np.random.default_rng(1).normal(size=shape[:3]).astype(np.float32))
    base = "sequential" if impl.startswith("sequential") else impl  # associative | sequential | unrolled

    def fwd(a):
        return selective_scan(**a, delta_softplus=True, impl=base)

    fwd_bwd = jax.grad(lambda a: jnp.sum(fwd(a) * w))
    out = {}
    with _seq_chunk(0 if "no remat" in impl else None):
        for tag, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            compiled = jax.jit(f).lower(x).compile()
            mem = compiled.memory_analysis()
            jax.block_until_ready(compiled(x))
            out[f"{tag}_ms"], out[f"{tag}_runs"] = _median_ms(lambda c=compiled: jax.block_until_ready(c(x)), repeats)
            out[f"{tag}_mib"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem else float("nan")
    return out


def _vm_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


def _torch_worker(shape: tuple[int, int, int, int], tag: str, repeats: int, threads: int) -> dict[str, float]:
    """Runs in a fresh process: one pass kind of transformers' slow-path scan on one shape."""
    import torch
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = {k: torch.from_numpy(v) for k, v in _inputs(*shape, channels_last=False).items()}
    w = torch.from_numpy(np.random.default_rng(1).normal(size=(shape[0], shape[2], shape[1])).astype(np.float32))
    grad = tag == "fwd_bwd"
    if grad:
        x = {k: v.requires_grad_(True) for k, v in x.items()}

    def call():
        kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
        with torch.set_grad_enabled(grad):
            y = mamba_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)
            if grad:
                torch.autograd.grad((y * w).sum(), list(x.values()))

    linux = os.path.exists("/proc/self/status")
    before = _vm_kib("VmRSS") if linux else 0.0
    t = time.perf_counter()
    call()
    first_s = time.perf_counter() - t
    peak = (_vm_kib("VmHWM") - before) / 1024 if linux else float("nan")
    # A first call that alone exceeds the budget is the one sample (its warm-up share is negligible then).
    ms, runs = (1e3 * first_s, 1) if first_s > BUDGET_S else _median_ms(call, repeats, spent_s=first_s)
    return {f"{tag}_ms": ms, f"{tag}_runs": runs, f"{tag}_mib": peak}


def bench_torch(shape: tuple[int, int, int, int], repeats: int, threads: int) -> dict[str, float]:
    out = {}
    for tag in ("fwd", "fwd_bwd"):
        job = json.dumps([shape, tag, repeats, threads])
        cmd = [sys.executable, "-m", "benchmarks.bench_scan", "--torch-worker", job]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=_repo_root())
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scan", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced shapes and repeats (well under a minute)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 5, quick 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument(
        "--torch-threads", type=int, default=os.cpu_count(), help="torch threads (default: every core, as XLA)"
    )
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        shape, tag, repeats, threads = json.loads(args.torch_worker)
        print(json.dumps(_torch_worker(tuple(shape), tag, repeats, threads)))
        return 0

    import jax

    cases = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 5)
    impls = [i for i in JAX_IMPLS if not (args.quick and "no remat" in i)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# selective scan, float32; {jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} "
        f"cores, {platform.processor() or platform.machine()}; jax {jax.__version__}; median of {repeats}; "
        f"load avg {load:.1f}; torch threads {args.torch_threads}"
    )
    print("# peak = memory beyond the inputs: JAX from XLA's memory analysis (temp + outputs), torch from the RSS")
    print("#        high-water mark of a fresh process; fwd+bwd = gradient w.r.t. every input;")
    print(f"#        * = fewer than {repeats} timed runs (a {BUDGET_S:.0f} s budget per cell)")
    head = f"| {'case':24s} | {'(B, L, D, N)':20s} | {'impl':24s} | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label, shape in cases:
        rows = list(impls) + ([] if args.no_torch else ["torch MambaMixer slow"])
        for impl in rows:
            r = (
                bench_torch(shape, repeats, args.torch_threads)
                if impl.startswith("torch")
                else bench_jax(shape, impl, repeats)
            )
            fwd, fwd_bwd = (
                f"{r[t + '_ms']:.1f}" + ("*" if r[t + "_runs"] < repeats else "") for t in ("fwd", "fwd_bwd")
            )
            print(
                f"| {label:24s} | {str(shape):20s} | {impl:24s} | {fwd:>6s} | {fwd_bwd:>10s} "
                f"| {r['fwd_mib']:7.1f} | {r['fwd_bwd_mib']:11.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
