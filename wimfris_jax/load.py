"""Load a ready-to-run model: ``model, variables = wimfris_jax.load_model(config, checkpoint)``.

    model, variables = wimfris_jax.load_model("configs/detris_b.py", "detris_b_refcoco.msgpack")
    logits = model.apply(variables, images, ids)        # (B, 448, 448, 3) f32, (B, L) i32 -> (B, 128, 128)

``images`` are letterboxed and normalised with CLIP's mean/std (data_pipeline/preprocess.py); ``ids`` are OpenAI
CLIP BPE ids ``[SOT] + text + [EOT]`` padded with 0 (DETRIS's convention; data_pipeline/tokenizer.py).

The returned model is ``build_model(config.model)`` cloned with ``logits_only=True``: without ``train`` it runs
in evaluation mode (BatchNorm running statistics, no dropout) and returns the mask logits alone; passing
``train=...`` explicitly gives the usual output dict. ``variables`` holds every collection the model has
("params" and, with BatchNorm, "batch_stats") as jax arrays.

``checkpoint`` is either
- a file written by ``python -m port_weights`` (``.msgpack``): a whole-model file holds the variables dict
  (``meta["collections"]``, e.g. the DETRIS converter's), any other holds params alone; or
- a training run directory (wimfris_jax/train/checkpoint.py layout): its best checkpoint if one was kept, else
  its latest; ``which`` picks "best", "latest" or a step. A damaged checkpoint is skipped for the newest intact
  one (with a warning) unless a step number was asked for. The run is only read, so it may be training; or
- one step folder of a run (``<run>/checkpoints/<N>``, ``<run>/best/<N>``); or
- a released DETRIS checkpoint by name (``hf:thuteam/DETRIS/base/base_refcoco.pth`` or a URL), fetched and converted
  once into the cache (:func:`wimfris_jax.pretrained.local_checkpoint`).

The checkpoint must fit the config exactly: a :class:`CheckpointMismatch` names every missing, unexpected and
mis-shaped variable, and a position-resampling rule in the file's meta that differs from the config's.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from data_pipeline.tokenizers import check_tokenizer, tokenizer_spec
from wimfris_jax.checkpoints import CheckpointMismatch, check_variables, expected_variables, read_checkpoint
from wimfris_jax.config import resolve_config
from wimfris_jax.io import flatten, unflatten
from wimfris_jax.model import build_model
from wimfris_jax.pretrained import local_checkpoint
from wimfris_jax.train.state import init_variables


def load_model(
    config: str | os.PathLike | Any, checkpoint: str | os.PathLike, *, which: str | int = "auto"
) -> tuple[Any, dict[str, Any]]:
    """``(model, variables)`` ready for ``model.apply(variables, images, ids) -> logits (B, 4h, 4w)``.

    Args:
      config: a config file (configs/*.py with ``get_config()``) or its ConfigDict (``config.model`` is read).
      checkpoint: a ``python -m port_weights`` file, a training run directory or one of its step folders.
      which: for a run directory: "auto" (best, else latest), "best", "latest" or a step number.

    Raises:
      CheckpointMismatch: the checkpoint's variables or position-resampling rule differ from the config's.
      CheckpointNotFound (a FileNotFoundError): no such checkpoint.
      CheckpointError (a ValueError): a damaged checkpoint (and no intact one to fall back to), a directory that
        is not a run, an unfinished save, a file that is not a parameter file.
    """
    checkpoint = local_checkpoint(checkpoint, config if isinstance(config, (str, os.PathLike)) else None)
    cfg, config_name = resolve_config(config)
    model_config = cfg.model if hasattr(cfg, "model") else cfg
    model = build_model(model_config).clone(logits_only=True)
    if hasattr(cfg, "data"):  # eval / predict tokenise with config.data.tokenizer
        check_tokenizer(model, tokenizer_spec(cfg.data))
    variables, meta = read_checkpoint(checkpoint, which)
    rule = meta.get("interpolation")
    want_rule = dict(model_config.vision).get("interpolation", "torchhub")
    if rule is not None and rule != want_rule:
        raise CheckpointMismatch(
            f"{os.fspath(checkpoint)} was converted from a source that resamples position embeddings with the "
            f"{rule!r} rule; {config_name} sets vision.interpolation={want_rule!r}"
        )
    check_variables(variables, expected_variables(model, model_config), os.fspath(checkpoint), config_name)
    variables = unflatten({k: jnp.asarray(v) for k, v in flatten(variables).items()})
    return model, variables


def pretrained_init_fn(model: Any, config: Any, inits: dict[str, str]) -> Any:
    """``rng -> variables`` for training (``wimfris train --init PREFIX=FILE``): random init with the ``inits``
    subtrees (``{"text_encoder": "clip_b16.msgpack"}``: converted files or run directories) replaced by their
    loaded params, each checked against the model first (:class:`CheckpointMismatch`)."""
    want = flatten(expected_variables(model, config.model)["params"])
    loaded = {}
    for prefix, path in inits.items():
        params = flatten(read_checkpoint(path)[0]["params"])
        sub = {k[len(prefix) + 1 :]: v for k, v in want.items() if k.startswith(prefix + "/")}
        if not sub:
            raise CheckpointMismatch(f"--init {prefix}: the model has no parameters under {prefix!r}")
        check_variables(params, sub, path, f"model subtree {prefix!r}")
        loaded.update({f"{prefix}/{k}": np.asarray(v) for k, v in params.items()})
    s, n = int(config.model.image_size), int(config.model.word_len)
    sample = {"image": np.zeros((1, s, s, 3), np.float32), "ids": np.zeros((1, n), np.int32)}

    def init_fn(rng: Any) -> dict[str, Any]:
        variables = init_variables(model, sample, rng)
        flat = flatten(variables["params"])
        flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in loaded.items()})
        return {**variables, "params": unflatten(flat)}

    return init_fn
