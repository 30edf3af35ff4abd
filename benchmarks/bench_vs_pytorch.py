"""DETRIS-B side by side: the official PyTorch code against ours, and WIMFRIS-B beside them, in one run.

    git clone https://github.com/jiaqihuang01/DETRIS /tmp/DETRIS       # the official code (no weights needed)
    python benchmarks/bench_vs_pytorch.py --detris-src /tmp/DETRIS

Two measurements per model, each in a fresh process (one framework at a time, so that neither's thread pool
spins beside the other's): the evaluation forward at batch 1 and the train step (forward, backward, Adam) at
batch 2, 448 px, float32, random weights; the figure is the minimum of ``--repeats`` timed calls after
``--warmup`` untimed ones (JAX: after compilation). Both frameworks get the same threads (``--threads``,
default: every core; torch ``set_num_threads``, XLA's CPU client uses every core it is given).

The official model is built as its ``DETRIS.__init__`` builds it, with the two weight loads replaced by random
tensors of the released shapes (a CLIP ViT-B/16 state dict for ``model.clip.build_model``, DINOv2 left at its
initialisation); the backbones are frozen and the adapters, neck, decoder and projector train, as in the
official recipe. ``loguru`` and ``fvcore`` (imported but unused by the model files) are stubbed when absent.
The official train step runs without autocast (CPU, float32), ours with ``configs/detris_b.py`` as is.

Prints one table (ms and ours / PyTorch) and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.timing import call_times  # noqa: E402

CONFIGS = {"detris_b": "configs/detris_b.py", "wimfris_b": "configs/wimfris_b.py"}
WORD_LEN, IMAGE = 17, 448


def _timed(fn, warmup: int, repeats: int) -> float:
    """Minimum wall time (s) of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return min(call_times(fn, repeats, warmup))


# ----------------------------------------------------------------------------------------------- PyTorch


def _stub_unused_imports() -> None:
    """``model/__init__.py`` imports loguru and ``model/layers.py`` fvcore; neither is used by the forward."""
    import importlib.util
    import logging
    import types

    if importlib.util.find_spec("loguru") is None:
        sys.modules["loguru"] = types.SimpleNamespace(logger=logging.getLogger("detris"))
    if importlib.util.find_spec("fvcore") is None:
        fv, nn_mod, wi = (types.ModuleType(n) for n in ("fvcore", "fvcore.nn", "fvcore.nn.weight_init"))
        fv.nn, nn_mod.weight_init = nn_mod, wi
        sys.modules.update({"fvcore": fv, "fvcore.nn": nn_mod, "fvcore.nn.weight_init": wi})


