r"""Tiny VIPA on the synthetic referring set: the whole architecture (a 4-stage Swin with shifted windows, a BERT with
WordPiece ids, early fusion at every stage, the VEG, the visual-expression decoder) at toy sizes, random weights,
everything trained; the synthetic set's own WordPiece vocabulary (data_pipeline/synthetic_vocab.txt).

64 x 64 images (Swin grids 16, 8, 4, 2; window 4), 16 x 16 logits; the demo's data and budget (configs/demo.py),
VIPA's polynomial lr decay.

Run::

    wimfris train --config configs/vipa_tiny.py --workdir /tmp/vipa_tiny
    wimfris demo --config configs/vipa_tiny.py             # trains, then scores true vs swapped sentences

Expected: the loss falls; the demo's true-sentence mIoU well above the swapped-sentence control.
"""

import os

import data_pipeline
from configs import common, demo, vipa_b

VOCAB = os.path.join(os.path.dirname(data_pipeline.__file__), "synthetic_vocab.txt")


def get_config(arg: str | None = None):
    """``arg``: "quick" for the demo's smoke run."""
    quick = arg == "quick"
    config = demo.get_config(arg)  # the demo's data (64 px synthetic shapes) and schedule
    config.model = vipa_b.model_config(
        image_size=64,
        text=dict(vocab_size=22, width=64, depth=2 if quick else 4, num_heads=2, mlp_dim=256, max_positions=32),
        vision=dict(
            embed_dim=16, depths=(2, 1, 1, 1) if quick else (2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4
        ),
        text_stages=(1, 1, 0, 0) if quick else (1, 1, 1, 1),
        veg=dict(dim=32, num_heads=2, ratio=0.3),
        decoder=dict(dim=32, num_heads=2),
    )
    config.model.word_len = 10  # "the bottommost red triangle": 7 WordPiece tokens with [CLS] and [SEP]
    config.data.update(word_len=10, mask_size=16, tokenizer=f"wordpiece:{VOCAB}")
    config.train.update(lr_schedule="poly", lr_power=0.9, lr_milestones=(), weight_decay=1e-4)
    return common.ml_collections.ConfigDict(config)
