"""Every parameter a family trains learns: each leaf that ``train.trainable`` selects gets a non-zero gradient from
the family's own loss, in train mode, on a random batch.

A weight that nothing downstream of the loss reads (or a dead point such as two zero-initialised matrices that only
multiply each other) sits in the optimiser forever; this is the test that finds one. Each family either uses such a
weight as its paper does or lists it in :data:`the family row's untrainable list` (never trained, with the reason);
the test checks that those really cannot learn: their gradient is zero or rounding noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_model import small_tiny_config

from wimfris_jax import paths
from wimfris_jax.config import load_config
from wimfris_jax.io import flatten
from wimfris_jax.model import build_model, loss_fn, trainable_patterns

CONFIGS = ("small", "configs/detris_tiny.py", "configs/tfanet_tiny.py:quick", "configs/vipa_tiny.py:quick")


def _batch(config, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (2, S, S, 3) ~ N(0, 1) and ids (2, L): random words, the largest id closing the sentence (CLIP pools
    at its end-of-text token, the largest id), then padding."""
    size, length, vocab = int(config.model.image_size), int(config.model.word_len), int(config.model.text.vocab_size)
    k_img, k_ids = jax.random.split(key)
    images = jax.random.normal(k_img, (2, size, size, 3))
    ids = jax.random.randint(k_ids, (2, length), 1, vocab - 1)
    ends = jnp.array([length - 1, length // 2])
    pos = jnp.arange(length)[None]
    ids = jnp.where(pos < ends[:, None], ids, jnp.where(pos == ends[:, None], vocab - 1, 0))
    return images, ids.astype(jnp.int32)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_trainable_parameter_gets_a_gradient(path):
    config = small_tiny_config() if path == "small" else load_config(path)  # small: configs/tiny.py, fewer layers
    model = build_model(config.model)
    images, ids = _batch(config, jax.random.key(1))
    variables = jax.jit(lambda k: model.init(k, images, ids, train=False))(jax.random.key(0))
    selected, frozen = paths.split(variables["params"], tuple(config.train.trainable))  # exclusions left in
    extra = {k: v for k, v in variables.items() if k != "params"}
    logits = jax.eval_shape(lambda v: model.apply(v, images, ids, train=False), variables)
    logits = logits["logits"] if isinstance(logits, dict) else logits
    mask = (jax.random.uniform(jax.random.key(2), logits.shape) > 0.5).astype(jnp.float32)

    def loss(params):
        out, _ = model.apply({**extra, "params": paths.merge(params, frozen)}, images, ids, train=True,
                             rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])  # fmt: skip
        return loss_fn(config.model, out, mask)[0]

    grads = {k: float(np.abs(np.asarray(g)).max()) for k, g in flatten(jax.jit(jax.grad(loss))(selected)).items()}
    patterns = trainable_patterns(config)
    trains = {k for k in grads if paths.path_selected(k, patterns)}
    assert len(trains) > 10
    dead = sorted(k for k in trains if grads[k] == 0.0)
    assert not dead, f"{len(dead)} of {len(trains)} trainable leaves get no gradient: {dead}"
    top = max(grads.values())
    learns = sorted(k for k in set(grads) - trains if grads[k] > 1e-6 * top)  # not rounding noise
    assert not learns, f"listed as untrainable (the family row's untrainable list) but learn: {learns}"
