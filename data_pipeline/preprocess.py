"""Image/mask/sentence preprocessing of DETRIS (`utils/dataset.py::RefDataset`), for training and evaluation.

DETRIS (and WIMFRIS, which follows its recipe) uses no augmentation: the image is letterboxed into an
S x S square by one affine warp (scale = min(S/h, S/w), centred; `cv2.warpAffine`, bicubic, border = CLIP
mean colour), then normalised with CLIP's mean/std (also for DINOv2). The training mask is warped with the
same matrix (bilinear, border 0) and divided by 255, giving a soft mask; the model compares it with its
128 x 128 logits after a PyTorch `nearest` resize, src index floor(i * S / 128), which is done here once.
Evaluation keeps the inverse matrix and the original-size mask (metric: DETRIS `engine.inference`).

Images are decoded like DETRIS, after a check of their size by header (:mod:`data_pipeline.images`, whose
``ExampleError``, ``decode_image`` and ``load_image`` are importable from here too). All arrays are channels-last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from data_pipeline.images import ExampleError
from data_pipeline.images import decode_image as decode_image  # re-exported: the decoders' old home
from data_pipeline.images import load_image as load_image
from data_pipeline.tokenizer import clean
from data_pipeline.tokenizers import DEFAULT_TOKENIZER, text_ids
from wimfris_jax.normalization import MEAN, STD

BORDER_VALUE = tuple(float(m) * 255.0 for m in (0.48145466, 0.4578275, 0.40821073))  # DETRIS warp border


def describe(example: Mapping[str, Any]) -> str:
    """A short id string for error messages, e.g. 'image_id=9, ann_id=3, ref_id=1, sent_id=7'."""
    keys = ("image_id", "ann_id", "ref_id", "sent_id", "file")
    parts = [f"{k}={example[k]}" for k in keys if k in example]
    return ", ".join(parts) if parts else "<example without ids>"


def _letterbox_points(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Three corners of the original image and where the centred size x size letterbox puts them (float32)."""
    scale = min(size / h, size / w)
    new_h, new_w = h * scale, w * scale
    bx, by = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [new_w + bx, by], [bx, new_h + by]], np.float32)
    return src, dst


def letterbox_matrix(h: int, w: int, size: int) -> np.ndarray:
    """Affine (2, 3) float64 matrix mapping original (x, y) to the centred size x size letterbox (DETRIS)."""
    src, dst = _letterbox_points(h, w, size)
    return cv2.getAffineTransform(src, dst)


def inverse_letterbox_matrix(h: int, w: int, size: int) -> np.ndarray:
    """Inverse of `letterbox_matrix` (letterbox -> original coordinates), computed as DETRIS does."""
    src, dst = _letterbox_points(h, w, size)
    return cv2.getAffineTransform(dst, src)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 (x / 255 - MEAN) / STD, in DETRIS's float32 operation order."""
    x = np.asarray(image).astype(np.float32) / np.float32(255.0)
    return (x - MEAN) / STD


def letterbox_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 (size, size, 3): bicubic warp, border = CLIP mean colour."""
    image = _check_image(image)
    m = letterbox_matrix(image.shape[0], image.shape[1], size)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC, borderValue=BORDER_VALUE)


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """{0,1} mask (H, W) -> float32 soft mask (size, size) in [0, 1]: bilinear warp of mask*255, then /255."""
    m = letterbox_matrix(mask.shape[0], mask.shape[1], size)
    warped = cv2.warpAffine(mask.astype(np.uint8) * np.uint8(255), m, (size, size), flags=cv2.INTER_LINEAR)
    return (warped.astype(np.float64) / 255.0).astype(np.float32)


def nearest_downsample(mask: np.ndarray, out_size: int) -> np.ndarray:
    """(S, S) -> (out, out) keeping rows/cols floor(i * S / out) (PyTorch `nearest`, not half-pixel)."""
    s = mask.shape[0]
    idx = (np.arange(out_size) * s) // out_size
    return mask[idx][:, idx]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _sentence(example: Mapping[str, Any], rng: np.random.Generator | None) -> str:
    sentences = example.get("sentences")
    if rng is not None and sentences:
        return str(sentences[int(rng.integers(len(sentences)))])
    return str(example["sentence"])


def _ids(example: Mapping[str, Any], sentence: str, word_len: int, tokenizer: str) -> np.ndarray:
    if not clean(sentence):
        raise ExampleError(f"empty sentence {sentence!r} in example {describe(example)}")
    return text_ids(sentence, word_len, tokenizer)[0]


def _image_and_mask(example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = _check_image(example["image"])
    except ValueError as e:
        raise ExampleError(f"bad image in example {describe(example)}: {e}") from e
    mask = np.asarray(example["mask"])
    if mask.shape != image.shape[:2]:
        raise ExampleError(f"mask shape {mask.shape} != image shape {image.shape[:2]} in {describe(example)}")
    return image, mask


def preprocess_train(
    example: Mapping[str, Any],
    *,
    image_size: int = 448,
    word_len: int = 17,
    mask_size: int = 128,
    rng: np.random.Generator | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> dict[str, np.ndarray]:
    """Raw example -> {"image": float32 (S, S, 3), "ids": int32 (L,), "mask": float32 (m, m) soft mask}.

    With `rng` and an example carrying "sentences" (one-example-per-object sources), one sentence is drawn
    at random as DETRIS does; otherwise "sentence" is used.
    """
    image, mask = _image_and_mask(example)
    ids = _ids(example, _sentence(example, rng), word_len, tokenizer)
    soft = nearest_downsample(letterbox_mask(mask, image_size), mask_size)
    return {"image": normalize(letterbox_image(image, image_size)), "ids": ids, "mask": soft}


def preprocess_eval(
    example: Mapping[str, Any],
    *,
    image_size: int = 448,
    word_len: int = 17,
    max_size: int = 640,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> dict[str, np.ndarray]:
    """Raw example -> fixed-shape eval record.

    Returns {"image": float32 (S, S, 3), "ids": int32 (L,), "inv_matrix": float32 (2, 3) letterbox ->
    original (x, y), "orig_size": int32 (2,) = (H, W), "mask": uint8 (max_size, max_size) = the original
    {0,1} mask zero-padded at bottom/right}.
    """
    image, mask = _image_and_mask(example)
    h, w = image.shape[:2]
    if h > max_size or w > max_size:
        raise ExampleError(f"image {h}x{w} exceeds max_size={max_size} in example {describe(example)}")
    ids = _ids(example, str(example["sentence"]), word_len, tokenizer)
    padded = np.zeros((max_size, max_size), np.uint8)
    padded[:h, :w] = mask.astype(np.uint8)
    return {
        "image": normalize(letterbox_image(image, image_size)),
        "ids": ids,
        "inv_matrix": inverse_letterbox_matrix(h, w, image_size).astype(np.float32),
        "orig_size": np.array([h, w], np.int32),
        "mask": padded,
    }
