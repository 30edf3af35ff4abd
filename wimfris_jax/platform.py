"""The platform a computation is compiled for: the one home of "which device is this for?".

Kernel choices that depend on the device -- the attention implementation (:mod:`wimfris_jax.attention`),
``train.remat="auto"`` (:func:`wimfris_jax.layers.resolve_remat`) and the selective scan's default
(:func:`wimfris_jax.ssm.scan.default_impl`) -- ask :func:`target_platform` while the model is traced. It is the
platform of the devices the function is compiled for when that function was wrapped by :func:`for_devices`
(the train step is, from its mesh), else JAX's default backend. So a step compiled ahead of time for a GPU or TPU
from a CPU host (``benchmarks/aot.py``) makes the choices the real device would make, and the same code traced
for the CPU host makes the CPU's.

Platforms are named as ``jax.default_backend()`` names them: ``"cpu"``, ``"gpu"`` (CUDA and ROCm), ``"tpu"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("wimfris_target_platform", default=None)
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
# libtpu (0.0.42.1) runs its compiler's work units on fibers whose stacks are too small for its convolution
# tiling search: the v5e compile of a train step with train.remat "dots" or "block" dies with "SIGSEGV STACK
# OVERFLOW" in FusedSpatialMajorConvolution::MakeConvWindows (tiny configs included). 1 MiB suffices for tiny
# configs; 16 MiB is reserved (not committed) per fiber stack.
LIBTPU_FLAGS = ("--fibers_default_thread_stack_size=16777216",)


def normalize(platform: str) -> str:
    """``"cuda"`` / ``"rocm"`` -> ``"gpu"``; others unchanged (lower case)."""
    platform = platform.lower()
    return _ALIASES.get(platform, platform)


def target_platform() -> str:
    """The platform being compiled for: the innermost :func:`targeting`, else ``jax.default_backend()``."""
    return _TARGET.get() or normalize(jax.default_backend())


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[str]:
    """Within the block, :func:`target_platform` is ``platform``."""
    token = _TARGET.set(normalize(platform))
    try:
        yield normalize(platform)
    finally:
        _TARGET.reset(token)


def platform_of(devices: Any) -> str:
    """The platform of a mesh (``jax.sharding.Mesh``), a sequence of devices or one device; devices of several
    platforms are refused."""
    if isinstance(devices, jax.sharding.Mesh):
        devices = devices.devices.flat
    elif not isinstance(devices, Sequence):
        devices = [devices]
    found = {normalize(d.platform) for d in devices}
    if len(found) != 1:
        raise ValueError(f"devices of {len(found)} platforms {sorted(found)}: compile for one")
    return found.pop()


def prepare_libtpu() -> None:
    """Add :data:`LIBTPU_FLAGS` to ``LIBTPU_INIT_ARGS`` (a flag the user set there wins). Call before JAX starts
    its backends; harmless where no TPU is used."""
    given = os.environ.get("LIBTPU_INIT_ARGS", "")
    names = {flag.split("=")[0] for flag in given.split()}
    extra = [flag for flag in LIBTPU_FLAGS if flag.split("=")[0] not in names]
    if extra:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([given, *extra]).strip()


def for_devices(fn: Callable, devices: Any) -> Callable:
    """``fn`` traced with :func:`target_platform` = the platform of ``devices`` (a mesh, devices or a device):
    wrap a function before ``jax.jit`` so that its kernels are chosen for the devices it is compiled for."""
    platform = platform_of(devices)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with targeting(platform):
            return fn(*args, **kwargs)

    return wrapped
