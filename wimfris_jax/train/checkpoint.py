"""Orbax checkpoints of training: the last N for resuming, and separately the best by a validation metric.

Layout under ``workdir``::

  checkpoints/<step>/state   TrainState (params, frozen params, batch_stats, opt_state, step, rng)
  checkpoints/<step>/data    grain iterator position (grain's orbax handler, one JSON per process; restored on
                             another process count too, through the global stream position)
  checkpoints/<step>/meta    JSON: step, metrics known at save time
  best/<step>/...            the same without "data"; only the best by ``best_metric`` is kept

Orbax 0.12 API: ``CheckpointManager`` + ``args.Composite(state=StandardSave, data=grain CheckpointSave,
meta=JsonSave)``; saves are asynchronous (arrays are copied to host before ``save`` returns, files are
written behind training) and atomic (a step directory appears only once complete), so a killed process
leaves the previous checkpoints intact. Callers must never hand a non-finite state to ``save``
(:mod:`wimfris_jax.train.loop` checks the loss first).

Only the training process writes, under the workdir's lock (:mod:`wimfris_jax.train.workdir`: ``train`` takes it
before anything else, and :class:`Checkpoints` holds it too, re-entrantly, before its managers open and remove
unfinished ``<step>.orbax-checkpoint-tmp*`` folders, so no second writer can delete a live run's save in flight).
Readers (:mod:`wimfris_jax.checkpoints.runs`: :func:`load_variables` for ``wimfris predict`` / ``eval``,
``load_model``) never create, clean up or lock anything, so a run can be watched while it trains.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from data_pipeline.order import restore_iterator_state
from wimfris_jax.checkpoints.errors import CheckpointError, CheckpointNotFound
from wimfris_jax.checkpoints.runs import TMP_MARK, check_fits, quiet_abandoned_io, restore_target
from wimfris_jax.errors import UserError, one_line
from wimfris_jax.train.state import TrainState
from wimfris_jax.train.workdir import hold_workdir


class Checkpoints:
    """The two checkpoint series of one training run (module docstring).

    Args:
      workdir: run directory (created if missing).
      keep_last: how many of the latest checkpoints to keep.
      best_metric: key of the eval metrics that ranks ``best/``; ``best_mode`` "max" or "min".
      async_save: write files in a background thread.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep_last: int = 2,
        best_metric: str = "mIoU",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.best_metric, self.best_mode = best_metric, best_mode
        self._best_cache: tuple[int, float] | None = None
        self._closing = contextlib.ExitStack()
        self._closing.enter_context(hold_workdir(self.workdir, jax.process_index()))  # before anything is changed
        try:
            self._open(keep_last, best_metric, best_mode, async_save)
        except BaseException:
            self._closing.close()
            raise

    def _open(self, keep_last: int, best_metric: str, best_mode: str, async_save: bool) -> None:
        for sub in ("checkpoints", "best"):  # an unwritable workdir fails here, naming the folder
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        common = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self._last = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep_last)), **common),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )  # fmt: skip
        self._best = ocp.CheckpointManager(
            os.path.join(self.workdir, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: float(m[best_metric]),
                best_mode=best_mode,
                keep_checkpoints_without_metrics=False,
                **common,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        self._closing.callback(self._best.close)  # run last in, first out: the managers, then the lock
        self._closing.callback(self._last.close)

    # -- the last N ---------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint in ``checkpoints/`` (None if there is none)."""
        return self._last.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._last.all_steps())

    def save(self, state: TrainState, data_iter: Any = None, *, metrics: Mapping[str, float] | None = None) -> int:
        """Saves ``state`` (and the data iterator's position) at ``state.step``; returns that step."""
        step = int(state.step)
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(_meta(step, metrics))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._last.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def restore(self, target: Any, data_iter: Any = None, *, step: int | None = None) -> TrainState:
        """Restores ``checkpoints/<step>`` (default: latest) into ``target``'s structure and shardings.

        ``target``: a TrainState of ``jax.ShapeDtypeStruct`` with shardings (``state.abstract_state``).
        ``data_iter``: when given, its position is restored in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint to restore under {self._last.directory}")
        return self._restore(self._last, step, target, data_iter)

    # -- the best -----------------------------------------------------------------------------------------
    def best(self) -> tuple[int, float] | None:
        """``(step, value of best_metric)`` of the kept best checkpoint, or None."""
        if self._best_cache is None:
            step = self._best.best_step()
            if step is None:
                return None
            self._best.wait_until_finished()
            self._best_cache = step, float(self._best.metrics(step)[self.best_metric])
        return self._best_cache

    def save_best(self, state: TrainState, metrics: Mapping[str, float]) -> bool:
        """Saves ``state`` into ``best/`` if ``metrics[best_metric]`` beats the kept one; returns whether it did."""
        if self.best_metric not in metrics:
            raise KeyError(
                f"eval metrics have no {self.best_metric!r} (the best-checkpoint metric); got {sorted(metrics)}"
            )
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            return False
        current = self.best()
        if current is not None and not (value > current[1] if self.best_mode == "max" else value < current[1]):
            return False
        step = int(state.step)
        meta = _meta(step, metrics)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._best.save(step, args=args, metrics={k: float(v) for k, v in metrics.items()}, force=True)
        self._best_cache = step, value
        return True

    # -- common -------------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._last.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight, closes the managers and releases the lock; a second call does nothing."""
        self._closing.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _restore(mngr: ocp.CheckpointManager, step: int, target: Any, data_iter: Any) -> TrainState:
        folder = os.path.join(os.fspath(mngr.directory), str(step))
        check_fits(folder, target)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(restore_target(target))}
        quiet_abandoned_io()  # before: a failed restore's abandoned reads are reported while it fails
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
            if data_iter is not None:
                _restore_data(os.path.join(folder, "data"), data_iter)
        except UserError as e:  # the data position cannot carry over (data_pipeline.order)
            raise CheckpointError(f"cannot restore {folder}: {e}") from e
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / grain raise many unrelated types
            raise CheckpointError(f"cannot restore {folder}: {one_line(e)}") from e
        return restored["state"]


