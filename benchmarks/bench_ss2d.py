"""SS2D and VMamba-B timings, ours (jax.jit, compile excluded) beside the PyTorch reference (torch_ref/vmamba.py,
the official pure-torch scan semantics: a Python loop over the L = H * W steps).

    python -m benchmarks.bench_ss2d [--repeats 3] [--torch-threads 2] [--no-model] [--tfanet] [--no-ss2d]

Cases, float32, batch 1, at VMamba-B's shapes for a 480 x 480 image: SS2D of stage 1 (1, 120, 120, 128) and of stage 3
(1, 30, 30, 512), forward and forward+backward (gradient w.r.t. the input and every parameter), for each JAX scan
implementation; then the whole VMamba-B forward (four stage outputs) at 480 x 480. Same random weights on both sides
(converted with port_weights.vmamba). Each cell is the minimum of ``--repeats`` timed runs after one warm-up run
(benchmarks.timing.call_times); ratio = ours / torch (< 1: ours is faster). ``--tfanet`` adds the whole TFANet-B
forward (configs/tfanet_b.py's model, evaluation mode: the logits alone, batch 1, 480 px, random weights); there is
no PyTorch TFANet, so its torch and ratio columns read "-". ``--no-ss2d`` skips the SS2D cases.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import call_times
from port_weights import vmamba as port
from port_weights.common import convert
from torch_ref import vmamba as ref
from wimfris_jax.backbones import VMamba, vmamba_config
from wimfris_jax.config import load_config
from wimfris_jax.model import build_model
from wimfris_jax.ssm import SS2D

CASES = [("SS2D stage 1", (1, 120, 120, 128)), ("SS2D stage 3", (1, 30, 30, 512))]
IMPLS = ("sequential", "associative")


def _min_ms(fn, repeats: int) -> float:
    return 1e3 * min(call_times(fn, repeats, warmup=1))


def bench_ss2d(shape: tuple[int, ...], repeats: int) -> list[tuple[str, str, float, float]]:
    """[(impl, pass, ours ms, torch ms)] for one SS2D shape (VMamba-B's op: d_state 1, ssm_ratio 2, conv 3)."""
    torch.manual_seed(0)
    c = shape[-1]
    m = ref.perturb_constants(ref.SS2D(c))
    sd = {f"layers.0.blocks.0.op.{k}": v.detach().numpy() for k, v in m.state_dict().items()}
    params = convert(sd, port.rules())["layers_0"]["blocks_0"]["op"]
    r = np.random.default_rng(0)
    x, w = (r.normal(size=shape).astype(np.float32) for _ in range(2))
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)

    def torch_fwd():
        with torch.no_grad():
            m(xt)

    def torch_fwd_bwd():
        xg = xt.clone().requires_grad_(True)
        torch.autograd.grad((m(xg) * wt).sum(), [xg, *m.parameters()])

    t_fwd, t_bwd = _min_ms(torch_fwd, repeats), _min_ms(torch_fwd_bwd, repeats)
    rows = []
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    for impl in IMPLS:
        op = SS2D(c, scan_impl=impl)
        fwd = jax.jit(lambda p, v, op=op: op.apply({"params": p}, v))
        grad = jax.jit(jax.grad(lambda p, v, op=op: jnp.sum(op.apply({"params": p}, v) * wj), argnums=(0, 1)))
        rows.append((impl, "fwd", _min_ms(lambda f=fwd: jax.block_until_ready(f(params, xj)), repeats), t_fwd))
        rows.append((impl, "fwd+bwd", _min_ms(lambda g=grad: jax.block_until_ready(g(params, xj)), repeats), t_bwd))
    return rows


def bench_model(size: int, repeats: int) -> tuple[float, float]:
    """(ours ms, torch ms): the VMamba-B forward (four stage outputs) at size x size, batch 1."""
    torch.manual_seed(0)
    cfg = vmamba_config("base")
    m = ref.perturb_constants(ref.VSSM(depths=cfg["depths"], dims=cfg["dims"][0]))
    params, meta = port.convert_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
    net = VMamba(**meta["config"])
    fwd = jax.jit(lambda p, v: net.apply({"params": p}, v))
    xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ours = _min_ms(lambda: jax.block_until_ready(fwd(params, xj)), repeats)
    with torch.no_grad():
        theirs = _min_ms(lambda: m.forward_features(xt), repeats)
    return ours, theirs


def bench_tfanet(repeats: int) -> tuple[float, tuple[int, ...]]:
    """(ours ms, image shape): configs/tfanet_b.py's model forward in evaluation mode (logits only), batch 1, random
    weights (its own initialisers), a 17-token sentence with 9 real words."""
    config = load_config("configs/tfanet_b.py")
    size, word_len = int(config.model.image_size), int(config.model.word_len)
    model = build_model(config.model).clone(logits_only=True)
    images = jax.random.normal(jax.random.PRNGKey(1), (1, size, size, 3))
    ids = jnp.zeros((1, word_len), jnp.int32).at[0, :9].set(jnp.arange(9) + 300)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)["params"]
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    return _min_ms(lambda: jax.block_until_ready(fwd(params, images, ids)), repeats), images.shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ss2d", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the minimum is reported)")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-model", action="store_true", help="skip the VMamba-B forward")
    ap.add_argument("--tfanet", action="store_true", help="add the TFANet-B forward (ours alone)")
    ap.add_argument("--no-ss2d", action="store_true", help="skip the SS2D cases")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# SS2D / VMamba-B, float32, batch 1; {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; jax {jax.__version__}, torch "
        f"{torch.__version__} ({args.torch_threads} threads); min of {args.repeats} after a warm-up; load {load:.1f}"
    )
    cols = f"{'case':14s} | {'shape':19s} | {'jax scan':11s} | {'pass':7s} | {'ours ms':>8s} | {'torch ms':>8s}"
    head = f"| {cols} | ratio |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for label, shape in [] if args.no_ss2d else CASES:
        for impl, tag, ours, theirs in bench_ss2d(shape, args.repeats):
            print(
                f"| {label:14s} | {str(shape):19s} | {impl:11s} | {tag:7s} | {ours:8.1f} | {theirs:8.1f} "
                f"| {ours / theirs:5.2f} |",
                flush=True,
            )
    if not args.no_model:
        ours, theirs = bench_model(480, args.repeats)
        label, shape = "VMamba-B", "(1, 480, 480, 3)"
        print(f"| {label:14s} | {shape:19s} | {'default':11s} | {'fwd':7s} | {ours:8.1f} | {theirs:8.1f} "
              f"| {ours / theirs:5.2f} |")  # fmt: skip
    if args.tfanet:
        ours, shape = bench_tfanet(args.repeats)
        print(f"| {'TFANet-B':14s} | {str(shape):19s} | {'default':11s} | {'fwd':7s} | {ours:8.1f} | {'-':>8s} "
              f"| {'-':>5s} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
