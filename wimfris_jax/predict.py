"""Masks for new images: image files + one sentence -> mask and overlay PNGs (``wimfris predict``).

Each image is preprocessed as DETRIS evaluates (``data_pipeline.preprocess``: letterbox to S x S, CLIP
normalisation; the sentence tokenised to ``word_len`` ids) and the model's logits are taken back to the
original image exactly as in scoring (:func:`wimfris_jax.metrics.postprocess`: sigmoid, bicubic, inverse
letterbox, ``> 0.35``), so a saved mask is the one the metrics would score.

The model comes from :func:`wimfris_jax.load.load_model` (a training run directory or a converted weights
file); the config, when not given, is the ``config.json`` a training run writes into its directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from data_pipeline.preprocess import ExampleError, inverse_letterbox_matrix, letterbox_image, load_image, normalize
from data_pipeline.tokenizer import clean, text_ids
from wimfris_jax.config import load_config, read_run_config
from wimfris_jax.errors import UserError
from wimfris_jax.evaluate import data_settings, forward_fn
from wimfris_jax.io import ensure_writable_dir
from wimfris_jax.load import load_model
from wimfris_jax.metrics import postprocess
from wimfris_jax.visualize import mask_image, overlay, save_png

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class PredictError(UserError, ValueError):
    """Bad input to prediction; the message is one line naming the file or argument at fault."""


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files named by ``inputs`` (files, or folders whose image files are taken in name order)."""
    if not inputs:
        raise PredictError("no input image given")
    paths: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f)
                for f in os.listdir(p)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(p, f))
            )
            if not found:
                raise PredictError(f"folder {p} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise PredictError(f"no such image file or folder: {p}")
    return paths


def check_sentence(text: str | None) -> str:
    """The sentence, or PredictError when it is empty after CLIP's clean-up."""
    if text is None or not clean(text):
        raise PredictError(f"empty sentence {text!r}: give --text a description of the object to segment")
    return text


def read_images(paths: Sequence[str]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """``({i: uint8 RGB (H, W, 3)} of the readable files, {i: one-line message} of the others)``, by position."""
    images, bad = {}, {}
    for i, p in enumerate(paths):
        try:
            images[i] = load_image(p)
        except ExampleError as e:
            bad[i] = f"{p} is not a readable image ({str(e).splitlines()[0]})"
    return images, bad


def find_config(checkpoint: str, config: str | None = None) -> Any:
    """``config`` (a config file) if given, else the ``config.json`` of the run that wrote ``checkpoint`` (the run
    directory, or the run of a step folder ``<run>/checkpoints/<N>``; a config in the schema before the adapter
    schema is upgraded, :func:`wimfris_jax.config.read_run_config`). PredictError if ``checkpoint`` is missing."""
    if not os.path.exists(checkpoint):
        raise PredictError(f"no such checkpoint: {checkpoint}")
    if config:
        return load_config(config)
    start = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    for d in (start, os.path.dirname(start), os.path.dirname(os.path.dirname(start))):
        path = os.path.join(d, "config.json")
        if os.path.isfile(path):
            return read_run_config(path)
    raise PredictError(f"no config.json found beside {checkpoint}; pass --config")


def predict_masks(
    model: Any,
    variables: Any,
    images: Sequence[np.ndarray],
    sentence: str,
    *,
    image_size: int,
    word_len: int,
    batch_size: int = 8,
    progress: bool = False,
    tokenizer: str = "clip",
) -> list[np.ndarray]:
    """(H_i, W_i) bool masks of the object ``sentence`` names in each uint8 RGB image (``tokenizer``: see
    :func:`data_pipeline.tokenizer.text_ids`)."""
    ids = text_ids(check_sentence(sentence), word_len, tokenizer)[0]
    forward = forward_fn(model)
    masks: list[np.ndarray] = []
    for start in tqdm.trange(0, len(images), batch_size, desc="predict", disable=not progress, leave=False):
        chunk = list(images[start : start + batch_size])
        x = np.stack([normalize(letterbox_image(im, image_size)) for im in chunk])
        n = len(chunk)
        if n < batch_size:  # one compiled shape for every batch
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
        logits = np.asarray(forward(variables, x, np.repeat(ids[None], batch_size, axis=0)))[:n]
        for im, lg in zip(chunk, logits):
            h, w = im.shape[:2]
            masks.append(postprocess(lg, inverse_letterbox_matrix(h, w, image_size), (h, w), image_size))
    return masks


def _names(paths: Sequence[str]) -> list[str]:
    """Output stems: the file stems, made unique with _2, _3, ..."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def run(
    checkpoint: str,
    inputs: Sequence[str],
    text: str,
    out: str,
    *,
    config: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    which: str | int = "auto",
) -> list[dict[str, Any]]:
    """Predicts and writes ``<out>/<stem>_mask.png`` (0 / 255) and ``<out>/<stem>_overlay.png`` per image.

    Everything is checked before the model is loaded: the sentence, the inputs, the checkpoint and its config, and
    ``out`` (created, and a writable folder). An image that cannot be read is skipped, the others are predicted.
    ``which``: the checkpoint of a run directory ("auto", "best", "latest" or a step; see ``load_model``).
    Returns one record per image, in input order: {"image", "mask", "overlay" (paths), "area" (foreground
    fraction)}, or {"image", "error" (one line)} for an unreadable one. PredictError if no image is readable.
    """
    if batch_size < 1:
        raise PredictError(f"batch size must be a positive integer, got {batch_size}")
    check_sentence(text)
    paths = collect_images(inputs)
    images, bad = read_images(paths)
    if not images:
        msgs = list(bad.values())
        raise PredictError(
            msgs[0] if len(msgs) == 1 else f"none of the {len(msgs)} images is readable: " + "; ".join(msgs)
        )
    cfg = find_config(checkpoint, config)
    settings = data_settings(cfg)
    fresh = not os.path.exists(out)
    ensure_writable_dir(out, "--out")
    try:
        model, variables = load_model(cfg, checkpoint, which=which)
    except BaseException:
        if fresh:  # a checkpoint that cannot be loaded leaves no empty --out behind
            os.rmdir(out)
        raise
    masks = predict_masks(
        model, variables, list(images.values()), text, image_size=settings["image_size"],
        word_len=settings["word_len"], batch_size=min(batch_size, len(images)), progress=progress,
        tokenizer=settings["tokenizer"],
    )  # fmt: skip
    records = [{"image": p, "error": bad[i]} if i in bad else None for i, p in enumerate(paths)]
    stems = _names(paths)
    for (i, image), mask in zip(images.items(), masks):
        records[i] = {
            "image": paths[i],
            "mask": save_png(os.path.join(out, f"{stems[i]}_mask.png"), mask_image(mask)),
            "overlay": save_png(os.path.join(out, f"{stems[i]}_overlay.png"), overlay(image, mask)),
            "area": float(mask.mean()),
        }
    return records
