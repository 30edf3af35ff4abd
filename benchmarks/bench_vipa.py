"""VIPA-B forward timings on this machine, and its two backbones beside their Hugging Face PyTorch models.

    python -m benchmarks.bench_vipa [--repeats 3] [--torch-threads 2] [--no-backbones]

Rows, float32, batch 1, 480 x 480, 21 tokens: Swin-B (window 12; stage outputs before merging) and BERT-base, ours
(jax.jit, compile excluded) beside transformers' ``SwinModel`` / ``BertModel`` with the same random weights
(converted with port_weights), ratio = ours / torch (< 1: ours is faster); then the whole VIPA-B forward
(configs/vipa_b.py's model, evaluation mode: the logits alone, random weights), ours alone (there is no PyTorch VIPA),
and its FLOPs by XLA's cost analysis beside the paper's 431 GFLOPs.
Each cell is the minimum of ``--repeats`` timed runs after one warm-up (benchmarks.timing.call_times).
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
from port_weights import bert as port_bert
from port_weights import swin as port_swin
from wimfris_jax.backbones.bert import Bert
from wimfris_jax.backbones.swin import Swin
from wimfris_jax.config import load_config
from wimfris_jax.model import build_model

SIZE, WORDS = 480, 21


def _min_ms(fn, repeats: int) -> float:
    return 1e3 * min(call_times(fn, repeats, warmup=1))


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def bench_swin(repeats: int) -> tuple[float, float]:
    """(ours ms, torch ms): Swin-B window 12 at 480 px."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=SIZE, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12)
    m = SwinModel(cfg, add_pooling_layer=False).eval()
    params, meta = port_swin.convert_state_dict(_state_dict(m))
    x = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    net = Swin(**meta["config"])
    fwd = jax.jit(lambda p, v: net.apply({"params": p}, v))
    xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ours = _min_ms(lambda: jax.block_until_ready(fwd(params, xj)), repeats)
    with torch.no_grad():
        theirs = _min_ms(lambda: m(pixel_values=xt), repeats)
    return ours, theirs


def bench_bert(repeats: int) -> tuple[float, float]:
    """(ours ms, torch ms): BERT-base, 21 tokens, 12 of them words."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(), add_pooling_layer=False).eval()
    params, meta = port_bert.convert_state_dict(_state_dict(m))
    ids = np.zeros((1, WORDS), np.int64)
    ids[0, :12] = np.arange(12) + 1000
    net = Bert(**meta["config"])
    fwd = jax.jit(lambda p, t: net.apply({"params": p}, t))
    ij, it = jnp.asarray(ids, jnp.int32), torch.from_numpy(ids)
    ours = _min_ms(lambda: jax.block_until_ready(fwd(params, ij)), repeats)
    with torch.no_grad():
        theirs = _min_ms(lambda: m(input_ids=it, attention_mask=(it != 0).long()), repeats)
    return ours, theirs


def bench_vipa(repeats: int) -> tuple[float, float]:
    """(ours ms, XLA's GFLOPs): configs/vipa_b.py's model forward in evaluation mode (logits only), random weights;
    the FLOPs are XLA's cost analysis of the compiled forward (a multiply-add counts 2; the paper does not say how
    its 431 GFLOPs count, and fvcore-style counters report multiply-adds)."""
    config = load_config("configs/vipa_b.py")
    model = build_model(config.model).clone(logits_only=True)
    images = jax.random.normal(jax.random.PRNGKey(1), (1, SIZE, SIZE, 3))
    ids = jnp.zeros((1, WORDS), jnp.int32).at[0, :12].set(jnp.arange(12) + 1000)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)["params"]
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    cost = fwd.lower(params, images, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return _min_ms(lambda: jax.block_until_ready(fwd(params, images, ids)), repeats), cost["flops"] / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_vipa", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the minimum is reported)")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-backbones", action="store_true", help="only the VIPA-B forward")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# VIPA-B, float32, batch 1, {SIZE} px, {WORDS} tokens; {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, torch {torch.__version__} ({args.torch_threads} threads); min of {args.repeats} "
        f"after a warm-up; load {load:.1f}"
    )
    print("| model     | ours ms | torch ms | ratio |")
    print("|-----------|---------|----------|-------|")
    if not args.no_backbones:
        for name, fn in (("Swin-B", bench_swin), ("BERT-base", bench_bert)):
            ours, theirs = fn(args.repeats)
            print(f"| {name:9s} | {ours:7.1f} | {theirs:8.1f} | {ours / theirs:5.2f} |", flush=True)
    ms, gflops = bench_vipa(args.repeats)
    print(f"| {'VIPA-B':9s} | {ms:7.1f} | {'-':>8s} | {'-':>5s} |")
    print(f"VIPA-B forward: {gflops:.0f} GFLOPs by XLA's count ({gflops / 2:.0f} G multiply-adds); paper: 431 GFLOPs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
