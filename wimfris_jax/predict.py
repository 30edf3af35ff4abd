"""Masks for new images: image files + one sentence -> mask and overlay PNGs (``wimfris predict``).

Each image is preprocessed as DETRIS evaluates (``data_pipeline.preprocess``: letterbox to S x S, CLIP
normalisation; the sentence tokenised to ``word_len`` ids) and the model's logits are taken back to the
original image exactly as in scoring (:func:`wimfris_jax.metrics.postprocess`: sigmoid, bicubic, inverse
letterbox, ``> 0.35``), so a saved mask is the one the metrics would score.

The model comes from :func:`wimfris_jax.load.load_model` (a training run directory or a converted weights
file); the config, when not given, is the ``config.json`` a training run writes into its directory.

Images are checked by their headers before the model is loaded (:func:`data_pipeline.images.image_size`: readable,
and within the pixel limit ``WIMFRIS_MAX_IMAGE_PIXELS``), then decoded one batch at a time as the model needs them
(:func:`predict_stream`): a folder of any length holds at most one batch of decoded images in memory. A file that
fails either step is reported in one line and skipped; the others are predicted.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm

from data_pipeline.images import ExampleError, ImageTooLargeError, image_size, load_image
from data_pipeline.preprocess import inverse_letterbox_matrix, letterbox_image, normalize
from data_pipeline.tokenizer import clean
from data_pipeline.tokenizers import DEFAULT_TOKENIZER, text_ids
from wimfris_jax.config import resolve_config
from wimfris_jax.errors import UserError
from wimfris_jax.evaluate import data_settings
from wimfris_jax.inference import forward_fn, predict_batch
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


def unreadable_image(path: str, error: ExampleError) -> str:
    """The one-line report of an image that cannot be used."""
    if isinstance(error, ImageTooLargeError):
        return str(error)  # names the file, its size and the limit
    return f"{path} is not a readable image ({str(error).splitlines()[0]})"


def check_images(paths: Sequence[str]) -> tuple[list[int], dict[int, str]]:
    """``(positions of the files whose header is readable and within the pixel limit, {i: one-line message} of the
    others)``, from the headers alone: nothing is decoded."""
    readable, bad = [], {}
    for i, p in enumerate(paths):
        try:
            image_size(p)
            readable.append(i)
        except ExampleError as e:
            bad[i] = unreadable_image(p, e)
    return readable, bad


def find_config(checkpoint: str, config: str | None = None) -> Any:
    """``config`` (a config file) if given, else the ``config.json`` of the run that wrote ``checkpoint``
    (:func:`wimfris_jax.config.resolve_config`); a missing checkpoint is named first."""
    if not os.path.exists(checkpoint):
        raise PredictError(f"no such checkpoint: {checkpoint}")
    return resolve_config(config or None, checkpoint)[0]


def batch_masks(
    forward: Any,
    variables: Any,
    images: Sequence[np.ndarray],
    ids: np.ndarray,
    image_size: int,
    post: Any = postprocess,
) -> list[Any]:
    """(H_i, W_i) bool masks of ``images`` (at most B uint8 RGB (H_i, W_i, 3)) from one forward call on ``ids``
    (B, L), the batch padded to B by repeating its last image (one compiled shape for every batch); ``post``: see
    :func:`~wimfris_jax.inference.predict_batch`."""
    x = np.stack([normalize(letterbox_image(im, image_size)) for im in images])
    sizes = [im.shape[:2] for im in images]
    inv = [inverse_letterbox_matrix(h, w, image_size) for h, w in sizes]
    return predict_batch(forward, variables, x, ids[: len(images)], inv, sizes, image_size, len(ids), post=post)


def predict_stream(
    model: Any,
    variables: Any,
    images: Iterable[tuple[Any, np.ndarray]],
    sentence: str,
    *,
    image_size: int,
    word_len: int,
    batch_size: int = 8,
    progress: bool = False,
    total: int | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """Yields ``(key, image, mask)`` for each ``(key, uint8 RGB (H, W, 3) image)`` of ``images``, in order: the mask
    (H, W) bool of the object ``sentence`` names (``tokenizer``: see :func:`data_pipeline.tokenizers.text_ids`).

    ``images`` is consumed ``batch_size`` items at a time, and a batch is let go before the next is drawn: given a
    generator that decodes lazily, at most one batch of decoded images is alive (besides the one the caller holds).
    ``total``: the number of images, for the progress bar.
    """
    ids = np.repeat(text_ids(check_sentence(sentence), word_len, tokenizer)[0][None], batch_size, axis=0)
    forward = forward_fn(model)
    items = iter(images)
    with tqdm.tqdm(total=total, desc="predict", disable=not progress, leave=False) as bar:
        while chunk := list(itertools.islice(items, batch_size)):
            masks = batch_masks(forward, variables, [im for _, im in chunk], ids, image_size)
            bar.update(len(chunk))
            for (key, image), mask in zip(chunk, masks):
                yield key, image, mask
            chunk = masks = image = None  # released before the next batch is decoded


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
    tokenizer: str = DEFAULT_TOKENIZER,
) -> list[np.ndarray]:
    """(H_i, W_i) bool masks of the object ``sentence`` names in each uint8 RGB image (``tokenizer``: see
    :func:`data_pipeline.tokenizers.text_ids`); :func:`predict_stream` over images already in memory."""
    stream = predict_stream(
        model, variables, enumerate(images), sentence, image_size=image_size, word_len=word_len,
        batch_size=batch_size, progress=progress, total=len(images), tokenizer=tokenizer,
    )  # fmt: skip
    return [mask for _, _, mask in stream]


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

    Everything is checked before the model is loaded: the sentence, the inputs, the images' headers, the checkpoint
    and its config, and ``out`` (created, and a writable folder). The images are then decoded one batch at a time (at
    most one batch in memory, :func:`predict_stream`); an image that cannot be read or is above the pixel limit is
    skipped, the others are predicted.
    ``which``: the checkpoint of a run directory ("auto", "best", "latest" or a step; see ``load_model``).
    Returns one record per image, in input order: {"image", "mask", "overlay" (paths), "area" (foreground
    fraction)}, or {"image", "error" (one line)} for an unusable one. PredictError if no image header is readable.
    """
    if batch_size < 1:
        raise PredictError(f"batch size must be a positive integer, got {batch_size}")
    check_sentence(text)
    paths = collect_images(inputs)
    readable, bad = check_images(paths)
    if not readable:
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
    records: list[dict[str, Any]] = [{"image": p, "error": bad[i]} if i in bad else {"image": p} for i, p in
                                     enumerate(paths)]  # fmt: skip

    def decoded() -> Iterator[tuple[int, np.ndarray]]:
        for i in readable:
            try:
                yield i, load_image(paths[i])
            except ExampleError as e:  # damaged past its header: reported, the others go on
                records[i] = {"image": paths[i], "error": unreadable_image(paths[i], e)}

    stems = _names(paths)
    stream = predict_stream(
        model, variables, decoded(), text, image_size=settings["image_size"], word_len=settings["word_len"],
        batch_size=min(batch_size, len(readable)), progress=progress, total=len(readable),
        tokenizer=settings["tokenizer"],
    )  # fmt: skip
    for i, image, mask in stream:
        records[i] = {
            "image": paths[i],
            "mask": save_png(os.path.join(out, f"{stems[i]}_mask.png"), mask_image(mask)),
            "overlay": save_png(os.path.join(out, f"{stems[i]}_overlay.png"), overlay(image, mask)),
            "area": float(mask.mean()),
        }
    return records
