"""Compile a config's train step and evaluation forward for an accelerator we do not own: memory, kernels, batch.

    PYTHONPATH=.aot_site python -m benchmarks.aot --target h200 --config configs/wimfris_b.py
    PYTHONPATH=.aot_site python -m benchmarks.aot --target v5e-4 --config configs/tfanet_b.py --remat all --fsdp
    PYTHONPATH=.aot_site python -m benchmarks.aot --target h100 --config configs/vipa_b.py --max-batch --json o.json

Compile-only, from this (CPU) host: the devices are XLA's description of the target (benchmarks/aot_targets.py says
what to install), the train step is the one training runs (:func:`wimfris_jax.train.step.jit_train_step`, whose
kernel choices follow the target's platform: :mod:`wimfris_jax.platform`), at the config's global batch (the
paper's) unless ``--batch`` says otherwise, data parallel over ``--devices`` (or the TPU slice), bfloat16 compute.
For each ``train.remat`` mode it reports the per-device peak memory from XLA's compiled memory analysis (arguments
+ outputs - aliased + temporaries), the compile time, a census of the kernels in the compiled HLO (cuDNN fused
attention, cuBLAS / Triton GEMMs, collectives) and every attention call with the kernel it got and why; then the
same for the evaluation forward; ``--max-batch`` searches the largest global batch whose step fits the device
memory (compile-only bisection). These are AOT figures: memory and kernels, no timings. JSON + a table.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.aot_targets import TARGETS, TargetUnavailable, target_devices  # noqa: E402
from benchmarks.bench_train import peak_bytes, random_batch  # noqa: E402
from wimfris_jax import model as model_lib  # noqa: E402
from wimfris_jax.attention import record_decisions  # noqa: E402
from wimfris_jax.config import load_config  # noqa: E402
from wimfris_jax.layers import REMAT_MODES, resolve_remat  # noqa: E402
from wimfris_jax.platform import for_devices, platform_of  # noqa: E402
from wimfris_jax.train import optim, sharding  # noqa: E402
from wimfris_jax.train.state import init_variables, train_state_shapes  # noqa: E402
from wimfris_jax.train.step import jit_train_step, make_train_step  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def census(hlo: str) -> dict[str, int]:
    """Kernels of a compiled module's text: custom calls by target (``__cudnn$fmha...``, ``__cublas$...``), fusion
    backends (``__triton_...``, ``__cudnn$fusion``), collectives, and all fusions."""
    counts: collections.Counter = collections.Counter()
    counts.update(re.findall(r'custom_call_target="([^"]+)"', hlo))
    counts.update(f"fusion {k}" for k in re.findall(r'"kind":"(__[^"]+)"', hlo))
    for op in COLLECTIVES:
        if n := len(re.findall(rf"\b{op}(?:-start)?\(", hlo)):
            counts[op] = n
    counts["fusions"] = len(re.findall(r" fusion\(", hlo))
    return dict(sorted(counts.items()))


def attention_rows(decisions: list[dict]) -> list[dict]:
    """Attention calls while tracing, one row per distinct (shape, dtype, kernel, reason) with its count."""
    rows: dict[tuple, dict] = {}
    for d in decisions:
        key = (d["q"], d["kv_len"], d["dtype"], d["chosen"], d["why"])
        rows.setdefault(key, {**d, "q": list(d["q"]), "calls": 0})["calls"] += 1
    return list(rows.values())


def _abstract_batch(config, batch: int, mesh) -> dict:
    shapes = random_batch(config, 1)
    spec = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=spec) for k, v in shapes.items()}


def compile_train(config, devices, remat: str, batch: int, dtype: str, fsdp: bool) -> tuple[dict, object]:
    """The train step of ``config`` compiled for ``devices``: (row, compiled)."""
    model, loss_fn = model_lib.training_model(config, remat)
    mesh = sharding.make_mesh(devices)
    tc = config.train
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch=1000)
    init_fn = functools.partial(init_variables, model, random_batch(config, 1))
    state, shardings = train_state_shapes(init_fn, tx, model_lib.trainable_patterns(config), 0, mesh, fsdp=fsdp)
    step = jit_train_step(make_train_step(model, loss_fn, tx, schedule, compute_dtype=dtype), shardings, mesh)
    row = {"what": "train step", "remat": remat, "resolved_remat": resolve_remat(remat, platform_of(mesh)),
           "global_batch": batch, "devices": len(devices), "fsdp": fsdp}  # fmt: skip
    return _compiled_row(row, lambda: step.lower(state, _abstract_batch(config, batch, mesh)))


def compile_eval(config, devices, batch: int, dtype: str) -> dict:
    """The evaluation forward (logits) of ``config`` compiled for ``devices``, parameters in ``dtype``."""
    model = model_lib.build_model(config.model)
    mesh = sharding.make_mesh(devices)
    shapes = jax.eval_shape(functools.partial(init_variables, model, random_batch(config, 1)), jax.random.key(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cast = lambda x: jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype  # noqa: E731
    variables = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, cast(x), sharding=replicated), shapes)
    b = _abstract_batch(config, batch, mesh)
    image = jax.ShapeDtypeStruct(b["image"].shape, jnp.dtype(dtype), sharding=b["image"].sharding)
    fwd = jax.jit(for_devices(lambda v, x, t: model.apply(v, x, t, train=False)["logits"], mesh))
    row = {"what": "evaluation forward", "global_batch": batch, "devices": len(devices)}
    return _compiled_row(row, lambda: fwd.lower(variables, image, b["ids"]))[0]


def _compiled_row(row: dict, lower) -> tuple[dict, object]:
    """``row`` completed by compiling ``lower()``: compile time, peak GiB per device, kernel and attention census.
    A compile the target's memory refuses (TPU: RESOURCE_EXHAUSTED) gives the row with ``error`` and, as
    ``peak_gib``, the temporaries the compiler asked for or the HBM it used when it gave up (a lower bound);
    ``compiled`` is then None."""
    t0 = time.perf_counter()
    with record_decisions() as decisions:
        lowered = lower()
    row["attention"] = attention_rows(decisions)
    try:
        compiled, row["compiler_options"] = _compile(lowered)
    except jax.errors.JaxRuntimeError as e:
        m = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e)) or re.search(r"Used ([\d.]+)G of", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        row.update(compile_s=time.perf_counter() - t0, peak_gib=float(m.group(1)), kernels={},
                   error=str(e).splitlines()[0][:200])  # fmt: skip
        return row, None
    row.update(compile_s=time.perf_counter() - t0, peak_gib=peak_bytes(compiled) / 2**30,
               kernels=census(compiled.as_text() or ""))  # fmt: skip
    return row, compiled


# XLA:GPU without a device to autotune on can fail to tile a Triton GEMM with a small contracting dimension
# ("Couldn't find output tile sizes", e.g. the Mamba's dt_proj); a real device autotunes past it. Such a compile is
# retried with every GEMM on cuBLAS, and the row says so (its census then shows cuBLAS where the device may pick
# Triton).
_NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def _compile(lowered) -> tuple[object, dict]:
    """``(compiled, compiler options used)``: as it is, else without Triton GEMMs (above)."""
    try:
        return lowered.compile(), {}
    except jax.errors.JaxRuntimeError as e:
        if "output tile sizes" not in str(e):
            raise
    return lowered.compile(compiler_options=_NO_TRITON_GEMM), dict(_NO_TRITON_GEMM)


def largest_batch(fits, start: int, step: int, limit: int = 4096) -> int:
    """The largest multiple of ``step`` up to ``limit`` with ``fits(batch)`` (monotone), from ``start``: doubling,
    then bisection (each probe is a compile). 0 when not even ``step`` fits."""
    lo, hi = 0, None
    b = max(step, start - start % step)
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return b
            b = min(2 * b, limit)
        else:
            hi = b
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def print_table(result: dict) -> None:
    print(f"# {result['config']} on {result['target']}, {result['dtype']}; AOT (compile-only): memory and kernels")
    print("| what | remat | global batch | devices | peak GiB / device | fits | compile s | cuDNN attention | GEMMs |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in result["rows"]:
        k = r["kernels"]
        fmha = sum(v for n, v in k.items() if "fmha" in n)
        gemm = sum(v for n, v in k.items() if "gemm" in n or "cublas" in n)
        remat = f"{r['remat']} ({r['resolved_remat']})" if "remat" in r else "-"
        fits = "yes" if r["peak_gib"] * 2**30 <= result["device_memory"] and "error" not in r else "**no**"
        print(f"| {r['what']} | {remat} | {r['global_batch']} | {r['devices']} | {r['peak_gib']:.2f} | {fits} | "
              f"{r['compile_s']:.0f} | {fmha} | {gemm} |")  # fmt: skip
    if "max_batch" in result:
        print(f"largest global batch that fits ({result['max_batch']['remat']}): {result['max_batch']['batch']}")
    print("| attention (B, Tq, H, D) x Tk | dtype | calls | kernel | why |")
    print("| --- | --- | ---: | --- | --- |")
    for a in result["rows"][0]["attention"]:
        print(f"| {tuple(a['q'])} x {a['kv_len']} | {a['dtype']} | {a['calls']} | {a['chosen']} | {a['why']} |")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/wimfris_b.py:refcoco")
    p.add_argument("--batch", type=int, help="global batch (default: config.train.global_batch_size)")
    p.add_argument("--devices", type=int, default=1, help="GPUs of one host (TPU: the slice's chips)")
    p.add_argument("--remat", default="auto", help=f"comma-separated of {('auto',) + REMAT_MODES} or 'all'")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--fsdp", action="store_true", help="shard large parameters and optimiser state")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation forward")
    p.add_argument("--max-batch", action="store_true", help="bisect the largest batch that fits (first remat)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # the host runs nothing; the target only compiles
    try:
        devices, memory, description = target_devices(args.target, args.devices)
    except TargetUnavailable as e:
        sys.exit(f"benchmarks.aot: error: {e}")
    config = load_config(args.config)
    batch = args.batch or int(config.train.global_batch_size)
    modes = list(REMAT_MODES) if args.remat == "all" else args.remat.split(",")
    result = {"target": args.target, "device": description, "device_memory": memory, "config": args.config,
              "dtype": args.dtype, "jax": jax.__version__, "rows": []}  # fmt: skip
    for mode in modes:
        row, _ = compile_train(config, devices, mode, batch, args.dtype, args.fsdp)
        result["rows"].append(row)
        print(f"# compiled train step, remat {mode}: {row['peak_gib']:.2f} GiB, {row['compile_s']:.0f} s", flush=True)
    if not args.no_eval:
        result["rows"].append(compile_eval(config, devices, batch, args.dtype))
    if args.max_batch:

        def fits(b: int) -> bool:
            row, _ = compile_train(config, devices, modes[0], b, args.dtype, args.fsdp)
            print(f"# batch {b}: {row['peak_gib']:.2f} GiB", flush=True)
            return row["peak_gib"] * 2**30 <= memory and "error" not in row

        result["max_batch"] = {"remat": modes[0], "batch": largest_batch(fits, batch, len(devices))}
    print_table(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
