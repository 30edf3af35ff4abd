"""Compile-only devices for accelerators we do not own: NVIDIA GPUs from a target description, TPUs from libtpu.

GPU targets: XLA compiles for a GPU without one from a ``stream_executor.GpuTargetConfigProto`` text
(``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)``). :data:`GPUS` holds the
facts of each card (data sheets; the H200's memory as ``nvidia-smi`` reported it on the one we were lent) and
:func:`gpu_target_config` writes the proto text from them. Needs the CUDA plugin and cuDNN wheels, not a driver::

    pip install --target .aot_site "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')" \
        "jax-cuda12-pjrt==$(python -c 'import jax; print(jax.__version__)')" "nvidia-cudnn-cu12>=9.8,<10"
    PYTHONPATH=.aot_site python -m benchmarks.aot --target h200 ...

TPU targets: libtpu's compile-only topologies (``pip install --target .aot_site "libtpu==<jax[tpu]'s pin>"``), as
MaxText's ``train_compile.py`` makes them; :data:`TPUS` gives each slice's topology and per-chip HBM.
"""

from __future__ import annotations

import dataclasses
import os

from wimfris_jax.platform import prepare_libtpu

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA's GPU compiler needs to know of a card (per device)."""

    name: str
    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: int
    bandwidth: float  # bytes/s
    l2_bytes: int
    clock_ghz: float
    smem_per_sm: int  # shared memory per multiprocessor
    smem_optin: int  # shared memory a block may opt in to
    fp32_per_sm: int = 128


GPUS = {
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81_920 * MiB, 2.039e12, 40 * MiB, 1.41, 167_936, 166_912, 64),
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 81_559 * MiB, 3.35e12, 50 * MiB, 1.98, 233_472, 232_448),
    "h200": Gpu("NVIDIA H200", (9, 0), 132, 143_771 * MiB, 4.8e12, 50 * MiB, 1.98, 233_472, 232_448),
    "b200": Gpu("NVIDIA B200", (10, 0), 148, 183_359 * MiB, 8.0e12, 126 * MiB, 1.965, 233_472, 232_448),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tpu:
    """A TPU slice as libtpu's topology arguments, with each chip's HBM."""

    topology: str  # e.g. "v5e:2x2"
    chips_per_host_bounds: tuple[int, int, int]
    hbm_bytes: int


TPUS = {
    "v5e-1": Tpu("v5e:1x1", (1, 1, 1), 16 * 2**30),
    "v5e-4": Tpu("v5e:2x2", (2, 2, 1), 16 * 2**30),
    "v5p-8": Tpu("v5p:2x2x1", (2, 2, 1), 95 * 2**30),
    "v6e-4": Tpu("v6e:2x2", (2, 2, 1), 32 * 2**30),
}
TARGETS = tuple(GPUS) + tuple(TPUS)


def gpu_target_config(gpu: Gpu, cudnn: tuple[int, int] = (9, 8)) -> str:
    """``stream_executor.GpuTargetConfigProto`` text for ``gpu`` (the fields XLA's compiler reads)."""
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49_152,
        "shared_memory_per_core": gpu.smem_per_sm, "threads_per_core_limit": 2048, "core_count": gpu.sms,
        "fpus_per_core": gpu.fp32_per_sm, "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65_535,
        "block_dim_limit_z": 65_535, "memory_bandwidth": int(gpu.bandwidth), "l2_cache_size": gpu.l2_bytes,
        "clock_rate_ghz": gpu.clock_ghz, "device_memory_size": gpu.memory_bytes,
        "shared_memory_per_block_optin": gpu.smem_optin, "registers_per_core_limit": 65_536,
        "registers_per_block_limit": 65_536,
    }  # fmt: skip
    major, minor = gpu.compute_capability
    lines = [f"  {k}: {v}" for k, v in info.items()]
    lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} }}")
    return "\n".join(
        ["gpu_device_info {", *lines, "}", 'platform_name: "CUDA"',
         f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}", f'device_description_str: "{gpu.name}"']
    ) + "\n"  # fmt: skip


class TargetUnavailable(RuntimeError):
    """The compiler for a target is not installed here; the message says what to install."""


def target_devices(name: str, count: int = 1) -> tuple[list, int, str]:
    """``(compile-only devices, memory bytes per device, description)`` of target ``name`` (:data:`TARGETS`);
    ``count`` GPUs of one host (TPU slices have their own chip count)."""
    from jax.experimental import topologies

    if name in GPUS:
        gpu = GPUS[name]
        try:
            topo = topologies.get_topology_desc(
                platform="cuda", topology=f"1x1x{count}", target_config=gpu_target_config(gpu)
            )
        except Exception as e:  # no CUDA plugin: jax raises several types
            raise TargetUnavailable(f"cannot compile for {name}: {type(e).__name__}: {str(e)[:120]}; install the "
                                    "CUDA plugin and cuDNN wheels (benchmarks/aot_targets.py)") from e  # fmt: skip
        return list(topo.devices), gpu.memory_bytes, f"{count} x {gpu.name} (sm_{gpu.compute_capability[0]}"\
            f"{gpu.compute_capability[1]}, {gpu.memory_bytes / 2**30:.1f} GiB)"  # fmt: skip
    if name not in TPUS:
        raise ValueError(f"target {name!r}: choose one of {TARGETS}")
    tpu = TPUS[name]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # else a second process fails on libtpu's lockfile
    prepare_libtpu()
    try:
        topo = topologies.get_topology_desc(
            topology_name=tpu.topology, platform="tpu", chip_config_name="default",
            chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=1,
        )  # fmt: skip
    except Exception as e:
        raise TargetUnavailable(f"cannot compile for {name}: {type(e).__name__}: {str(e)[:120]}; install libtpu "
                                "(benchmarks/aot_targets.py)") from e  # fmt: skip
    devices = list(topo.devices)
    return devices, tpu.hbm_bytes, f"TPU {tpu.topology} ({len(devices)} chips, {tpu.hbm_bytes / 2**30:.0f} GiB each)"
