"""The ``wimfris`` command: train, eval, predict, serve, demo, weights, summary.

    wimfris demo [--workdir W] [--quick] [--config C] [--resume]    offline: train the tiny model on synthetic shapes
    wimfris train --config C --workdir W [--resume] [--set KEY=VALUE ...] [--init SUBTREE=SOURCE ...]
    wimfris eval --config C --checkpoint K [--step best|latest|N] --split S[,S...] [--json OUT]
    wimfris predict --checkpoint K [--step best|latest|N] [--config C] --image IMG [IMG ... | FOLDER] --text "..." \
        --out OUT
    wimfris weights list [C ...] | fetch C [--init SUBTREE=SOURCE ...]   the configs' pretrained weights by name
    wimfris serve --checkpoint K [--step best|latest|N] [--config C] [--host 127.0.0.1] [--port 7860] \
        [--batch-size B]                                        a prediction page and HTTP API (Gradio)
    wimfris summary --config C

Config overrides: ``--set train.lr=2e-4`` (repeatable; values are Python literals, else strings) or, as in
the configs' docstrings, ``--config.train.lr=2e-4``. Training starts from the pretrained subtrees ``config.init``
names (WIMFRIS-B: ``image_encoder=hf:facebook/dinov2-with-registers-base``, ``text_encoder=openai:ViT-B/16``),
fetched and converted once into the cache (:mod:`wimfris_jax.pretrained`); ``--init text_encoder=SOURCE`` replaces
one (a name, a URL, a ``python -m port_weights`` file or a run directory), ``--init text_encoder=none`` drops it.
Multi-host jobs start ``jax.distributed`` from the environment before anything else
(``wimfris_jax.train.sharding.maybe_initialize_distributed``).

Expected failures (bad input, missing files, a checkpoint that does not fit) print one ``wimfris <command>:
error: ...`` message on stderr and exit with status 1; argument errors exit with status 2. What counts as bad
input is decided by the exception's type (:func:`wimfris_jax.errors.is_user_error`, the policy ``python -m
port_weights`` shares): a :class:`~wimfris_jax.errors.UserError`, or an ``OSError`` naming a file. Anything else
is a bug and keeps its traceback; ``--debug`` shows the traceback of every error. Warnings of this package (e.g. a
damaged checkpoint skipped for an older one) are one line too.
Training stopped by Ctrl-C or SIGTERM saves a checkpoint, prints one line (``wimfris train: terminated (SIGTERM) at
step N; checkpoint saved in W/checkpoints``) and exits with 128 + the signal number (130, 143). A workdir in use
by another training run, or a write into it that fails (disk full, ``ulimit -f``, read-only), is an error of one
line, status 1 (:mod:`wimfris_jax.train.workdir`). The processes of a multi-process run stop together on Ctrl-C or
SIGTERM (each prints its line); one that stops alone (an error, a second Ctrl-C) exits at once, without JAX's
shutdown barrier, and the others stop with one line when they find it gone (:mod:`wimfris_jax.train.hosts`).

Imports: each command imports the modules only it needs (training loop, evaluation, prediction, demo, summary) when
it runs, so that ``wimfris --help`` and argument errors do not load orbax, grain and the rest of that code (measured:
1.1 s of CPU for ``wimfris --help`` so, 1.5 s with every import at the top).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from data_pipeline.sources import build_source
from wimfris_jax.config import ConfigError, apply_overrides, load_config
from wimfris_jax.errors import describe, is_user_error
from wimfris_jax.io import ensure_writable_file
from wimfris_jax.load import load_model, pretrained_init_fn
from wimfris_jax.platform import prepare_libtpu
from wimfris_jax.train.hosts import distributed, leave
from wimfris_jax.train.sharding import maybe_initialize_distributed


def cmd_train(args: argparse.Namespace) -> None:
    import jax

    from wimfris_jax import model as model_lib
    from wimfris_jax.checkpoints.runs import committed_steps
    from wimfris_jax.config_check import validate
    from wimfris_jax.evaluate import make_eval_fn
    from wimfris_jax.pretrained import init_sources, resolve
    from wimfris_jax.train.loop import train

    config = apply_overrides(load_config(args.config), args.set)
    if args.resume:
        config.train.resume = True
    validate(config, devices=jax.device_count())  # the batch splits over every device; before the workdir is made
    sources = init_sources(config, args.init)  # checked before anything is fetched
    if config.train.get("resume") and committed_steps(os.path.join(args.workdir, "checkpoints")):
        sources = {}  # the run goes on from its checkpoint: nothing to fetch or convert
    tc = config.train
    model, loss_fn = model_lib.training_model(config)
    eval_fn = make_eval_fn(
        config, model, build_source(config.data, config.data.get("eval_split", "val")),
        batch_size=int(tc.get("eval_batch_size", 0) or tc.global_batch_size), max_examples=tc.get("eval_max_examples"),
    )  # fmt: skip
    init_fn = pretrained_init_fn(model, config, resolve(config, sources)) if sources else None
    state = train(
        config, args.workdir, model=model, loss_fn=loss_fn,
        eval_fn=eval_fn, init_fn=init_fn,
    )  # fmt: skip
    print(f"trained {int(state.step)} steps; checkpoints, metrics.jsonl and TensorBoard logs in {args.workdir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from wimfris_jax.evaluate import data_settings, evaluate
    from wimfris_jax.metrics import format_table
    from wimfris_jax.predict import find_config

    config = apply_overrides(find_config(args.checkpoint, args.config), args.set)  # validated as read, and overrides
    data_settings(config)
    default = ",".join(config.data.get("eval_splits", (config.data.get("eval_split", "val"),)))
    splits = [s for s in (args.split or default).split(",") if s]
    sources = {s: build_source(config.data, s) for s in splits}  # fail on a bad split before loading weights
    if args.json:
        ensure_writable_file(args.json, "--json")  # before the evaluation, not after it
    model, variables = load_model(config, args.checkpoint, which=args.step)
    results = {}
    for split, source in sources.items():
        name = f"{split} (swapped)" if args.swap_sentences else split
        results[name] = evaluate(
            model, variables, source, config=config, batch_size=args.batch_size,
            swap_sentences=args.swap_sentences, max_examples=args.max_examples, desc=split,
        )  # fmt: skip
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "results": results}, f, indent=2)


def cmd_predict(args: argparse.Namespace) -> int:
    from wimfris_jax.predict import run

    records = run(args.checkpoint, args.image, args.text, args.out, config=args.config, batch_size=args.batch_size,
                  which=args.step)  # fmt: skip
    for r in records:
        if "error" not in r:
            print(f"{r['image']}: mask {r['mask']}, overlay {r['overlay']} ({100 * r['area']:.1f}% of the image)")
    failed = [r["error"] for r in records if "error" in r]
    for message in failed:  # after the masks of every readable image are written
        print(f"wimfris predict: error: {message}", file=sys.stderr)
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> None:
    from wimfris_jax.serve import serve  # gradio itself is imported by serve(), with its network calls off

    serve(args.checkpoint, config=args.config, which=args.step, batch_size=args.batch_size, host=args.host,
          port=args.port)  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from wimfris_jax.demo import run_demo

    run_demo(args.workdir, quick=args.quick, overrides=args.set, config=args.config, resume=args.resume)


def cmd_weights(args: argparse.Namespace) -> None:
    from wimfris_jax import pretrained

    pretrained.main(args)


def cmd_summary(args: argparse.Namespace) -> None:
    from wimfris_jax import summary

    summary.main(["--config", args.config])


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _step(text: str) -> str | int:
    """argparse type of --step: "best", "latest" or a step number ("auto", the default: best, else latest)."""
    if text in ("best", "latest", "auto"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"must be best, latest or a step number, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wimfris", description="WIMFRIS referring image segmentation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = dict(action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of every error")
    step = dict(type=_step, default="auto", metavar="best|latest|N",
                help="checkpoint of a run directory (default: best, else latest)")  # fmt: skip

    p = sub.add_parser("train", parents=[common], help="train from a config file")
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, config.json, metrics, tb/")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--set", **overrides)
    p.add_argument("--init", action="append", default=[], metavar="SUBTREE=SOURCE",
                   help="pretrained params of a subtree, replacing config.init's: hf:ORG/NAME[@REV], openai:ViT-B/16, "
                   "https://...#sha256=HEX, a file or run directory, or none")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[common], help="score a checkpoint (mIoU, oIoU, Prec@X)")
    p.add_argument("--config", help="config file (default: config.json of the checkpoint's run)")
    p.add_argument("--checkpoint", required=True, help="run directory, step folder or converted weights file")
    p.add_argument("--step", **step)
    p.add_argument("--split", help="split(s), comma-separated (default: the dataset's, config.data.eval_splits)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-examples", type=_positive_int, help="score the first N expressions of each split")
    p.add_argument("--swap-sentences", action="store_true", help="synthetic set: use the distractor sentences")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", parents=[common], help="segment the object a sentence names in images")
    p.add_argument("--checkpoint", required=True, help="run directory, step folder or converted weights file")
    p.add_argument("--step", **step)
    p.add_argument("--config", help="config file (default: config.json of the checkpoint's run)")
    p.add_argument("--image", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--text", required=True, help="the referring expression")
    p.add_argument("--out", required=True, help="output folder for <name>_mask.png and <name>_overlay.png")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", parents=[common], help="an interactive prediction page and HTTP API (Gradio)")
    p.add_argument("--checkpoint", required=True, help="run directory, step folder or converted weights file")
    p.add_argument("--step", **step)
    p.add_argument("--config", help="config file (default: config.json of the checkpoint's run)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860, help="port (default: 7860)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sentences per forward call (compiled once)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common], help="offline demo: train the tiny model on synthetic shapes, ...")
    p.add_argument("--workdir", help="run directory (default: ./wimfris_demo, ./wimfris_demo_tfanet for "
                   "configs/tfanet_tiny.py, ..., with _quick for --quick)")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run: checks, no quality target")
    p.add_argument("--resume", action="store_true", help="continue the demo run in --workdir (or score it again)")
    p.add_argument("--config", help="another model's demo config, e.g. configs/tfanet_tiny.py (default: WIMFRIS)")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("weights", parents=[common], help="list or fetch the pretrained weights configs name")
    p.add_argument("action", choices=("list", "fetch"))
    p.add_argument("config", nargs="*", help="config file(s) (list: default every config of configs/; fetch: one)")
    p.add_argument("--init", action="append", default=[], metavar="SUBTREE=SOURCE", help="as wimfris train's")
    p.add_argument("--set", **overrides)
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("summary", parents=[common], help="parameter counts of a config")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_summary)
    return parser


def _split_config_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--config.a.b=v`` / ``--config.a.b v`` arguments -> ``a.b=v`` overrides; the rest unchanged."""
    rest, found, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            found.append(f"{key}={value}")
        else:
            rest.append(arg)
        i += 1
    return rest, found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wimfris`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv, flag_overrides = _split_config_flags(argv)
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if hasattr(args, "set"):
        args.set = list(args.set) + flag_overrides
    elif flag_overrides:
        parser.error(f"{args.command} takes no config overrides")
    show = warnings.showwarning

    def one_line_warning(message: Any, category: type, *rest: Any, **kw: Any) -> None:
        if category.__module__.startswith("wimfris_jax."):  # this package's warnings: one line
            print(f"wimfris {args.command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            if args.command in ("train", "eval", "demo"):  # multi-host start-up, before any JAX computation
                prepare_libtpu()
                maybe_initialize_distributed()
            if getattr(args, "checkpoint", None):  # a released checkpoint by name: its conversion in the cache
                from wimfris_jax.pretrained import local_checkpoint

                args.checkpoint = local_checkpoint(args.checkpoint, args.config)
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # training's TrainingInterrupted says where it stopped and what it saved
        print(f"wimfris {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return leave(int(getattr(e, "exit_status", 130)), orderly=getattr(e, "orderly", False))
    except Exception as e:
        if args.debug or not is_user_error(e):
            if not distributed():
                raise
            traceback.print_exc()  # then leave at once: the other processes may be waiting in a collective
        else:
            print(f"wimfris {args.command}: error: {describe(e)}", file=sys.stderr)
        return leave(1, orderly=False)


if __name__ == "__main__":
    sys.exit(main())
