"""Data pipeline: RefCOCO-family readers (refer layout, tfds), a synthetic set, DETRIS preprocessing, CLIP and
WordPiece tokenizers and a Grain loader. Raw examples are dicts {"image" uint8 (H, W, 3), "mask" uint8 (H, W),
"sentence", "image_id", "ann_id", "ref_id", "sent_id"}; see docs/DATA.md.

The exports below are resolved on first access, so ``import data_pipeline`` loads no submodule; tensorflow_datasets
and transformers are loaded only when a tfds source or the tokenizer is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tokenize": "tokenizer",
    "text_ids": "tokenizers",
    "wordpiece_tokenize": "wordpiece",
    "preprocess_train": "preprocess",
    "preprocess_eval": "preprocess",
    "letterbox_matrix": "preprocess",
    "normalize": "preprocess",
    "load_image": "images",
    "decode_image": "images",
    "image_size": "images",
    "max_image_pixels": "images",
    "MEAN": "wimfris_jax.normalization",  # the model's normalisation statistics: one home, below the data pipeline
    "STD": "wimfris_jax.normalization",
    "ExampleError": "images",
    "ImageTooLargeError": "images",
    "SyntheticRefer": "synthetic",
    "matching_objects": "synthetic",
    "make_loader": "loader",
    "iterator_checkpoint_args": "loader",
    "iterator_restore_args": "loader",
    "restore_iterator_state": "loader",
    "ReferSource": "refer",
    "RefCocoTfdsSource": "refcoco",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"data_pipeline.{module}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
