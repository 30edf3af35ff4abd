"""Train-step throughput, compiled memory and FLOP utilisation.

Measures the jit-compiled train step of :mod:`wimfris_jax.train.step` on all local devices (batch over the
"data" mesh axis, params replicated or FSDP): images/s and ms/step after warm-up, the peak memory XLA's
``compiled.memory_analysis()`` reports per device, and the step's FLOPs from ``compiled.cost_analysis()``
with the utilisation they imply against a stated per-device peak.

    python benchmarks/bench_train.py                                   # toy model (tests/toy_model.py)
    python benchmarks/bench_train.py --config configs/wimfris_b.py --batch 32 --dtype bfloat16 --peak-tflops 989

``--peak-tflops`` defaults by device kind (dense bf16 / fp32 figures of the data sheets: H100 SXM 989 / 67,
H200 989 / 67, A100 312 / 19.5); on CPU give it yourself or the utilisation column is left empty.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wimfris_jax.train import optim, sharding  # noqa: E402
from wimfris_jax.train.state import init_train_state, init_variables  # noqa: E402
from wimfris_jax.train.step import jit_train_step, make_train_step  # noqa: E402

PEAK_TFLOPS = {  # per device, dense: (bfloat16, float32)
    "H100": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_and_config(args):
    """(model, loss_fn, config); the toy model when no --config is given."""
    if args.config:
        from wimfris_jax import model as model_lib

        config = load_config(args.config)
        return model_lib.build_model(config.model), functools.partial(model_lib.loss_fn, config.model), config
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import toy_model

    config = toy_model.toy_config()
    config.data.image_size, config.data.mask_size = args.image_size, args.image_size // 2
    return toy_model.ToyModel(width=args.toy_width), toy_model.toy_loss, config


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file with get_config() (default: the toy model)")
    p.add_argument("--batch", type=int, help="global batch size (default: config.train.global_batch_size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: from config)")
    p.add_argument("--fsdp", action="store_true", help="shard large params over the data axis")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, help="per-device peak TFLOP/s for the utilisation column")
    p.add_argument("--image-size", type=int, default=64, help="toy model only")
    p.add_argument("--toy-width", type=int, default=32, help="toy model only")
    args = p.parse_args()

    model, loss_fn, config = model_and_config(args)
    tc = config.train
    dtype = args.dtype or tc.get("compute_dtype", "float32")
    gbs = args.batch or int(tc.global_batch_size)
    mesh = sharding.make_mesh()
    batch = random_batch(config, gbs)
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch=1000)
    t0 = time.perf_counter()
    init_fn = functools.partial(init_variables, model, {k: v[:1] for k, v in batch.items()})
    state, shardings = init_train_state(init_fn, tx, tuple(tc.trainable), 0, mesh, fsdp=args.fsdp, fsdp_min_size=2**18)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    step = jit_train_step(make_train_step(model, loss_fn, tx, schedule, compute_dtype=dtype), shardings, mesh)
    global_batch = sharding.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, global_batch).compile()
    t_compile = time.perf_counter() - t0

    for _ in range(args.warmup):
        state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / args.steps

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")  # per device (SPMD program)
    mem = compiled.memory_analysis()
    peak_bytes = None
    if mem is not None:
        peak_bytes = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        )
    n_dev = mesh.size
    peak = peak_tflops(args, dtype)
    achieved = flops / dt / 1e12  # per device
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(state.frozen))

    rows = [
        ("model", args.config or f"toy (width {args.toy_width}, {args.image_size}px)"),
        ("devices", f"{n_dev} x {jax.devices()[0].device_kind}"),
        ("params trainable / frozen", f"{n_train:,} / {n_frozen:,}"),
        ("global batch, dtype, fsdp", f"{gbs}, {dtype}, {args.fsdp}"),
        ("init / compile (s)", f"{t_init:.1f} / {t_compile:.1f}"),
        ("step (ms)", f"{dt * 1e3:.2f}"),
        ("images/s", f"{gbs / dt:.1f}"),
        ("peak memory per device (MiB, XLA)", "n/a" if peak_bytes is None else f"{peak_bytes / 2**20:.1f}"),
        ("GFLOP per step per device (XLA)", f"{flops / 1e9:.2f}"),
        ("achieved TFLOP/s per device", f"{achieved:.3f}"),
        ("utilisation of stated peak", "n/a (give --peak-tflops)" if not peak else f"{achieved / peak:.1%} of {peak}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
