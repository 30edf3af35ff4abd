"""Kernel choices follow the platform compiled for (wimfris_jax/platform.py), not the host's: attention, remat
"auto" and the scan default, under ``targeting`` and through ``for_devices`` (the train step's wrapper)."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wimfris_jax import attention as att
from wimfris_jax.layers import resolve_remat
from wimfris_jax.platform import LIBTPU_FLAGS, for_devices, platform_of, prepare_libtpu, target_platform, targeting
from wimfris_jax.ssm.scan import default_impl
from wimfris_jax.train import sharding


def _fake(platform):
    return types.SimpleNamespace(platform=platform)


def test_targeting_nests_and_defaults_to_the_host():
    assert target_platform() == jax.default_backend() == "cpu"
    with targeting("cuda") as outer:
        assert outer == target_platform() == "gpu"
        with targeting("tpu"):
            assert target_platform() == "tpu"
        assert target_platform() == "gpu"
    assert target_platform() == "cpu"


def test_platform_of_meshes_and_devices():
    assert platform_of(sharding.make_mesh(jax.devices()[:1])) == platform_of(jax.devices()[0]) == "cpu"
    assert platform_of([_fake("cuda"), _fake("cuda")]) == platform_of([_fake("rocm")]) == "gpu"
    with pytest.raises(ValueError, match="devices of 2 platforms"):
        platform_of([_fake("cuda"), _fake("tpu")])


def test_every_choice_follows_the_target():
    half = jnp.zeros((2, 1029, 12, 64), jnp.bfloat16)
    choices = lambda: (att.resolve("auto", half, half), resolve_remat("auto"), default_impl(None, 18, 2**21))  # noqa: E731
    assert choices() == ("chunked", "none", "sequential")
    with targeting("gpu"):
        assert choices() == ("cudnn", "dots", "unrolled")
    with targeting("tpu"):
        assert choices() == ("xla", "dots", "associative")


def test_for_devices_sets_the_platform_while_tracing():
    seen = []

    def fn(x):
        seen.append(target_platform())
        return x * 2

    out = jax.jit(for_devices(fn, [_fake("cuda")]))(np.ones(3, np.float32))  # traced for a GPU, run on this CPU
    np.testing.assert_array_equal(out, 2 * np.ones(3))
    assert seen == ["gpu"] and target_platform() == "cpu"


def test_prepare_libtpu_adds_the_fiber_stack_flag_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    prepare_libtpu()
    assert os.environ["LIBTPU_INIT_ARGS"] == " ".join(LIBTPU_FLAGS)
    prepare_libtpu()  # idempotent
    assert os.environ["LIBTPU_INIT_ARGS"] == " ".join(LIBTPU_FLAGS)
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_foo=1 --fibers_default_thread_stack_size=1048576")
    prepare_libtpu()  # the user's value of the same flag wins
    assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_foo=1 --fibers_default_thread_stack_size=1048576"