def _restore_data(folder: str, data_iter: Any) -> None:
    """Moves ``data_iter`` to the position saved in ``folder`` (grain's ``process_<i>-of-<n>.json``): this process's
    file, or when the run was saved by another process count, process 0's, mapped onto this process's slice of the
    same global stream (:func:`data_pipeline.order.restore_iterator_state`)."""
    own = os.path.join(folder, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    saved = (
        [own] if os.path.exists(own) else sorted(glob.glob(os.path.join(glob.escape(folder), "process_0-of-*.json")))
    )
    if not saved:
        raise CheckpointError(f"{folder} holds no data-iterator position (process_<i>-of-<n>.json)")
    with open(saved[0], "rb") as f:
        restore_iterator_state(data_iter, f.read())
    data_iter.start_prefetch()  # as grain's own handler


def _meta(step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
    return {"step": step, "metrics": {k: float(v) for k, v in (metrics or {}).items()}}


def discard_unfinished(workdir: str | os.PathLike, timeout: float = 10.0) -> bool:
    """Removes the unfinished ``<step>.orbax-checkpoint-tmp*`` saves of a run (the space a failed save took), as
    opening :class:`Checkpoints` would; only for the run's writer, holding its lock, after :meth:`Checkpoints.close`.
    A failed save can leave orbax threads writing its other items after ``close``: waits up to ``timeout`` seconds
    for them to end, and removes nothing (returns False) while one still runs. Best effort: a write of TensorStore's
    own threads may still recreate a folder, which the next opening of :class:`Checkpoints` removes."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # orbax's join re-raises
    if any(type(t).__module__.startswith("orbax.") and t.is_alive() for t in threading.enumerate()):
        return False
    for sub in ("checkpoints", "best"):
        folder = os.path.join(os.fspath(workdir), sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if TMP_MARK in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return True
