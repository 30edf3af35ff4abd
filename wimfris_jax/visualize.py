"""Pictures of predictions: a mask over its image, and a labelled grid of (image, sentence, prediction, truth).

Not from the papers (their Fig. 5 shows the same kind of qualitative grid). Everything is uint8 RGB
(H, W, 3), channels-last; masks are (H, W), any non-zero value is foreground. PNGs are written with PIL.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

PRED_COLOR = (0, 235, 255)  # cyan: unlike any colour of the synthetic shapes
GT_COLOR = (255, 150, 0)  # orange
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = PRED_COLOR, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with ``mask`` (H, W) tinted by ``color`` (opacity ``alpha``) and outlined."""
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"overlay expects a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"overlay: mask {mask.shape} does not match image {image.shape[:2]}")
    out = image.astype(np.float32)
    tint = np.asarray(color, np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness=max(1, min(image.shape[:2]) // 200))
    return out


def mask_image(mask: np.ndarray) -> np.ndarray:
    """(H, W) mask -> uint8 (H, W): 255 on the object, 0 elsewhere."""
    return np.where(np.asarray(mask).astype(bool), np.uint8(255), np.uint8(0))


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """Letterboxes ``image`` into a white size x size square (aspect kept)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_NEAREST if scale >= 2 else cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    cell = np.full((size, size, 3), 255, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    cell[y : y + nh, x : x + nw] = resized
    return cell


def _text_band(lines: Sequence[str], width: int, height: int, scale: float) -> np.ndarray:
    band = np.full((height, width, 3), 255, np.uint8)
    step = height // max(1, len(lines))
    for i, line in enumerate(lines):
        cv2.putText(band, line, (4, (i + 1) * step - 4), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def grid(rows: Sequence[Mapping[str, object]], *, cell: int = 160, columns: int = 2) -> np.ndarray:
    """A picture of predictions, ``columns`` examples side by side.

    Args:
      rows: each {"image": uint8 (H, W, 3), "sentence": str, "pred": (H, W) mask, "gt": (H, W) mask or
        None, "iou": float (optional)}.
      cell: side of one image cell in pixels.
      columns: examples per line of the grid.

    Returns:
      uint8 RGB image: per example a caption (sentence, IoU) above [image | prediction (cyan) | truth (orange)].
    """
    if not rows:
        raise ValueError("grid needs at least one row")
    scale = max(0.4, cell / 400.0)
    chars = max(8, int(3 * cell / (19 * scale)))
    tiles = []
    for r in rows:
        image = np.asarray(r["image"])
        panels = [_fit(image, cell), _fit(overlay(image, r["pred"], PRED_COLOR), cell)]
        gt = r.get("gt")
        panels.append(_fit(overlay(image, gt, GT_COLOR), cell) if gt is not None else np.full_like(panels[0], 255))
        caption = f'"{r["sentence"]}"' + (f"  IoU {float(r['iou']):.2f}" if r.get("iou") is not None else "")
        lines = textwrap.wrap(caption, chars)[:2] or [""]
        band = _text_band(lines, 3 * cell + 4, int(44 * scale * 2.2), scale)
        body = np.concatenate([panels[0], np.full((cell, 2, 3), 255, np.uint8), panels[1],
                               np.full((cell, 2, 3), 255, np.uint8), panels[2]], axis=1)  # fmt: skip
        tile = np.concatenate([band, body], axis=0)
        tiles.append(np.pad(tile, ((6, 6), (6, 6), (0, 0)), constant_values=255))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    lines = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    legend = _text_band(
        ["image | prediction (cyan) | ground truth (orange)"], lines[0].shape[1], int(40 * scale * 2), scale
    )
    return np.concatenate([legend, *lines], axis=0)


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Writes a uint8 (H, W) or (H, W, 3) RGB array as PNG (parent folders created); returns the path."""
    from PIL import Image

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
    return path
