"""Reading a training run's checkpoints, never writing: ``wimfris predict`` / ``eval``, ``load_model``, resume checks.

Readers never create, clean up or lock anything: they list the committed step folders from the file system
(:func:`committed_steps`), skip unfinished ones, and restore with a plain checkpointer, so a run can be read while it
trains. A damaged checkpoint is skipped for the newest intact one, with a :class:`CheckpointFallbackWarning`.
Arrays are restored onto this process's own first device whatever devices and processes wrote them (one process or
many, replicated or FSDP); resume restores onto the current mesh's shardings (:func:`restore_target`).

A run that saves often deletes its older steps (it keeps its last N), possibly in the middle of a read: orbax
removes a step's files, then its folders, right after it commits a newer step. A read that fails on such a step is
not a damaged checkpoint: :func:`load_variables` lists the run again and reads its newest intact step, up to
:data:`VANISHED_RETRIES` times.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from wimfris_jax import paths
from wimfris_jax.checkpoints.errors import (
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointMismatch,
    CheckpointNotFound,
)
from wimfris_jax.errors import one_line

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a save into "<step>.orbax-checkpoint-tmp[-<time>]", then renames
VANISHED_RETRIES = 20  # readings of a run whose chosen step was deleted by the run while read, before giving up
DELETION_GRACE_S = 1.0  # how long a failed read waits for an older step to vanish (orbax deleting it) to tell so
_TENSORSTORE_STATUS = re.compile(r"[A-Z]+(?:_[A-Z]+)*: ")  # absl::Status codes: "NOT_FOUND: ", "OUT_OF_RANGE: "


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


def restore_target(tree: Any) -> Any:
    """The orbax restore target that places every array of ``tree`` on this process's devices, whatever device or
    process layout wrote the checkpoint: the one home of restore shardings, for resume and the readers alike.

    ``tree``: a restore target (a TrainState of ``jax.ShapeDtypeStruct`` with the current mesh's shardings: each
    keeps its own) or a checkpoint's metadata tree (``ArrayMetadata``, whose saved sharding names the writer's
    devices: ignored). An array leaf without a ``jax.sharding.Sharding`` of its own goes to this process's first
    device, so orbax never rebuilds the writer's sharding, which fails ("Topology mismatch") or spans other
    processes' devices where the reader's devices differ. Scalars and non-array leaves are left as they are."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> Any:
        if isinstance(x, ocp.metadata.ScalarMetadata) or not (hasattr(x, "shape") and hasattr(x, "dtype")):
            return x
        own = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=own if isinstance(own, jax.sharding.Sharding) else here)

    return jax.tree_util.tree_map(leaf, tree)


def _restore_here(ckptr: Any, folder: str) -> Any:
    """``<folder>/state`` restored as a nested dict on this process's first device (:func:`restore_target`)."""
    state = pathlib.Path(folder, "state")
    metadata = ckptr.handler.metadata(state)
    return ckptr.restore(state, restore_target(getattr(metadata, "tree", metadata)))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/neck/kernel": shape}`` of every array leaf (dicts, lists, dataclasses alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves
            if hasattr(x, "shape")}  # fmt: skip


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
    quiet_abandoned_io()  # before: a failed read's abandoned ones are reported while it fails
    ckptr = ocp.StandardCheckpointer()
    try:
        return fn(ckptr)
    except Exception as e:  # noqa: BLE001 - ValueError, FileNotFoundError, bare Exception from TensorStore, ...
        raise CheckpointError(f"{folder} is damaged or incomplete ({one_line(e)})") from e
    finally:
        ckptr.close()


def quiet_abandoned_io() -> None:
    """When a restore or save fails, orbax's other pending reads or writes end on its closed event loop and are
    reported as unraisable exceptions, or logged by asyncio as "Task exception was never retrieved": dozens of
    tracebacks around the one-line error, some at exit. Installs once, for the process, a ``sys.unraisablehook``
    that drops those ("Event loop is closed", orbax coroutines) and passes on the rest, and a filter of the asyncio
    logger that drops its records of exceptions raised in orbax."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_reads", False):
        return
    logging.getLogger("asyncio").addFilter(_not_from_orbax)

    def hook(u: Any) -> None:
        code = getattr(u.object, "cr_code", None)
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        if not (closed or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)):
            previous(u)

    hook.drops_orbax_reads = True
    sys.unraisablehook = hook


def _not_from_orbax(record: logging.LogRecord) -> bool:
    """asyncio logger filter: False for a record of an exception whose traceback passes through orbax, or of a
    TensorStore error (a future set from C++, no traceback; its message starts with a status: "NOT_FOUND: ...")."""
    if not record.exc_info or record.exc_info[1] is None:
        return True
    if _TENSORSTORE_STATUS.match(str(record.exc_info[1])):
        return False
    tb = record.exc_info[2]
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


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
    A step deleted by its run while read is replaced by the run's newest intact one (module docstring).
    Reads only: nothing is created or cleaned up, unfinished saves are ignored. Returns ``(variables, step)``.
    """
    if which not in ("auto", "best", "latest") and not str(which).isdigit():
        raise CheckpointError(f"checkpoint step {which!r}: expected 'auto', 'best', 'latest' or a step number")
    path = os.path.abspath(os.fspath(path))
    for _ in range(VANISHED_RETRIES):
        vanished, skipped = None, []
        for folder in _candidates(path, which):
            try:
                tree = _read(lambda c, f=folder: _restore_here(c, f), folder)
            except CheckpointError as e:
                if _deleted_by_run(folder):
                    vanished = folder
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
            variables = {"params": paths.merge(tree["params"], tree.get("frozen") or {})}
            if tree.get("batch_stats"):
                variables["batch_stats"] = tree["batch_stats"]
            name = os.path.basename(folder)
            return jax.tree_util.tree_map(np.asarray, variables), int(name if name.isdigit() else tree["step"])
        if vanished is None:
            break
        if vanished == path or str(which).isdigit():  # asked for that very step: no other will do
            raise CheckpointNotFound(f"{vanished} was deleted by its training run while read (a run keeps only its "
                                     "last checkpoints)")  # fmt: skip
    else:
        raise CheckpointError(
            f"the newest checkpoint of {path} was deleted by its training run while read, {VANISHED_RETRIES} times "
            "in a row (it saves faster than it can be read); try again, or read a run that keeps more checkpoints"
        )
    if len(skipped) == 1:
        raise CheckpointError(skipped[0])
    raise CheckpointError(f"no intact checkpoint {which!r} in {path}: " + "; ".join(skipped))


def _deleted_by_run(folder: str) -> bool:
    """Whether the step folder ``folder``, whose read failed, was or is being deleted by its run: it is gone, or it
    disappears within :data:`DELETION_GRACE_S` while a newer step of its series is committed (orbax deletes a step's
    files, then its folders, right after committing a newer one). A damaged newest step is told at once."""
    series, name = os.path.split(folder)
    deadline = time.monotonic() + DELETION_GRACE_S
    while os.path.isdir(folder):
        newer = name.isdigit() and any(s > int(name) for s in committed_steps(series))
        if not newer or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
