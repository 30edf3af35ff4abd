"""Referring-segmentation scores as DETRIS computes them (DETRIS ``engine/engine.py`` ``inference``; LAVT's
protocol; docs/detris_code.md "Metrics"). WIMFRIS reports mIoU "following Wang et al. (2022)", the same protocol.

Evaluation, per expression: sigmoid(logits) -> PyTorch bicubic (a = -0.75, align_corners=True) to the letterboxed
input size -> ``cv2.warpAffine`` with the inverse letterbox matrix (INTER_CUBIC, border 0) to the original image
size -> ``> 0.35`` -> I = |pred & gt|, U = |pred | gt| against the original-size mask (any non-zero gt pixel is
object). IoU = I / (U + 1e-6) (so an empty prediction of an empty mask scores 0); mIoU = mean IoU; oIoU = sum I /
sum U; Prec@X = fraction of expressions with IoU > X. DETRIS's thresholds come from ``torch.arange(0.5, 1.0, 0.1)``
in float32, so X is float32(X) (0.69999999 for 0.7); this module compares against the same float32 values.

``postprocess``, ``intersection_union`` and :class:`RefMetrics` run on the host in numpy/OpenCV.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from wimfris_jax.interpolate import resize_matrix

THRESHOLD = 0.35
PREC_AT = (0.5, 0.6, 0.7, 0.8, 0.9)
IOU_EPS = 1e-6


def probability_map(
    logits: np.ndarray,
    inv_matrix: np.ndarray,
    orig_size: Sequence[int],
    image_size: int | Sequence[int] = 448,
) -> np.ndarray:
    """Mask logits of the letterboxed input -> (H, W) float32 foreground probability on the original image: sigmoid,
    bicubic to the input size, inverse letterbox warp (arguments as :func:`postprocess`, which thresholds this)."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2:
        raise ValueError(f"postprocess expects (h, w) logits, got shape {logits.shape}")
    inv_matrix = np.asarray(inv_matrix, np.float64)
    if inv_matrix.shape != (2, 3):
        raise ValueError(f"postprocess expects a (2, 3) affine matrix, got shape {inv_matrix.shape}")
    ih, iw = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    prob = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    h, w = prob.shape
    if (h, w) != (ih, iw):
        rh = resize_matrix(h, ih, mode="bicubic", align_corners=True)
        rw = resize_matrix(w, iw, mode="bicubic", align_corners=True)
        prob = (rh @ prob.astype(np.float64) @ rw.T).astype(np.float32)
    oh, ow = (int(s) for s in orig_size)
    return cv2.warpAffine(prob, inv_matrix, (ow, oh), flags=cv2.INTER_CUBIC, borderValue=0.0)


def postprocess(
    logits: np.ndarray,
    inv_matrix: np.ndarray,
    orig_size: Sequence[int],
    image_size: int | Sequence[int] = 448,
    threshold: float = THRESHOLD,
) -> np.ndarray:
    """Mask logits of the letterboxed input -> binary mask of the original image.

    Args:
      logits: (h, w) logits (128 x 128 for a 448 input).
      inv_matrix: (2, 3) affine matrix from letterbox to original pixel coordinates (DETRIS's ``inverse``).
      orig_size: (H, W) of the original image.
      image_size: side (or (height, width)) of the letterboxed network input.
      threshold: on the probability (:func:`probability_map`), strict ``>``.

    Returns:
      (H, W) bool.
    """
    return probability_map(logits, inv_matrix, orig_size, image_size) > threshold


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(I, U) pixel counts of two masks of the same shape; non-zero counts as foreground."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred, gt = pred.astype(bool), gt.astype(bool)
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


@dataclasses.dataclass
class RefMetrics:
    """Accumulates (I, U) per expression; :meth:`compute` gives DETRIS's numbers as fractions in [0, 1]."""

    inter: list[int] = dataclasses.field(default_factory=list)
    union: list[int] = dataclasses.field(default_factory=list)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Scores one expression's (H, W) masks; returns its IoU."""
        return self.update_iu(*intersection_union(pred, gt))

    def update_iu(self, inter: int, union: int) -> float:
        """Adds one expression's counts (e.g. gathered from other hosts); returns its IoU."""
        if not 0 <= inter <= union:
            raise ValueError(f"need 0 <= I <= U, got I={inter}, U={union}")
        self.inter.append(int(inter))
        self.union.append(int(union))
        return inter / (union + IOU_EPS)

    def merge(self, other: RefMetrics) -> RefMetrics:
        self.inter.extend(other.inter)
        self.union.extend(other.union)
        return self

    def compute(self) -> dict[str, float]:
        """{"mIoU", "oIoU", "Prec@0.5", ..., "Prec@0.9", "n"}; raises ValueError when nothing was scored."""
        if not self.inter:
            raise ValueError("RefMetrics.compute: no expression was scored")
        i = np.asarray(self.inter, np.float64)
        u = np.asarray(self.union, np.float64)
        iou = i / (u + IOU_EPS)
        out = {"mIoU": float(iou.mean()), "oIoU": float(i.sum() / u.sum()) if u.sum() > 0 else 0.0}
        for x in PREC_AT:
            out[f"Prec@{x}"] = float((iou > np.float64(np.float32(x))).mean())
        out["n"] = len(iou)
        return out


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width table, one row per split, scores in percent with two decimals."""
    cols = ["mIoU", "oIoU"] + [f"Prec@{x}" for x in PREC_AT]
    width = max([5] + [len(s) for s in results])
    lines = [f"{'split':<{width}}  " + "  ".join(f"{c:>8}" for c in cols) + f"  {'n':>7}"]
    for split, r in results.items():
        cells = "  ".join(f"{100.0 * r[c]:8.2f}" for c in cols)
        lines.append(f"{split:<{width}}  {cells}  {int(r['n']):>7d}")
    return "\n".join(lines)