def _clip_b16_state_dict(torch) -> dict:
    """Random tensors with the shapes ``model.clip.build_model`` reads from OpenAI's ViT-B/16 (text tower whole;
    the vision tower, which DETRIS deletes, reduced to the entries that size it)."""
    width, layers, ctx, vocab = 512, 12, 77, 49408
    sd = {
        "visual.proj": torch.randn(768, 512),
        "visual.conv1.weight": torch.randn(768, 3, 16, 16),
        "visual.positional_embedding": torch.randn(197, 768),
        "text_projection": torch.randn(width, 512) * width**-0.5,
        "positional_embedding": torch.randn(ctx, width) * 0.01,
        "token_embedding.weight": torch.randn(vocab, width) * 0.02,
        "ln_final.weight": torch.ones(width),
        "ln_final.bias": torch.zeros(width),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = torch.randn(3 * width, width) * width**-0.5
    return sd


def build_official(src: str, cfg_path: str):
    """The official ``DETRIS(cfg)`` with random weights; cfg from the checkout's yaml."""
    import types

    import torch
    import yaml

    sys.path.insert(0, os.path.abspath(src))
    _stub_unused_imports()
    from model import segmenter  # the official code

    with open(os.path.join(src, cfg_path)) as f:
        raw = yaml.safe_load(f)
    cfg = types.SimpleNamespace(**{k: v for section in raw.values() for k, v in section.items()})
    sd = _clip_b16_state_dict(torch)
    real_jit_load, real_load = torch.jit.load, torch.load
    torch.jit.load = lambda *a, **k: types.SimpleNamespace(eval=lambda: types.SimpleNamespace(state_dict=lambda: sd))
    torch.load = lambda *a, **k: {}  # DINOv2 keeps its initialisation (load_state_dict(strict=False))
    try:
        model = segmenter.DETRIS(cfg)
    finally:
        torch.jit.load, torch.load = real_jit_load, real_load
    return model.float(), cfg


def run_torch(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, cfg = build_official(args.detris_src, args.detris_cfg)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    def inputs(b):
        img = torch.randn(b, 3, IMAGE, IMAGE)
        ids = torch.randint(1, 49000, (b, cfg.word_len))
        ids[:, -1] = 49407  # EOT: the largest id
        return img, ids

    img, ids = inputs(1)
    model.eval()
    with torch.no_grad():
        out["forward_s"] = _timed(lambda: model(img, ids), args.warmup, args.repeats)
    if not args.skip_train:
        img, ids = inputs(2)
        mask = (torch.rand(2, 1, 128, 128) > 0.5).float()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4)
        out["trainable"] = sum(p.numel() for p in params)

        def step():
            _, _, loss = model(img, ids, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        out["train_s"] = _timed(step, args.warmup, args.repeats)
    return out


# ----------------------------------------------------------------------------------------------------- JAX


def run_jax(args, name: str) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    from wimfris_jax import model as model_lib
    from wimfris_jax.config import load_config
    from wimfris_jax.train import optim, sharding
    from wimfris_jax.train.state import init_train_state, init_variables
    from wimfris_jax.train.step import jit_train_step, make_train_step

    config = load_config(os.path.join(ROOT, CONFIGS[name]))
    for item in args.set:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    model = model_lib.build_model(config.model)
    rng = np.random.default_rng(0)

    def batch(b):
        ids = rng.integers(1, 49000, size=(b, WORD_LEN)).astype(np.int32)
        ids[:, -1] = 49407
        return {
            "image": rng.normal(size=(b, IMAGE, IMAGE, 3)).astype(np.float32),
            "ids": ids,
            "mask": (rng.random((b, 128, 128)) > 0.5).astype(np.float32),
        }

    out = {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__}
    b1 = batch(1)
    variables = jax.jit(functools.partial(init_variables, model))(b1, jax.random.key(0))
    fwd = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False)["logits"])
    img, ids = jnp.asarray(b1["image"]), jnp.asarray(b1["ids"])
    t0 = time.perf_counter()
    fwd = fwd.lower(variables, img, ids).compile()
    out["forward_compile_s"] = time.perf_counter() - t0
    out["forward_s"] = _timed(lambda: fwd(variables, img, ids).block_until_ready(), args.warmup, args.repeats)
    variables = None  # free the forward weights before the train state
    if not args.skip_train:
        tc = config.train
        mesh = sharding.make_mesh()
        b2 = batch(2)
        tx, schedule = optim.make_optimizer(tc, steps_per_epoch=1000)
        init_fn = functools.partial(init_variables, model, {k: v[:1] for k, v in b2.items()})
        state, shardings = init_train_state(init_fn, tx, tuple(tc.trainable), 0, mesh)
        step = jit_train_step(make_train_step(model, functools.partial(model_lib.loss_fn, config.model), tx,
                                              schedule, compute_dtype=tc.compute_dtype), shardings, mesh)
        gb = sharding.shard_batch(b2, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, gb).compile()
        out["train_compile_s"] = time.perf_counter() - t0
        holder = [state]

        def run():
            holder[0], metrics = compiled(holder[0], gb)
            jax.block_until_ready(metrics)

        out["train_s"] = _timed(run, args.warmup, args.repeats)
        out["trainable"] = sum(x.size for x in jax.tree_util.tree_leaves(holder[0].params))
    return out


# ---------------------------------------------------------------------------------------------------- main


def _worker(args, which: str) -> dict:
    """Runs one measurement in a fresh interpreter and returns its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which] + args.passthrough
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench_vs_pytorch: the {which} measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detris-src", help="a checkout of github.com/jiaqihuang01/DETRIS (omit: ours only)")
    p.add_argument("--detris-cfg", default="config/refcoco/DETRIS_base.yaml", help="yaml inside --detris-src")
    p.add_argument("--models", default="detris_b,wimfris_b", help=f"ours, comma-separated: {sorted(CONFIGS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA: every core)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-train", action="store_true", help="forward only")
    p.add_argument("--set", action="append", default=[], help="config override for ours, KEY=VALUE (model.x=...)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = run_torch(args) if args.worker == "torch" else run_jax(args, args.worker)
        print(json.dumps(res))
        return

    args.passthrough = [f"--threads={args.threads}", f"--warmup={args.warmup}", f"--repeats={args.repeats}",
                        f"--detris-cfg={args.detris_cfg}"] + [f"--set={s}" for s in args.set]
    if args.skip_train:
        args.passthrough.append("--skip-train")
    if args.detris_src:
        args.passthrough.append(f"--detris-src={os.path.abspath(args.detris_src)}")
    results = {}
    if args.detris_src:
        print("timing the official DETRIS-B (PyTorch) ...", file=sys.stderr, flush=True)
        results["pytorch_detris_b"] = _worker(args, "torch")
    for name in args.models.split(","):
        print(f"timing ours, {name} ...", file=sys.stderr, flush=True)
        results[name] = _worker(args, name)

    ref = results.get("pytorch_detris_b", {})
    print(f"448 px, float32, random weights; min of {args.repeats} after {args.warmup} warm-up; "
          f"{args.threads} threads each")
    print("| model | forward b1 ms | ours / PyTorch | train step b2 ms | ours / PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = [("official DETRIS-B (PyTorch)", ref)] if ref else []
    rows += [(f"ours, {n.replace('_b', '-B').upper().replace('-B', '-B')}", results[n]) for n in args.models.split(",")]
    for label, r in rows:
        f, t = r.get("forward_s"), r.get("train_s")
        print(f"| {label} | {f * 1e3:,.0f} | {_ratio(f, ref.get('forward_s'))} | "
              f"{'-' if t is None else f'{t * 1e3:,.0f}'} | {_ratio(t, ref.get('train_s'))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
