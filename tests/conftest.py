"""Test-wide setup. XLA_FLAGS must be set before JAX starts, so it is set here, at collection time:
eight virtual CPU devices let the sharding tests build an 8-device mesh on any machine.

The test helpers beside this file (toy_model.py, fake_refcoco.py) are imported by their plain names
(``from fake_refcoco import write_fake_refcoco``): this folder is put on ``sys.path`` here, whatever pytest's
import mode."""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
