"""The training loop: data -> sharded train step -> logs, checkpoints, evaluation, resume, Ctrl-C / SIGTERM.

Implements the WIMFRIS / DETRIS training recipe (WIMFRIS Sec. 4.1; docs/detris_code.md "Loss and training")
around :mod:`~wimfris_jax.train.step`. Every piece is built from the config unless injected (tests inject a
toy model; the CLI may inject pretrained variables through ``init_fn``).

Config keys read: ``config.seed`` and ``config.train``'s (each declared, with its default, by configs/common.py
``train_config``; README.md "Training settings"): global_batch_size, epochs, steps_per_epoch (0: len(source) //
global_batch_size), the optimiser's, trainable, compute_dtype, remat, fsdp, fsdp_min_size, log_every, ckpt_every,
keep_last, eval_every (steps; 0 = only at the end) or eval_every_epochs, best_metric ("mIoU"), resume.

Failure handling: the losses and gradient norms of all steps since the last check are verified before
every log line, checkpoint and evaluation; a non-finite value raises :class:`NonFiniteLossError` (a
``FloatingPointError``, ``ValueError`` and ``UserError``) naming the first bad step and nothing more is saved.
One writer per run: the workdir's lock is taken before anything in it changes and held until the end
(:mod:`~wimfris_jax.train.workdir`; a second run raises :class:`~wimfris_jax.train.workdir.WorkdirInUse`).
SIGINT (Ctrl-C) and SIGTERM are deferred to the end of the current step, then a checkpoint is written and
:class:`~wimfris_jax.train.signals.TrainingInterrupted` (a ``KeyboardInterrupt``) is raised; a second signal
interrupts at once; a signal ignored at the start (e.g. SIGINT in the background) stays ignored; the processes of a
multi-process run stop at a step they agree on, or all stop when one is lost (:mod:`~wimfris_jax.train.hosts`). A
write into the workdir that fails (disk full, ``ulimit -f``, read-only) stops the run with one
:class:`~wimfris_jax.train.workdir.WorkdirWriteError` naming the last good checkpoint, which stays intact. On
resume, metrics logged after the restored checkpoint are dropped (:class:`~wimfris_jax.train.logging.MetricWriter`),
so each step is logged once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm

from data_pipeline.loader import make_loader as grain_loader
from data_pipeline.loader import steps_per_epoch
from data_pipeline.preprocess import preprocess_train
from data_pipeline.sources import build_source
from data_pipeline.tokenizers import check_tokenizer, tokenizer_spec
from wimfris_jax import model as model_lib
from wimfris_jax.checkpoints.runs import committed_steps, quiet_abandoned_io
from wimfris_jax.errors import UserError, one_line
from wimfris_jax.train import sharding
from wimfris_jax.train.checkpoint import Checkpoints, discard_unfinished
from wimfris_jax.train.hosts import StopAgreement, lost_process_error
from wimfris_jax.train.logging import MetricWriter
from wimfris_jax.train.optim import make_optimizer
from wimfris_jax.train.signals import TrainingInterrupted, describe
from wimfris_jax.train.state import TrainState, abstract_state, init_train_state, init_variables
from wimfris_jax.train.step import jit_train_step, make_train_step
from wimfris_jax.train.workdir import WorkdirWriteError, WriteFailures, hold_workdir, write_failure

EvalFn = Callable[[TrainState], Mapping[str, float]]


def train(
    config: Any,
    workdir: str | os.PathLike,
    *,
    model: Any = None,
    loss_fn: Callable | None = None,
    train_source: Any = None,
    eval_fn: EvalFn | None = None,
    transform: Callable | None = None,
    make_loader: Callable | None = None,
    init_fn: Callable[[jax.Array], Mapping[str, Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
    """Trains for ``epochs * steps_per_epoch`` steps in total (resuming from ``workdir`` if asked); returns the state.

    Args:
      model: flax module; loss_fn: ``(outputs, mask) -> (loss, aux)`` (defaults: ``wimfris_jax.model.training_model``).
      train_source: random-access source of raw examples (default: ``build_source(config.data, "train")``).
      eval_fn: ``state -> {"mIoU": ..., ...}`` run every eval_every steps and at the end; ranks ``best/``.
        It must copy what it keeps (``jax.device_get``): the state's buffers are donated to the next step.
      transform: ``(example, np.random.Generator) -> {"image", "ids", "mask"}`` (default DETRIS preprocessing).
      make_loader: ``data_pipeline.loader.make_loader`` or a function with its signature.
      init_fn: ``rng -> variables`` (e.g. with pretrained backbones); default random ``model.init``.
      mesh: default: all devices on one "data" axis.
    """
    tc = config.train
    workdir = os.path.abspath(os.fspath(workdir))
    if model is None or loss_fn is None:
        built, bound = model_lib.training_model(config)
        model, loss_fn = model or built, loss_fn or bound
    if transform is None:  # the ids come from config.data.tokenizer: they must fit the text tower
        check_tokenizer(model, tokenizer_spec(config.data))
    source = train_source if train_source is not None else build_source(config.data, "train")
    transform = transform if transform is not None else default_train_transform(config.data)
    make_loader = make_loader if make_loader is not None else grain_loader
    mesh = mesh if mesh is not None else sharding.make_mesh()

    gbs = int(tc.global_batch_size)
    spe = int(tc.get("steps_per_epoch") or 0) or steps_per_epoch(len(source), max(1, gbs))  # any process count
    if spe <= 0:
        raise ValueError(f"the training source has {len(source)} examples, fewer than one batch of {gbs}")
    total = int(tc.epochs) * spe
    log_every = max(1, int(tc.get("log_every", 50)))
    ckpt_every = int(tc.get("ckpt_every", 0)) or total
    eval_every = int(tc.get("eval_every_epochs", 0)) * spe or int(tc.get("eval_every", 0))

    with hold_workdir(workdir, jax.process_index()), WriteFailures(workdir) as failures:  # before the workdir changes
        quiet_abandoned_io()  # a failed save's other writes end on orbax's closed event loop: ~100 tracebacks
        try:
            ckpts = _open_checkpoints(workdir, tc)
            try:
                tx, schedule = make_optimizer(tc, spe)
                loader = make_loader(source, transform, global_batch_size=gbs, seed=int(config.seed), shuffle=True)
                data_iter = iter(loader)
                if init_fn is None:
                    sample = {k: np.asarray(v)[None] for k, v in transform(source[0], np.random.default_rng(0)).items()}
                    init_fn = functools.partial(init_variables, model, sample)
                state, shardings = init_train_state(
                    init_fn, tx, model_lib.trainable_patterns(config), int(config.seed), mesh,
                    fsdp=bool(tc.get("fsdp", False)),
                    fsdp_min_size=int(tc.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE)),
                )  # fmt: skip
                if ckpts.latest_step() is not None:
                    state = ckpts.restore(abstract_state(state, shardings), data_iter)
                if jax.process_index() == 0:
                    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                        f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
                                else json.dumps(config))  # fmt: skip
                step_fn = jit_train_step(
                    make_train_step(model, loss_fn, tx, schedule, compute_dtype=tc.get("compute_dtype", "float32")),
                    shardings, mesh,
                )  # fmt: skip
                writer = MetricWriter(workdir, start_step=int(state.step))  # drops rows logged after the checkpoint
            except BaseException:
                ckpts.close()
                raise
            every = {"log": log_every, "ckpt": ckpt_every, "eval": eval_every, "total": total}
            state = _steps(state, step_fn, data_iter, mesh, every, gbs, eval_fn, ckpts, writer, failures)
            failures.check()  # a last save that failed in orbax's thread, which only logged it
            return state
        except Exception as e:
            error = _write_error(e, workdir, failures) or lost_process_error(e, workdir)
            if error is None:
                raise
            raise error from e


def _open_checkpoints(workdir: str, tc: Any) -> Checkpoints:
    """The run's :class:`Checkpoints`; a workdir with checkpoints is refused, untouched, unless resuming."""
    done = committed_steps(os.path.join(workdir, "checkpoints"))
    if done and not tc.get("resume", False):
        raise FileExistsError(
            f"{workdir} already holds checkpoints {done}; set config.train.resume=True to continue that run, "
            "or use a new workdir"
        )
    return Checkpoints(workdir, keep_last=int(tc.get("keep_last", 2)), best_metric=tc.get("best_metric", "mIoU"))


