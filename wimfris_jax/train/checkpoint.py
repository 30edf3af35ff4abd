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

Only the training process writes: :class:`Checkpoints` creates the directories and removes its own unfinished
``<step>.orbax-checkpoint-tmp*`` folders. Readers (:func:`load_variables`: ``wimfris predict`` / ``eval``,
``load_model``) never create, clean up or lock anything: they list the committed step folders from the file
system, skip unfinished ones, and restore with a plain checkpointer, so a run can be watched while it trains.
A damaged checkpoint is skipped for the newest intact one, with a :class:`CheckpointFallbackWarning`.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from wimfris_jax.errors import one_line
from wimfris_jax.load import CheckpointError, CheckpointFallbackWarning, CheckpointMismatch, CheckpointNotFound
from wimfris_jax.train import freeze
from wimfris_jax.train.state import TrainState

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a save into "<step>.orbax-checkpoint-tmp[-<time>]", then renames


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

    def restore_best(self, target: Any) -> TrainState:
        best = self.best()
        if best is None:
            raise CheckpointNotFound(f"no best checkpoint under {self._best.directory}")
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
        folder = os.path.join(os.fspath(mngr.directory), str(step))
        check_fits(folder, target)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / grain raise many unrelated types
            _quiet_abandoned_reads()
            raise CheckpointError(f"cannot restore {folder}: {one_line(e)}") from e
        return restored["state"]


def check_fits(folder: str, target: Any) -> None:
    """Raises :class:`CheckpointMismatch` naming the first array of ``<folder>/state`` whose path or shape differs
    from ``target`` (a TrainState of ``jax.ShapeDtypeStruct``) with both shapes, and how many differ. Reads the
    metadata only; unreadable metadata is left for the restore to report."""
    try:  # the handler's metadata: the tree alone (the checkpointer's also wants a step metadata file)
        tree = _read(lambda c: c.handler.metadata(pathlib.Path(folder, "state")), folder)
    except CheckpointError:
        return
    got, want = _shapes(getattr(tree, "tree", tree)), _shapes(target)
    problems = [f"{p} is {got.get(p, 'absent')} in the checkpoint, {want.get(p, 'absent')} in the model"
                for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)]  # fmt: skip
    if got and problems:
        raise CheckpointMismatch(
            f"{folder} does not fit the model (was the model config changed since the run started?): "
            f"{problems[0]}" + (f"; {len(problems) - 1} more array(s) differ" if len(problems) > 1 else "")
        )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/neck/kernel": shape}`` of every array leaf (dicts, lists, dataclasses alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves
            if hasattr(x, "shape")}  # fmt: skip


