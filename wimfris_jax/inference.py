"""One inference path for evaluation, prediction and the demo: a jit-compiled forward in evaluation mode on batches of
one fixed size, and each logit map taken back to its original image as scoring does.

    forward_fn(model)                    (variables, images (B, S, S, 3), ids (B, L)) -> logits (B, h, w), cached
    predict_batch(forward, variables, images (n, S, S, 3), ids (n, L), inv_matrices (n, 2, 3), sizes [(H, W)] * n,
                  image_size, batch_size)  -> n bool masks (H_i, W_i)

A batch shorter than ``batch_size`` is padded by repeating its last record (one compiled shape for every batch),
and the padding is dropped after the forward. The post-processing is :func:`wimfris_jax.metrics.postprocess`
(sigmoid, bicubic, inverse letterbox warp, ``> 0.35``), the scoring protocol of DETRIS.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wimfris_jax.metrics import postprocess

Forward = Callable[[Any, Any, Any], jax.Array]
MAX_CACHED = 4  # models whose compiled forward is kept (eval after eval of one run reuses it; a long process with many
# models, e.g. a test session, does not keep every executable alive)
_FORWARDS: collections.OrderedDict[int, tuple[Any, Forward]] = collections.OrderedDict()  # id(model) -> (model, fn)


def forward_fn(model: Any) -> Forward:
    """Jit-compiled ``(variables, images (B, S, S, 3), ids (B, L)) -> logits (B, h, w)`` float32 in evaluation mode
    (``train=False``: BatchNorm running statistics, no dropout), one per model (cached)."""
    cached = _FORWARDS.get(id(model))
    if cached is not None and cached[0] is model:
        _FORWARDS.move_to_end(id(model))
        return cached[1]

    def forward(variables: Any, images: jax.Array, ids: jax.Array) -> jax.Array:
        out = model.apply(variables, images, ids, train=False)
        return (out["logits"] if isinstance(out, Mapping) else out).astype(jnp.float32)

    fn = jax.jit(forward)
    _FORWARDS[id(model)] = (model, fn)
    while len(_FORWARDS) > MAX_CACHED:
        _FORWARDS.popitem(last=False)
    return fn


def pad_batch(arrays: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Each (n, ...) array padded along its first axis to ``size`` by repeating its last record."""
    return [a if len(a) == size else np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) for a in arrays]


def predict_batch(
    forward: Forward,
    variables: Any,
    images: np.ndarray,
    ids: np.ndarray,
    inv_matrices: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    image_size: int,
    batch_size: int,
    sharding: Any = None,
    post: Callable[..., Any] = postprocess,
) -> list[Any]:
    """The original-size bool masks (H_i, W_i) of ``n <= batch_size`` letterboxed, normalised images (n, S, S, 3)
    and their ids (n, L): one forward call on the batch padded to ``batch_size``; ``sharding``: where the batch goes
    (several local devices), else the default device. ``post(logits (h, w), inv_matrix, (H, W), image_size)``: what
    each logit map becomes (default :func:`~wimfris_jax.metrics.postprocess`, the bool mask)."""
    n = len(images)
    if not 0 < n <= batch_size:
        raise ValueError(f"predict_batch: {n} records for a batch of {batch_size}")
    x, t = pad_batch([np.asarray(images), np.asarray(ids)], batch_size)
    if sharding is not None:
        x, t = jax.device_put((x, t), sharding)
    logits = np.asarray(forward(variables, x, t))[:n]
    return [post(lg, m, (int(h), int(w)), image_size) for lg, m, (h, w) in zip(logits, inv_matrices, sizes)]
