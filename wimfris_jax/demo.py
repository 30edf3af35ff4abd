"""``wimfris demo``: the offline end-to-end run -- train, evaluate, draw, predict -- on the synthetic shapes set.

Trains the WIMFRIS architecture at toy sizes (configs/demo.py) from scratch on ``data_pipeline.synthetic``
(coloured shapes; sentences like 'the leftmost red object'), on CPU, then:

1. scores the validation set (DETRIS protocol, :mod:`wimfris_jax.evaluate`) twice: with the true sentences,
   and with each sentence swapped for one that names *another* object of the same image. A model that reads
   the sentence scores high on the first and low on the second; one that ignores it (e.g. segments the most
   salient object) scores about the same on both. Target: mIoU >= 0.6 true, swapped <= half of that;
2. draws a grid of validation predictions (image | prediction | ground truth, with the sentence) to
   ``<workdir>/demo_grid.png``;
3. leaves a checkpoint in ``<workdir>`` that ``wimfris predict`` loads, sample images in ``<workdir>/samples``
   and the figures in ``<workdir>/demo_results.json``.

Backbones: trained, not frozen (``config.train.trainable = (".*",)``, a demo-only setting). WIMFRIS freezes
its backbones because they are *pretrained* (CLIP, DINOv2) and only adapters need to learn; offline no
pretrained weights exist, and frozen random backbones are fixed random projections: the text tower would
map every word through a random embedding and random attention that no adapter can undo cheaply, and the
vision tower's random patch features blur colour and shape. Training them adds few FLOPs (the backward pass
runs through both towers anyway to reach the MTA / MSA adapters inside them) and makes the demo learn within
its CPU budget; the architecture and losses are unchanged. See configs/demo.py for the sizes chosen and the
measurements behind them.

``--quick`` runs the same pipeline with a smaller model, few steps and a small validation set: a smoke test with no
quality target, which reports what it proved instead (it trained and the loss fell, it evaluated, it wrote a
checkpoint that fits the model ``wimfris predict`` builds).

Each demo config has its own default workdir (:func:`default_workdir`: ``wimfris_demo``, ``wimfris_demo_tfanet``,
``wimfris_demo_vipa``; ``_quick`` added for smoke runs), so the README's demo commands run one after another. A
workdir that already holds a demo run is refused with the ways on: ``--resume`` (continue an interrupted run, or
score a finished one again), remove it, or another ``--workdir``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from configs import demo as demo_configs
from data_pipeline.preprocess import preprocess_eval
from data_pipeline.sources import build_source
from wimfris_jax import model as model_lib
from wimfris_jax.checkpoints import check_variables, expected_variables, read_checkpoint
from wimfris_jax.checkpoints.runs import committed_steps
from wimfris_jax.config import apply_overrides, load_config
from wimfris_jax.config_check import validate
from wimfris_jax.errors import UserError
from wimfris_jax.evaluate import data_settings, evaluate
from wimfris_jax.inference import forward_fn, predict_batch
from wimfris_jax.metrics import format_table, intersection_union
from wimfris_jax.train.logging import read_metrics
from wimfris_jax.train.loop import train
from wimfris_jax.train.workdir import hold_workdir
from wimfris_jax.visualize import grid, save_png

GRID_EXAMPLES = 8
SAMPLES = 4


def default_workdir(config: str | None = None, quick: bool = False) -> str:
    """``wimfris_demo`` for WIMFRIS's demo (configs/demo.py), ``wimfris_demo_<name>`` for another demo config
    (configs/tfanet_tiny.py -> ``wimfris_demo_tfanet``), ``_quick`` appended for the smoke run."""
    stem = os.path.splitext(os.path.basename(str(config).split(":")[0]))[0] if config else "demo"
    stem = stem[: -len("_tiny")] if stem.endswith("_tiny") else stem
    return ("wimfris_demo" if stem == "demo" else f"wimfris_demo_{stem}") + ("_quick" if quick else "")


def existing_run(workdir: str, quick: bool, config: str | None) -> str | None:
    """The one-line refusal for a workdir that already holds a demo run, naming the ways on; None if it holds none."""
    steps = committed_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
        return None
    again = "wimfris demo" + (" --quick" if quick else "") + (f" --config {config}" if config else "")
    return (
        f"{workdir} already holds a demo run (checkpoint at step {steps[-1]}): `{again} --workdir {workdir} --resume` "
        f"continues it (or scores it again), `rm -r {workdir}` starts over, `--workdir NEW_DIR` runs beside it"
    )


def smoke_checks(workdir: str, model: Any, config: Any) -> dict[str, Any]:
    """What a quick run proved: the training loss of its first and last logged steps (metrics.jsonl) and that its
    checkpoint fits the model the config builds (what ``wimfris predict`` loads); "line" says it in one line."""
    losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    variables, meta = read_checkpoint(workdir)
    check_variables(variables, expected_variables(model, config.model), workdir, "the demo config")
    fell = bool(losses) and losses[-1] < losses[0]
    line = (
        f"smoke run (no quality target at this size): trained {meta['step']} steps, training loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f} ({'fell' if fell else 'did not fall'}); evaluated with the true and "
        f"the swapped sentences; checkpoint at step {meta['step']} fits the model `wimfris predict` builds"
    )
    return {"loss_first": losses[0], "loss_last": losses[-1], "loss_fell": fell, "checkpoint_step": meta["step"],
            "line": line}  # fmt: skip


def demo_config(quick: bool = False, config: str | None = None) -> Any:
    """``get_config`` of configs/demo.py (the installed ``configs`` package) or of the config file ``config`` (e.g.
    configs/tfanet_tiny.py), with the argument "quick" for the smoke run."""
    path = config or demo_configs.__file__
    return load_config(f"{path}:quick" if quick else path)


def _predict_examples(
    model: Any, variables: Any, examples: Sequence[dict], config: Any, batch_size: int
) -> list[np.ndarray]:
    """Masks (original size) for raw examples, through the same compiled forward as the evaluation."""
    settings = data_settings(config)
    forward = forward_fn(model)
    masks = []
    for start in range(0, len(examples), batch_size):
        chunk = [preprocess_eval(e, **settings) for e in examples[start : start + batch_size]]
        images, ids = np.stack([c["image"] for c in chunk]), np.stack([c["ids"] for c in chunk])
        sizes = [(int(c["orig_size"][0]), int(c["orig_size"][1])) for c in chunk]
        masks += predict_batch(forward, variables, images, ids, [c["inv_matrix"] for c in chunk], sizes,
                               settings["image_size"], batch_size)  # fmt: skip
    return masks


class DemoRunExists(UserError, FileExistsError):
    """The demo's workdir already holds a run; the message names the ways on."""


