"""Evaluation of a referring-segmentation model on a source of raw examples, scored as DETRIS scores.

Protocol (DETRIS ``engine/engine.py`` ``inference``; :mod:`wimfris_jax.metrics`): every expression is
preprocessed by ``data_pipeline.preprocess.preprocess_eval`` (letterbox to S x S, CLIP normalisation, the
inverse letterbox matrix and the original-size mask), the model runs in evaluation mode (``train=False``:
BatchNorm running statistics, no dropout) in jit-compiled batches of a fixed size (the last batch is padded
and the padding ignored), and each logit map is taken back to the original image by
:func:`~wimfris_jax.metrics.postprocess` (sigmoid, bicubic, inverse warp, ``> 0.35``) and scored against the
original mask by :class:`~wimfris_jax.metrics.RefMetrics` (mIoU, oIoU, Prec@0.5..0.9).

``swap_sentences=True`` (the synthetic set, ``data_pipeline.synthetic``) feeds each example's
"distractor_sentence" (an expression naming another object of the same image) while scoring against the
original target: a model that reads the sentence must score low there.

Multi-host: each process reads its own shard of the source (``data_pipeline.loader.make_loader``), runs the
forward on its local devices and the (I, U) counts of all processes are gathered before scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from data_pipeline.loader import make_loader
from data_pipeline.preprocess import describe, preprocess_eval
from data_pipeline.tokenizers import DEFAULT_TOKENIZER
from wimfris_jax.errors import UserError
from wimfris_jax.inference import forward_fn, predict_batch
from wimfris_jax.metrics import RefMetrics


class EvalError(UserError, ValueError):
    """A bad evaluation setting (split, data source, batch size, ...); the message names it."""


def data_settings(config: Any) -> dict[str, Any]:
    """image_size, word_len, max_size (eval mask padding, default 640) and tokenizer ("clip" unless the config names
    one, :func:`data_pipeline.tokenizers.text_ids`) from ``config.data`` (or config.model)."""
    data = config.data if hasattr(config, "data") else config
    model = config.model if hasattr(config, "model") else config
    get = lambda key, default=None: data.get(key, model.get(key, default))  # noqa: E731
    size, word_len = get("image_size"), get("word_len")
    if size is None or word_len is None:
        raise EvalError("the config names no image_size / word_len (config.data or config.model)")
    return {
        "image_size": int(size),
        "word_len": int(word_len),
        "max_size": int(get("max_size", 640)),
        "tokenizer": str(get("tokenizer", DEFAULT_TOKENIZER)),
    }


class _Head:
    """The first ``n`` records of a source (``max_examples``)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return self.source[int(index)]

    def __repr__(self) -> str:
        return f"_Head({self.source!r}, n={self.n})"


def _transform(settings: Mapping[str, Any], swap_sentences: bool, source: Any) -> Callable:
    def transform(example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        del rng
        if swap_sentences:
            if "distractor_sentence" not in example:
                raise EvalError(
                    f"swap_sentences needs examples with a 'distractor_sentence' (the synthetic set); "
                    f"{describe(example)} of {source!r} has none"
                )
            example = {**example, "sentence": example["distractor_sentence"]}
        return preprocess_eval(example, **settings)

    return transform


def _local(variables: Any) -> Any:
    """Variables usable by a jit on this process's devices (global multi-host arrays are gathered)."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree_util.tree_map(one, variables)


def evaluate(
    model: Any,
    variables: Any,
    source: Any,
    *,
    config: Any,
    batch_size: int,
    swap_sentences: bool = False,
    max_examples: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """Scores ``model`` on every expression of ``source`` (module docstring).

    Args:
      model: flax module; ``model.apply(variables, images, ids, train=False)`` gives logits (B, h, w) or a
        dict holding "logits".
      variables: its variables ({"params", "batch_stats"?}).
      source: random-access source of raw examples ("image", "mask", "sentence", ...).
      config: the run's config (``config.data``: image_size, word_len, max_size).
      batch_size: examples per forward pass (per process); the last batch is padded.
      swap_sentences: score the "distractor_sentence" of each example against the original target.
      max_examples: evaluate the first ``max_examples`` records only.

    Returns:
      {"mIoU", "oIoU", "Prec@0.5", ..., "Prec@0.9", "n"} as fractions (n = number of expressions).
    """
    if batch_size <= 0:
        raise EvalError(f"batch_size must be positive, got {batch_size}")
    if max_examples is not None:
        if max_examples <= 0:
            raise EvalError(f"max_examples must be positive, got {max_examples}")
        source = _Head(source, max_examples)
    settings = data_settings(config)
    nproc = jax.process_count()
    loader = make_loader(
        source,
        _transform(settings, swap_sentences, source),
        global_batch_size=batch_size * nproc,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    forward = forward_fn(model)
    variables = _local(variables)
    devices = jax.local_devices()
    batch_sharding = None
    if len(devices) > 1 and batch_size % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    local = len(source) // nproc + (jax.process_index() < len(source) % nproc)
    counts: list[tuple[int, int]] = []
    with tqdm.tqdm(total=local, desc=desc, disable=not progress or jax.process_index() != 0, leave=False) as bar:
        for batch in loader:
            sizes = [(int(h), int(w)) for h, w in batch["orig_size"]]
            preds = predict_batch(forward, variables, batch["image"], batch["ids"], batch["inv_matrix"], sizes,
                                  settings["image_size"], batch_size, batch_sharding)  # fmt: skip
            for i, (pred, (h, w)) in enumerate(zip(preds, sizes)):
                gt = batch["mask"][i, :h, :w].astype(bool)
                counts.append((int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())))
            bar.update(len(sizes))

    metrics = RefMetrics()
    for inter, union in _gather(counts):
        metrics.update_iu(inter, union)
    return metrics.compute()


def _gather(counts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(I, U) of every process (one process: unchanged)."""
    if jax.process_count() == 1:
        return counts
    n = np.asarray(multihost_utils.process_allgather(np.int64(len(counts))))
    rows = np.zeros((int(n.max()), 2), np.int64)
    rows[: len(counts)] = np.asarray(counts, np.int64).reshape(-1, 2)
    every = np.asarray(multihost_utils.process_allgather(rows))  # (P, max_n, 2)
    return [(int(i), int(u)) for p in range(len(n)) for i, u in every[p, : int(n[p])]]


def make_eval_fn(
    config: Any, model: Any, source: Any, *, batch_size: int, max_examples: int | None = None
) -> Callable[[Any], dict[str, float]]:
    """``state -> metrics`` for :func:`wimfris_jax.train.loop.train` (evaluates ``state.variables()``)."""

    def eval_fn(state: Any) -> dict[str, float]:
        return evaluate(
            model, state.variables(), source, config=config, batch_size=batch_size, max_examples=max_examples
        )

    return eval_fn
