"""The one timing helper of the benchmarks: wall seconds of repeated calls after warm-up calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the first also compiles, for
    jit). ``fn`` must return only once its work is done (``jax.block_until_ready`` inside, for JAX)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of :func:`call_times`."""
    return 1e3 * statistics.median(call_times(fn, repeats, warmup))
