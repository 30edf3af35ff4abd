"""Train-step throughput, compiled memory and FLOP utilisation, per rematerialisation mode.

Measures the jit-compiled train step of :mod:`wimfris_jax.train.step` on all local devices (batch over the
"data" mesh axis, params replicated or FSDP): images/s and ms/step after warm-up, the peak memory XLA's
``compiled.memory_analysis()`` reports per device, and the step's FLOPs from ``compiled.cost_analysis()``
with the utilisation they imply against a stated per-device peak.

    python benchmarks/bench_train.py                                   # configs/tiny.py
    python benchmarks/bench_train.py --config configs/wimfris_b.py --batch 32 --dtype bfloat16 --peak-tflops 989
    python benchmarks/bench_train.py --config configs/wimfris_b.py --batch 32 --dtype bfloat16 --remat all \
        --compile-only                                                 # peak memory per remat mode, no step run

``--remat all`` compiles the step once per ``train.remat`` mode (none, block, dots) and prints their peaks
(with ``--compile-only`` nothing runs: on CPU this is how the accelerator batch is sized). XLA:CPU normally
expands the optimisation barriers that keep rematerialisation in place and then merges the recomputation with
the forward pass, so remat would save nothing in a CPU compile; ``--compile-only`` on a CPU host therefore
compiles with ``--xla_disable_hlo_passes=cse_barrier_expander`` (rematerialisation then holds as on GPU/TPU).
One difference remains: XLA:CPU computes bfloat16 matrix products in float32, so a CPU compile overstates a
bf16 accelerator's peak. ``--peak-tflops``
defaults by device kind (dense bf16 / fp32 figures of the data sheets: H100 SXM 989 / 67, H200 989 / 67, A100
312 / 19.5); on CPU give it yourself or the utilisation column is left empty.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

if "--compile-only" in sys.argv and not any(
    importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
):  # before any backend starts: keep XLA:CPU from undoing rematerialisation (module docstring)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes=cse_barrier_expander".strip()

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wimfris_jax import model as model_lib  # noqa: E402
from wimfris_jax.config import load_config  # noqa: E402
from wimfris_jax.layers import REMAT_MODES  # noqa: E402
from wimfris_jax.train import optim, sharding  # noqa: E402
from wimfris_jax.train.state import init_train_state, init_variables, train_state_shapes  # noqa: E402
from wimfris_jax.train.step import jit_train_step, make_train_step  # noqa: E402

PEAK_TFLOPS = {  # per device, dense: (bfloat16, float32)
    "H100": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
}


def model_and_config(args, remat: str = "none"):
    """(model, loss_fn, config) of ``--config`` (default configs/tiny.py)."""
    config = load_config(args.config or os.path.join(ROOT, "configs", "tiny.py"))
    return *model_lib.training_model(config, remat), config


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    d, r = config.data, np.random.default_rng(seed)
    s, m = int(d.image_size), int(d.mask_size)
    return {
        "image": r.normal(size=(batch_size, s, s, 3)).astype(np.float32),
        "ids": r.integers(1, 30, size=(batch_size, int(d.word_len))).astype(np.int32),
        "mask": (r.random((batch_size, m, m)) > 0.5).astype(np.float32),
    }


def peak_tflops(args, dtype: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name in kind:
            return bf16 if dtype == "bfloat16" else fp32
    return None


def peak_bytes(compiled) -> int | None:
    """Peak device memory of a compiled executable: arguments + outputs - aliased + temporaries (XLA)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def compile_step(args, remat: str):
    """(compiled step, state, sharded batch, config, dtype, global batch, init s, compile s)."""
    model, loss_fn, config = model_and_config(args, remat)
    tc = config.train
    dtype = args.dtype or tc.get("compute_dtype", "float32")
    gbs = args.batch or int(tc.global_batch_size)
    mesh = sharding.make_mesh()
    batch = random_batch(config, gbs)
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch=1000)
    t0 = time.perf_counter()
    init_fn = functools.partial(init_variables, model, {k: v[:1] for k, v in batch.items()})
    make_state = train_state_shapes if args.compile_only else init_train_state  # shapes: nothing allocated
    trainable = model_lib.trainable_patterns(config)
    state, shardings = make_state(init_fn, tx, trainable, 0, mesh, fsdp=args.fsdp, fsdp_min_size=2**18)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    step = jit_train_step(make_train_step(model, loss_fn, tx, schedule, compute_dtype=dtype), shardings, mesh)
    global_batch = (
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        if args.compile_only
        else sharding.shard_batch(batch, mesh)
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, global_batch).compile()
    return compiled, state, global_batch, config, dtype, gbs, mesh, t_init, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file with get_config() (default: configs/tiny.py)")
    p.add_argument("--batch", type=int, help="global batch size (default: config.train.global_batch_size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: from config)")
    p.add_argument("--fsdp", action="store_true", help="shard large params over the data axis")
    p.add_argument("--remat", default="none", choices=REMAT_MODES + ("all",), help="train.remat mode(s)")
    p.add_argument("--compile-only", action="store_true", help="compile and report memory/FLOPs, run nothing")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, help="per-device peak TFLOP/s for the utilisation column")
    args = p.parse_args()

    modes = REMAT_MODES if args.remat == "all" else (args.remat,)
    print("| remat | devices | global batch, dtype | compile s | peak MiB per device (XLA) | GFLOP / step / device "
          "| step ms | images/s | TFLOP/s per device | of peak |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        compiled, state, global_batch, config, dtype, gbs, mesh, t_init, t_compile = compile_step(args, mode)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")  # per device (SPMD program)
        peak = peak_bytes(compiled)
        dt = None
        if not args.compile_only:
            for _ in range(args.warmup):
                state, metrics = compiled(state, global_batch)
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, global_batch)
            jax.block_until_ready(metrics)
            dt = (time.perf_counter() - t0) / args.steps
        peak_tf = peak_tflops(args, dtype)
        achieved = flops / dt / 1e12 if dt else None
        devices = f"{mesh.size} x {jax.devices()[0].device_kind}"
        cells = [
            mode, devices, f"{gbs}, {dtype}", f"{t_compile:.1f}", "n/a" if peak is None else f"{peak / 2**20:,.0f}",
            f"{flops / 1e9:,.1f}", "-" if dt is None else f"{dt * 1e3:,.1f}", "-" if dt is None else f"{gbs / dt:.1f}",
            "-" if achieved is None else f"{achieved:.3f}",
            "-" if achieved is None or not peak_tf else f"{achieved / peak_tf:.1%} of {peak_tf}",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |", flush=True)
        del compiled, state


if __name__ == "__main__":
    main()