def run_demo(
    workdir: str | None = None,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    config: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Trains, evaluates and draws (module docstring); returns the figures written to demo_results.json.
    ``config``: another model's demo config (default configs/demo.py, WIMFRIS); ``workdir``: default
    :func:`default_workdir`; ``resume``: continue the run in ``workdir`` (or score a finished one again)."""
    t0 = time.perf_counter()
    given = workdir or default_workdir(config, quick)
    workdir = os.path.abspath(given)
    run_config = validate(apply_overrides(demo_config(quick, config), overrides), devices=jax.device_count())
    with hold_workdir(workdir):  # one writer: train() takes it again (re-entrant), the figures are written after it
        refusal = None if resume else existing_run(given, quick, config)
        if refusal:
            raise DemoRunExists(refusal)
        run_config.train.resume = bool(resume)
        return _demo(workdir, run_config, quick, t0)


def _demo(workdir: str, config: Any, quick: bool, t0: float) -> dict[str, Any]:
    """:func:`run_demo` in its locked workdir; ``t0``: its start (``time.perf_counter``)."""
    tc = config.train
    model, loss_fn = model_lib.training_model(config)
    val = build_source(config.data, "val")
    eval_bs = int(tc.eval_batch_size)
    family = config.model.get("family", "wimfris").upper()
    print(f"{family} demo{' (quick)' if quick else ''}: {tc.epochs * tc.steps_per_epoch} steps of batch "
          f"{tc.global_batch_size} on {len(jax.devices())} x {jax.devices()[0].device_kind}, "
          f"{config.data.image_size}px synthetic shapes; validation: {len(val)} expressions", flush=True)  # fmt: skip

    final: dict[str, dict[str, float]] = {}

    def eval_fn(state: Any) -> dict[str, float]:
        final["variables"] = jax.device_get(state.variables())
        final["true"] = evaluate(model, final["variables"], val, config=config, batch_size=eval_bs, desc="val")
        return final["true"]

    t_train = time.perf_counter()
    state = train(config, workdir, model=model, loss_fn=loss_fn, eval_fn=eval_fn)
    t_train = time.perf_counter() - t_train
    if "variables" not in final:  # resumed at its last step: nothing trained, nothing evaluated yet
        eval_fn(state)
    variables = final.pop("variables")
    swapped = evaluate(
        model, variables, val, config=config, batch_size=eval_bs, swap_sentences=True, desc="val, swapped"
    )
    results = {"val (true sentences)": final["true"], "val (swapped sentences)": swapped}

    examples = [val[i] for i in range(min(GRID_EXAMPLES, len(val)))]
    preds = _predict_examples(model, variables, examples, config, eval_bs)
    rows = []
    for ex, pred in zip(examples, preds):
        inter, union = intersection_union(pred, ex["mask"])
        rows.append({"image": ex["image"], "sentence": ex["sentence"], "pred": pred, "gt": ex["mask"],
                     "iou": inter / (union + 1e-6)})  # fmt: skip
    grid_path = save_png(os.path.join(workdir, "demo_grid.png"), grid(rows, cell=3 * ex["image"].shape[0] // 2))
    samples = []
    for i, ex in enumerate(examples[:SAMPLES]):
        path = save_png(os.path.join(workdir, "samples", f"val_{i:03d}.png"), ex["image"])
        samples.append({"image": path, "sentence": ex["sentence"], "distractor_sentence": ex["distractor_sentence"]})

    true_miou, swap_miou = results["val (true sentences)"]["mIoU"], swapped["mIoU"]
    wall = time.perf_counter() - t0
    summary = {
        "results": results,
        "swapped_over_true_mIoU": swap_miou / max(true_miou, 1e-9),
        "target_met": None if quick else bool(true_miou >= 0.6 and swap_miou <= 0.5 * true_miou),
        "steps": int(tc.epochs * tc.steps_per_epoch),
        "train_seconds": t_train,
        "wall_seconds": wall,
        "grid": grid_path,
        "samples": samples,
        "workdir": workdir,
    }
    print(format_table(results))
    if quick:
        summary["smoke"] = smoke_checks(workdir, model, config)
        print(summary["smoke"]["line"])
    else:
        print(f"sentence use: mIoU {100 * true_miou:.1f} with the true sentences vs {100 * swap_miou:.1f} when each is "
              f"swapped for one naming another object (ratio {summary['swapped_over_true_mIoU']:.2f}); target "
              f"(mIoU >= 60, swapped <= half): {'met' if summary['target_met'] else 'NOT met'}")  # fmt: skip
    with open(os.path.join(workdir, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    print(f"grid of predictions: {grid_path}")
    s = samples[0]
    print(f'try:  wimfris predict --checkpoint {workdir} --image {s["image"]} --text "{s["sentence"]}" '
          f"--out {os.path.join(workdir, 'predict')}")  # fmt: skip
    print(f"wall time {wall:.0f} s (training {t_train:.0f} s incl. compilation); results in "
          f"{os.path.join(workdir, 'demo_results.json')}")  # fmt: skip
    return summary
