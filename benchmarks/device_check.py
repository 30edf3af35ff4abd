"""One-shot accelerator check: one table, one JSON, under 8 minutes on one GPU.

    python benchmarks/device_check.py                       # on the GPU/TPU host; writes device_check.json
    python benchmarks/device_check.py --smoke               # tiny sizes on CPU in seconds (the test suite runs it)

Sections (each timed after compilation, each guarded: an error or an exhausted ``--budget-s`` is recorded in the
JSON and the run goes on):

0. ``cudnn``: which calls ``jax.nn.dot_product_attention(implementation="cudnn")`` accepts on this device and JAX
   (sequence lengths, head sizes, no mask / causal / boolean mask / key lengths, forward and gradient), with
   fwd+bwd ms of the DINOv2-length cases beside XLA's -- the facts behind ``wimfris_jax.attention``'s rules.
1. ``scan``: :func:`wimfris_jax.ssm.selective_scan`, every implementation, forward and forward+backward, at the
   MTA (2, 17, 336, 16) and WMF (128, 18, 1024, 16) shapes -- the measurement behind the scan's backend default.
2. ``attention``: DINOv2-B/14-reg4 forward at 448 px, batch 32, bfloat16, for each attention implementation
   (xla, cudnn, chunked; :mod:`wimfris_jax.attention`).
3. ``train``: the WIMFRIS-B and DETRIS-B train step at global batch 32, bfloat16, ``train.remat="auto"``: ms/step,
   images/s, XLA's compiled peak memory, achieved TFLOP/s (XLA's FLOP count) and MFU against the data-sheet peak.
   A model whose step fails to compile with ``model.attention="auto"`` is recorded with its error and measured
   again with ``"xla"``.
4. ``eval``: the evaluation forward of both models at batch 32, bfloat16: images/s.

``--smoke`` runs the same code at tiny sizes (configs/tiny.py cut to 2 blocks and a DETRIS of the same sizes,
2 images, small scans; XLA's backend optimisation off) so that the script cannot rot between device loans:
tests/commands/test_benchmarks.py runs it (about a minute on 2 CPU cores, nearly all of it compilation).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_scan import _inputs as scan_inputs  # noqa: E402
from benchmarks.bench_train import PEAK_TFLOPS, peak_bytes, random_batch  # noqa: E402
from benchmarks.timing import call_times  # noqa: E402
from wimfris_jax import model as model_lib  # noqa: E402
from wimfris_jax.attention import IMPLEMENTATIONS  # noqa: E402
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config  # noqa: E402
from wimfris_jax.config import load_config  # noqa: E402
from wimfris_jax.layers import resolve_remat  # noqa: E402
from wimfris_jax.platform import platform_of  # noqa: E402
from wimfris_jax.ssm import scan as scan_lib  # noqa: E402
from wimfris_jax.train import optim, sharding  # noqa: E402
from wimfris_jax.train.state import init_train_state, init_variables  # noqa: E402
from wimfris_jax.train.step import cast_floats, jit_train_step, make_train_step  # noqa: E402

SCAN_SHAPES = {"MTA": (2, 17, 336, 16), "WMF": (128, 18, 1024, 16)}
SMOKE_SCAN_SHAPES = {"MTA": (2, 17, 32, 4), "WMF": (8, 18, 64, 4)}
MODELS = {"WIMFRIS-B": "configs/wimfris_b.py", "DETRIS-B": "configs/detris_b.py"}


def timed(fn: Callable, *args: object, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn(*args)`` (waited for) after one warm-up call."""
    return statistics.median(call_times(lambda: jax.block_until_ready(fn(*args)), repeats))


def data_sheet_peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name in kind:
            return bf16 if dtype == "bfloat16" else fp32
    return None


SMOKE_CONFIGS = {"WIMFRIS-B": "configs/tiny.py", "DETRIS-B": "configs/detris_tiny.py"}


def smoke_config(name: str):
    """The tiny config of ``name`` (configs/tiny.py, configs/detris_tiny.py) cut to 2 blocks per backbone and one
    adapter each: every part of the real models, compiled in seconds."""
    config = load_config(os.path.join(ROOT, SMOKE_CONFIGS[name]))
    m = config.model
    m.vision.depth, m.text.depth, m.neck_taps = 2, 2, (0,) if name == "WIMFRIS-B" else (0, 0)
    m.text_adapter.layers, m.vision_adapter.layers = (1,), (1,)
    return config