def _steps(
    state: TrainState,
    step_fn: Callable,
    data_iter: Any,
    mesh: jax.sharding.Mesh,
    every: Mapping[str, int],
    gbs: int,
    eval_fn: EvalFn | None,
    ckpts: Checkpoints,
    writer: MetricWriter,
    failures: WriteFailures,
) -> TrainState:
    """The training steps from ``state`` to ``every["total"]``: logs, saves and evaluations every ``every["log"]``,
    ``["ckpt"]`` and ``["eval"]`` steps (eval 0: at the end only). A stop signal ends it after the step in flight with
    a checkpoint and :class:`TrainingInterrupted`. Closes ``writer`` and ``ckpts`` (waiting for the saves)."""
    total, workdir = every["total"], ckpts.workdir
    step = last_saved = int(state.step)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # device metrics not yet checked
    bar = tqdm.tqdm(total=total, initial=step, disable=jax.process_index() != 0, dynamic_ncols=True, desc="train")
    t_log, steps_logged = time.perf_counter(), 0
    abandon = False  # a second signal in a multi-process run: no save, no wait (the other processes are elsewhere)
    with StopAgreement() as stop:
        try:
            while step < total:
                stop.check(step)  # a stop signal arrived during the previous step (on any process)
                failures.check()  # a save failed in orbax's thread
                batch = sharding.shard_batch(next(data_iter), mesh)
                state, metrics = step_fn(state, batch)
                step += 1
                steps_logged += 1
                pending.append((step, metrics))
                bar.update(1)
                if step % every["log"] == 0 or step == total:
                    means = _check_and_average(pending)
                    dt = time.perf_counter() - t_log
                    means["images_per_s"] = steps_logged * gbs / max(dt, 1e-9)  # 1st window: + compile
                    writer.write(step, means)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means.get('lr', 0):.2e}",
                                    img_s=f"{means['images_per_s']:.1f}")  # fmt: skip
                    t_log, steps_logged = time.perf_counter(), 0
                if step % every["ckpt"] == 0 or step == total:
                    _check_and_average(pending)
                    ckpts.save(state, data_iter)
                    last_saved = step
                if eval_fn is not None and ((every["eval"] and step % every["eval"] == 0) or step == total):
                    _check_and_average(pending)
                    results = {k: float(v) for k, v in eval_fn(state).items()}
                    writer.write(step, results, prefix="val")
                    ckpts.save_best(state, results)
                    t_log, steps_logged = time.perf_counter(), 0
        except KeyboardInterrupt as e:  # a stop signal after the step in flight, or a second one at once
            signum = getattr(e, "signum", signal.SIGINT)
            again = (f"{describe(signum)} again at step {step}; not saved (a second signal stops at once); "
                     f"last checkpoint: {f'step {last_saved}' if last_saved else 'none'}")  # fmt: skip
            if stop.multi and not getattr(e, "orderly", False):  # no collective save (the others are elsewhere),
                abandon = True  # no wait: the CLI leaves at once
                raise TrainingInterrupted(signum, again) from e
            _check_and_average(pending)
            try:
                if int(state.step) != last_saved:
                    ckpts.save(state, data_iter)
                ckpts.wait()
            except KeyboardInterrupt as second:  # a second signal while saving: one process waits for its save
                abandon = stop.multi
                if not abandon:
                    raise
                raise TrainingInterrupted(signum, again) from second
            except RuntimeError as err:  # a second signal inside a step can leave the state donated
                if write_failure(err, workdir):
                    raise
                raise TrainingInterrupted(signum, f"{describe(signum)} at step {step}; could not save ({one_line(err)})"
                                          f"; last checkpoint: step {last_saved}") from err  # fmt: skip
            saved = f"checkpoint saved in {workdir}/checkpoints" if ckpts.latest_step() is not None else "nothing saved"
            raise TrainingInterrupted(signum, f"{describe(signum)} at step {step}; {saved}", orderly=True) from e
        finally:
            bar.close()
            try:
                writer.close()
            finally:
                if not abandon:
                    ckpts.close()  # waits for the saves in flight
    return state


