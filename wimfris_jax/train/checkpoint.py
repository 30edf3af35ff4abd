"""Orbax checkpoints of training: the last N for resuming, and separately the best by a validation metric.

Layout under ``workdir``::

  checkpoints/<step>/state   TrainState (params, frozen params, batch_stats, opt_state, step, rng)
  checkpoints/<step>/data    grain iterator position (grain's orbax handler, one JSON per process)
  checkpoints/<step>/meta    JSON: step, metrics known at save time
  best/<step>/...            the same without "data"; only the best by ``best_metric`` is kept

Orbax 0.12 API: ``CheckpointManager`` + ``args.Composite(state=StandardSave, data=grain CheckpointSave,
meta=JsonSave)``; saves are asynchronous (arrays are copied to host before ``save`` returns, files are
written behind training) and atomic (a step directory appears only once complete), so a killed process
leaves the previous checkpoints intact. Callers must never hand a non-finite state to ``save``
(:mod:`wimfris_jax.train.loop` checks the loss first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from wimfris_jax.train import freeze
from wimfris_jax.train.state import TrainState


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
            raise FileNotFoundError(f"no checkpoint to restore under {self._last.directory}")
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

    def restore_best(self, target: Any) -> TrainState:
        best = self.best()
        if best is None:
            raise FileNotFoundError(f"no best checkpoint under {self._best.directory}")
        return self._restore(self._best, best[0], target, None)

    # -- common -------------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._last.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._last.close()
        self._best.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _restore(mngr: ocp.CheckpointManager, step: int, target: Any, data_iter: Any) -> TrainState:
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"cannot restore {mngr.directory / str(step)}: {e}") from e
        return restored["state"]


def load_variables(workdir: str | os.PathLike, which: str | int = "best") -> tuple[dict[str, Any], int]:
    """Flax variables ``{"params", "batch_stats"?}`` (numpy, all params merged) of a run, for evaluation / export.

    ``which``: "best", "latest" or a step number of ``checkpoints/``. Needs no model or optimiser: the
    checkpoint is read without a target. Returns ``(variables, step)``.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    if which == "best":
        with Checkpoints(workdir) as ck:
            best = ck.best()
        if best is None:
            raise FileNotFoundError(f"no best checkpoint under {workdir}/best (was an eval_fn given?)")
        path, step = os.path.join(workdir, "best", str(best[0])), best[0]
    else:
        with Checkpoints(workdir) as ck:
            step = ck.latest_step() if which == "latest" else int(which)
            if step is None or step not in ck.all_steps():
                raise FileNotFoundError(f"no checkpoint {which!r} under {workdir}/checkpoints: {ck.all_steps()}")
        path = os.path.join(workdir, "checkpoints", str(step))
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    variables = {"params": freeze.merge(tree["params"], tree.get("frozen") or {})}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    return jax.tree_util.tree_map(np.asarray, variables), step


def _meta(step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
    return {"step": step, "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