# ----------------------------------------------------------------------------------------------------- sections


def _cudnn_call(q, k, v, mask_kind: str, impl: str):
    """One ``jax.nn.dot_product_attention`` call; ``mask_kind``: none | causal | bool | kv_lengths | padded:N (the
    first N positions of q and k are real: query and key lengths both N)."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    kw: dict = {}
    if mask_kind == "causal":
        kw["is_causal"] = True
    elif mask_kind == "bool":
        kw["mask"] = jnp.ones((b, 1, t, s), bool).at[:, :, :, -1].set(False)
    elif mask_kind == "kv_lengths":
        kw["key_value_seq_lengths"] = jnp.full((b,), s - 1, jnp.int32)
    elif mask_kind.startswith("padded:"):
        n = int(mask_kind.split(":")[1])
        kw["query_seq_lengths"] = kw["key_value_seq_lengths"] = jnp.full((b,), n, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw)


def section_cudnn(args) -> list[dict]:
    """Which cuDNN fused-attention calls this JAX accepts here, forward and under ``jax.grad``; timed (fwd+bwd) at
    DINOv2-B's shape for XLA, cuDNN unpadded and cuDNN on 1,029 tokens padded to 1,032 / 1,040 / 1,088."""
    rows: list[dict] = []
    rng = np.random.default_rng(0)

    def qkv(b, t, s, h, d):
        return [jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.bfloat16) for n in (t, s, s)]

    def fns(mask_kind, impl):
        fwd = jax.jit(lambda q, k, v: _cudnn_call(q, k, v, mask_kind, impl))
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_cudnn_call(q, k, v, mask_kind, impl).astype(jnp.float32)),
                                argnums=(0, 1, 2)))  # fmt: skip
        return fwd, grad

    lengths = [(17, 17), (1029, 1029)] if args.smoke else [(17, 17), (18, 18), (1029, 1029), (1030, 1030),
                                                           (1024, 1024), (1024, 17), (1024, 18), (1024, 256)]
    cases = [(t, s, 64, m) for t, s in lengths for m in ("none", "causal", "bool", "kv_lengths") if m != "causal"
             or t == s] + [(1024, 1024, d, "none") for d in (12, 16, 96, 128, 256)] + [(1040, 1040, 64, "padded:1029")]
    for t, s, d, mask_kind in cases:
        fwd, grad = fns(mask_kind, "cudnn")
        q, k, v = qkv(2, t, s, 4, d)
        row = {"q_len": t, "kv_len": s, "head_dim": d, "mask": mask_kind}
        for mode, fn in (("fwd", fwd), ("grad", grad)):
            try:
                jax.block_until_ready(fn(q, k, v))
                row[mode] = "ok"
            except Exception as e:
                row[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    b, h = (2, 2) if args.smoke else (args.batch, 12)
    for label, impl, t, mask_kind in [("xla 1029", "xla", 1029, "none"), ("cudnn 1029", "cudnn", 1029, "none"),
                                      ("cudnn 1032 (pad)", "cudnn", 1032, "padded:1029"),
                                      ("cudnn 1040 (pad)", "cudnn", 1040, "padded:1029"),
                                      ("cudnn 1088 (pad)", "cudnn", 1088, "padded:1029")]:  # fmt: skip
        fwd, grad = fns(mask_kind, impl)
        q, k, v = qkv(b, t, t, h, 64)
        row = {"timed": label, "shape": (b, t, h, 64)}
        try:
            row["fwd_ms"] = 1e3 * timed(fwd, q, k, v, repeats=args.repeats)
            row["fwd_bwd_ms"] = 1e3 * timed(grad, q, k, v, repeats=args.repeats)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def section_scan(args) -> list[dict]:
    rows = []
    shapes = SMOKE_SCAN_SHAPES if args.smoke else SCAN_SHAPES
    for label, shape in shapes.items():
        x = {k: jnp.asarray(v) for k, v in scan_inputs(*shape).items()}
        w = jnp.asarray(np.random.default_rng(1).normal(size=shape[:3]).astype(np.float32))
        for impl in scan_lib.IMPLS:
            fwd = jax.jit(lambda a, impl=impl: scan_lib.selective_scan(**a, delta_softplus=True, impl=impl))
            bwd = jax.jit(jax.grad(lambda a, w, f=fwd: jnp.sum(f(a) * w)))
            row = {"case": label, "shape": shape, "impl": impl}
            row["fwd_ms"] = 1e3 * timed(fwd, x, repeats=args.repeats)
            row["fwd_bwd_ms"] = 1e3 * timed(bwd, x, w, repeats=args.repeats)
            rows.append(row)
    return rows


def section_attention(args) -> list[dict]:
    rows = []
    batch, size = (2, 56) if args.smoke else (args.batch, 448)
    cfg = dinov2_config("b14_reg4")
    if args.smoke:
        cfg.update(width=64, depth=2, num_heads=2)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.bfloat16)
    params = None
    for impl in IMPLEMENTATIONS:
        model = DinoV2(**cfg, attention=impl)
        if params is None:
            params = cast_floats(jax.jit(model.init)(jax.random.key(0), images[:1])["params"], jnp.bfloat16)
        fwd = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)["last_hidden_state"])
        row = {"model": "DINOv2-B/14-reg4" if not args.smoke else "DINOv2 (smoke)", "batch": batch, "image": size,
               "dtype": "bfloat16", "attention": impl}  # fmt: skip
        try:
            s = timed(fwd, params, images, repeats=args.repeats)
            row.update(ms=1e3 * s, images_per_s=batch / s)
        except Exception as e:  # cudnn off a GPU, or outside its dtype/shape rules: recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def _model(args, name: str, attention: str = "auto"):
    config = smoke_config(name) if args.smoke else load_config(os.path.join(ROOT, MODELS[name]))
    config.model.attention = attention
    return config, model_lib.build_model(config.model, remat_mode=config.train.get("remat", "auto"))