def _write_error(error: Exception, workdir: str, failures: WriteFailures) -> WorkdirWriteError | None:
    """The one-line error of a failed write into the workdir (``error``, or one that orbax only logged), naming the
    workdir, why and the last good checkpoint (intact); None for another error. Removes the failed save."""
    reason = write_failure(error, workdir)
    if reason is None and not isinstance(error, UserError):
        reason = write_failure(failures.first, workdir)
    if reason is None:
        return None
    discard_unfinished(workdir)  # the space the failed save took; under the lock, with no save in flight
    done = committed_steps(os.path.join(workdir, "checkpoints"))
    good = f"step {done[-1]} ({workdir}/checkpoints/{done[-1]})" if done else "none (no checkpoint was saved)"
    return WorkdirWriteError(
        f"cannot write to {workdir} ({reason}); training stopped, the last good checkpoint: {good}"
    )


def _check_and_average(pending: list[tuple[int, dict[str, jax.Array]]]) -> dict[str, float]:
    """Fetches pending step metrics, raises on the first non-finite loss / grad norm, returns their means."""
    if not pending:
        return {}
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        bad = [k for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]
        if bad:
            pending.clear()
            raise NonFiniteLossError(
                f"non-finite {', '.join(f'{k}={m[k]}' for k in bad)} at step {step}; training stopped, "
                "the last saved checkpoint is the last good state"
            )
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    pending.clear()
    return means


class NonFiniteLossError(UserError, FloatingPointError, ValueError):
    """Training produced a non-finite loss or gradient norm; the message names the step.

    A ``ValueError`` too, so that callers catching bad values (the CLI's one-line errors) catch it.
    """


def default_train_transform(data_config: Any) -> Callable[[Mapping[str, Any], np.random.Generator], dict]:
    """DETRIS training preprocessing (letterbox, CLIP normalisation, tokenisation by ``config.data.tokenizer``,
    soft mask) from config.data."""
    kwargs = dict(
        image_size=int(data_config.image_size),
        word_len=int(data_config.word_len),
        mask_size=int(data_config.mask_size),
        tokenizer=tokenizer_spec(data_config),
    )
    return lambda example, rng: preprocess_train(example, rng=rng, **kwargs)
