"""Test-wide setup. XLA_FLAGS must be set before JAX starts, so it is set here, at collection time:
eight virtual CPU devices let the sharding tests build an 8-device mesh on any machine."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
