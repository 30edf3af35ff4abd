import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wimfris_jax.io import flatten
from wimfris_jax.paths import merge, split

PARAMS = {
    "image_encoder": {"blocks_0": {"kernel": jnp.ones((2, 2))}},
    "msa_1": {"down": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}},
    "decoder": {"norm": {"scale": jnp.ones(2)}},
}


def test_split_merge_roundtrip_and_grads_only_for_trainable():
    trainable, frozen = split(PARAMS, [r"^msa_", r"^decoder/"])
    assert set(flatten(trainable)) == {"msa_1/down/kernel", "msa_1/down/bias", "decoder/norm/scale"}
    assert set(flatten(frozen)) == {"image_encoder/blocks_0/kernel"}
    back = merge(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(PARAMS)

    def loss(t):
        p = merge(t, frozen)
        return jnp.sum(p["msa_1"]["down"]["kernel"]) * jnp.sum(p["image_encoder"]["blocks_0"]["kernel"])

    g = jax.grad(loss)(trainable)
    assert set(flatten(g)) == set(flatten(trainable))
    np.testing.assert_allclose(g["msa_1"]["down"]["kernel"], 4.0)


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="msa_typo"):
        split(PARAMS, [r"^msa_typo"])