# -- reading, never writing ----------------------------------------------------------------------------------
def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the committed checkpoints in ``directory`` (a run's ``checkpoints/`` or ``best/``), ascending.

    A folder named by its step number is committed (orbax renames a finished save into place); an unfinished
    ``<step>.orbax-checkpoint-tmp*`` folder is not. A missing directory has none. Reads the listing only.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _read(fn: Any, folder: str) -> Any:
    """``fn(checkpointer)`` with a plain (read-only, never creating or cleaning) checkpointer; any failure of
    orbax / TensorStore becomes a one-line :class:`CheckpointError` naming ``folder``."""
    ckptr = ocp.StandardCheckpointer()
    try:
        return fn(ckptr)
    except Exception as e:  # noqa: BLE001 - ValueError, FileNotFoundError, bare Exception from TensorStore, ...
        _quiet_abandoned_reads()
        raise CheckpointError(f"{folder} is damaged or incomplete ({one_line(e)})") from e
    finally:
        ckptr.close()


def _quiet_abandoned_reads() -> None:
    """After a failed restore, orbax's other pending reads end on its closed event loop and are reported as
    unraisable exceptions (dozens of tracebacks after the one-line error, some at exit). Installs once a
    ``sys.unraisablehook`` that drops those ("Event loop is closed", orbax coroutines) and passes on the rest."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_reads", False):
        return

    def hook(u: Any) -> None:
        code = getattr(u.object, "cr_code", None)
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        if not (closed or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)):
            previous(u)

    hook.drops_orbax_reads = True
    sys.unraisablehook = hook


def _candidates(path: str, which: str | int) -> list[str]:
    """Step folders to try for ``which``, in order of preference (see :func:`load_variables`)."""
    name = os.path.basename(path)
    if TMP_MARK in name:
        raise CheckpointError(f"{path} is an unfinished checkpoint (being written, or left by a killed run)")
    if os.path.isdir(os.path.join(path, "state")):  # one step folder: <run>/checkpoints/<N> or <run>/best/<N>
        if which != "auto" and str(which) != name:
            raise CheckpointError(f"{path} is a single checkpoint; step {which!r} applies to a run directory")
        return [path]
    last, best = os.path.join(path, "checkpoints"), os.path.join(path, "best")
    if not (os.path.isdir(last) or os.path.isdir(best)):
        raise CheckpointError(
            f"{path} is not a training run (no checkpoints/ or best/ in it) nor a step folder (<run>/checkpoints/<N>)"
        )
    lasts = [os.path.join(last, str(s)) for s in reversed(committed_steps(last))]
    bests = [os.path.join(best, str(s)) for s in reversed(committed_steps(best))]
    n = str(which)
    if n.isdigit():
        found = [f for f in (os.path.join(last, n), os.path.join(best, n)) if os.path.isdir(f)][:1]
    else:
        found = {"auto": bests + lasts, "best": bests, "latest": lasts}[n]
    if not found:
        hint = " (was an eval_fn given? --step latest reads checkpoints/)" if which == "best" else ""
        raise CheckpointNotFound(f"no checkpoint {which!r} in {path}{hint}; committed steps: {committed_steps(last)}")
    return found


def load_variables(path: str | os.PathLike, which: str | int = "auto") -> tuple[dict[str, Any], int]:
    """Flax variables ``{"params", "batch_stats"?}`` (numpy, all params merged) of a run, for evaluation / export.

    ``path``: a run directory, or one of its step folders (``<run>/checkpoints/<N>``, ``<run>/best/<N>``).
    ``which`` (a run directory): "auto" (the best, else the latest), "best", "latest" or a step number. A damaged
    checkpoint is skipped for the next one in that order (best, then newest to oldest) with a
    :class:`CheckpointFallbackWarning`; an explicitly numbered step is never replaced (:class:`CheckpointError`).
    Reads only: nothing is created or cleaned up, unfinished saves are ignored. Returns ``(variables, step)``.
    """
    if which not in ("auto", "best", "latest") and not str(which).isdigit():
        raise CheckpointError(f"checkpoint step {which!r}: expected 'auto', 'best', 'latest' or a step number")
    path = os.path.abspath(os.fspath(path))
    for _ in range(3):  # a folder deleted while read (the run keeps only its last N): list the run again
        vanished, skipped = False, []
        for folder in _candidates(path, which):
            try:
                tree = _read(lambda c, f=folder: c.restore(os.path.join(f, "state")), folder)
            except CheckpointError as e:
                if not os.path.isdir(folder):
                    vanished = True
                    break
                if str(which).isdigit():
                    raise
                skipped.append(str(e))
                continue
            if skipped:
                warnings.warn(
                    f"skipped {len(skipped)} damaged checkpoint(s), loaded {folder} instead; {skipped[0]}",
                    CheckpointFallbackWarning, stacklevel=2,
                )  # fmt: skip
            variables = {"params": freeze.merge(tree["params"], tree.get("frozen") or {})}
            if tree.get("batch_stats"):
                variables["batch_stats"] = tree["batch_stats"]
            name = os.path.basename(folder)
            return jax.tree_util.tree_map(np.asarray, variables), int(name if name.isdigit() else tree["step"])
        if not vanished:
            break
    if len(skipped) == 1:
        raise CheckpointError(skipped[0])
    raise CheckpointError(f"no intact checkpoint {which!r} in {path}: " + "; ".join(skipped or ["all vanished"]))


def _meta(step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
    return {"step": step, "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
