r"""WIMFRIS-B: CLIP ViT-B/16 text tower + DINOv2-B/14 (4 registers), 448x448, RefCOCO (WIMFRIS Sec. 3.2).

MTA at CLIP layers 1,3,5,7,9,11 (d = 168, scale 0.2); MSA at DINOv2 layers 1,3,5,7,9,11 (d = 48, 4 heads,
RFMixer 3-5-7, learnable emphasis from 0.2); HMF neck on DINOv2 blocks 4, 8 (pre-norm) and 11 (post-norm),
C = 512, 4x4 windows; DETRIS decoder (3 layers) and projector; 128x128 logits. Adam 1e-4, batch 32,
50 epochs, lr x0.1 at epoch 35.

Run (the frozen backbones come from ``config.init``: hf:facebook/dinov2-with-registers-base and openai:ViT-B/16,
fetched and converted on the first run; ``wimfris weights list``)::

    wimfris train --config configs/wimfris_b.py:refcoco --workdir runs/wimfris_b
    # the dataset is the config's argument: configs/wimfris_b.py:refcoco+ | :refcocog_umd | :refcocog_google
    python -m wimfris_jax.summary --config configs/wimfris_b.py

Expected (paper, Table 2, mIoU): RefCOCO val 77.3 / testA 79.2 / testB 74.8; RefCOCO+ 70.2 / 75.1 / 63.5;
G-Ref val(u) 69.2, test(u) 69.4, val(g) 67.1. Trainable backbone (PET) parameters ~3.0M (Table 3b).
"""

from configs import common


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    model = common.model_config(vision=dict(preset="b14_reg4"), neck_taps=(4, 8))
    return common.referring_config(model, arg, global_batch_size=32, lr=1e-4, init=common.INIT_B)
