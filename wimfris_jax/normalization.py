"""Image normalisation statistics: CLIP's (this pipeline's, :mod:`data_pipeline.preprocess`) and ImageNet's (the
pretraining statistics of Swin and VMamba), and the exact map between them for models that hold such a backbone.
NumPy only, and importing nothing else of the package, so that models may use it."""

from __future__ import annotations

from typing import Any

import numpy as np

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIP, RGB
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # Swin's and VMamba's pretraining statistics
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_imagenet(images: Any) -> Any:
    """CLIP-normalised images (x - MEAN) / STD -> ImageNet-normalised (x - IMAGENET_MEAN) / IMAGENET_STD: the exact
    per-channel affine map, for backbones pretrained on ImageNet statistics inside a model fed this pipeline's
    images. (B, S, S, 3) numpy or JAX arrays, in their dtype."""
    scale = (STD.astype(np.float64) / IMAGENET_STD).astype(np.float32)
    shift = ((MEAN.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    return images * scale.astype(images.dtype) + shift.astype(images.dtype)