def _with_fallback(measure: Callable[[str, str], dict], name: str) -> list[dict]:
    """``measure(name, attention)`` with "auto"; if that raises, the error row and a second try with "xla"."""
    try:
        return [measure(name, "auto")]
    except Exception as e:  # a lowering refusal on this device: recorded, then the model is measured without it
        error = {"model": name, "attention": "auto", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        return [error, measure(name, "xla")]


def _train_row(args, name: str, attention: str) -> dict:
    config, model = _model(args, name, attention)
    gbs = 2 if args.smoke else args.batch
    tc = config.train
    mesh = sharding.make_mesh(jax.devices()[:1] if args.smoke else None)
    batch = random_batch(config, gbs)
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch=1000)
    init_fn = functools.partial(init_variables, model, {k: v[:1] for k, v in batch.items()})
    state, shardings = init_train_state(init_fn, tx, model_lib.trainable_patterns(config), 0, mesh)
    loss_fn = functools.partial(model_lib.loss_fn, config.model)
    step = jit_train_step(make_train_step(model, loss_fn, tx, schedule, compute_dtype=args.dtype), shardings, mesh)
    gb = sharding.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, gb).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run(c=compiled, h=holder, b=gb):
        h[0], metrics = c(h[0], b)
        return metrics

    s = timed(run, repeats=args.repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    peak = data_sheet_peak(args.dtype)
    tflops = flops / s / 1e12
    hlo = compiled.as_text() or ""
    return {
        "model": name, "attention": attention, "global_batch": gbs, "dtype": args.dtype,
        "remat": resolve_remat(model.image_encoder.remat_mode, platform_of(mesh)), "devices": mesh.size,
        "compile_s": compile_s,
        "ms_per_step": 1e3 * s, "images_per_s": gbs / s,
        "peak_memory_gib": None if peak_bytes(compiled) is None else peak_bytes(compiled) / 2**30,
        "gflop_per_step_per_device": flops / 1e9, "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None, "data_sheet_tflops": peak,
        "cudnn_attention_calls": hlo.count('custom_call_target="__cudnn$fmha'),
    }  # fmt: skip


def section_train(args) -> list[dict]:
    return [row for name in MODELS for row in _with_fallback(functools.partial(_train_row, args), name)]


def _eval_row(args, name: str, attention: str) -> dict:
    config, model = _model(args, name, attention)
    b = 2 if args.smoke else args.batch
    batch = random_batch(config, b)
    variables = jax.jit(functools.partial(init_variables, model))(batch, jax.random.key(0))
    variables = cast_floats(variables, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    images = jnp.asarray(batch["image"], variables["params"]["projector"]["txt"]["kernel"].dtype)
    fwd = jax.jit(lambda v, x, t, m=model: m.apply(v, x, t, train=False)["logits"])
    s = timed(fwd, variables, images, batch["ids"], repeats=args.repeats)
    return {"model": name, "attention": attention, "batch": b, "dtype": args.dtype, "ms": 1e3 * s,
            "images_per_s": b / s}


def section_eval(args) -> list[dict]:
    return [row for name in MODELS for row in _with_fallback(functools.partial(_eval_row, args), name)]


SECTIONS = {
    "cudnn": section_cudnn, "scan": section_scan, "attention": section_attention, "train": section_train,
    "eval": section_eval,
}  # fmt: skip


def print_table(results: dict) -> None:
    print("| section | case | ms | images/s | memory GiB | TFLOP/s | MFU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for section, rows in results["sections"].items():
        if isinstance(rows, dict):  # skipped or failed
            print(f"| {section} | {rows.get('error') or rows.get('skipped')} | | | | | |")
            continue
        for r in rows:
            if section == "cudnn":
                if "timed" in r:
                    case = f"attention fwd / fwd+bwd, {r['timed']} {tuple(r['shape'])}"
                    ms = r.get("error") or f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f}"
                else:
                    case = f"cudnn accepts Q {r['q_len']} KV {r['kv_len']} D {r['head_dim']} mask {r['mask']}?"
                    ms = f"fwd {r['fwd'][:40]}; grad {r['grad'][:40]}"
            elif section == "scan":
                case = f"{r['case']} {tuple(r['shape'])} {r['impl']} (fwd / fwd+bwd)"
                ms = f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f}"
            elif section == "attention":
                case = f"{r['model']} b{r['batch']} {r['image']}px {r['dtype']} attention={r['attention']}"
                ms = r.get("error", fmt(r.get("ms"), ".1f"))
            elif section == "train":
                case = (f"{r['model']} train step, global batch {r.get('global_batch')}, {r.get('dtype')}, "
                        f"remat={r.get('remat')}, attention={r['attention']} ({r.get('cudnn_attention_calls')} cuDNN)")
                ms = r.get("error") or fmt(r["ms_per_step"], ".1f")
            else:
                case = f"{r['model']} evaluation forward, batch {r.get('batch')}, {r.get('dtype')}, {r['attention']}"
                ms = r.get("error") or fmt(r["ms"], ".1f")
            print(f"| {section} | {case} | {ms} | {fmt(r.get('images_per_s'), '.1f')} | "
                  f"{fmt(r.get('peak_memory_gib'), '.1f')} | {fmt(r.get('tflops_per_device'), '.1f')} | "
                  f"{fmt(r.get('mfu'), '.1%')} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU in seconds")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/device_check.json or ./device_check.json)")
    p.add_argument("--batch", type=int, default=32, help="global batch of the attention, train and eval rows")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=420.0, help="sections that would start after this are skipped")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    out = args.out or os.path.join(os.environ.get("OUT", "."), "device_check.json")
    start = time.perf_counter()
    dev = jax.devices()[0]
    results = {
        "device": f"{len(jax.devices())} x {dev.device_kind}", "backend": jax.default_backend(),
        "jax": jax.__version__, "host": platform.node(), "smoke": args.smoke, "sections": {},
    }  # fmt: skip
    print(f"# device check: {results['device']} ({results['backend']}), jax {jax.__version__}", flush=True)
    for name in args.sections.split(","):
        if time.perf_counter() - start > args.budget_s:
            results["sections"][name] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            results["sections"][name] = SECTIONS[name](args)
        except Exception as e:  # one failing section must not cost the others their device time
            results["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()}
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        with open(out, "w") as f:  # after every section: a killed run keeps what it measured
            json.dump(results, f, indent=1, default=str)
    results["wall_s"] = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print_table(results)
    print(f"# wall {results['wall_s']:.0f} s; JSON: {out}")
    return results


if __name__ == "__main__":
    if "--smoke" in sys.argv:  # before the backend starts: smoke runs want fast compiles, not fast code
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    main()
