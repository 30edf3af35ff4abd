r"""WIMFRIS-L: CLIP ViT-B/16 text tower + DINOv2-L/14 (4 registers), 448x448, RefCOCO (WIMFRIS Sec. 3.2).

Same as WIMFRIS-B except: DINOv2-L/14 (24 layers, width 1024), MSA at layers 2,6,10,14,18,22, neck taps at
blocks 8 and 16 (DETRIS's L config), Adam 2e-4, batch 64.

Run (backbones from ``config.init``: hf:facebook/dinov2-with-registers-large and openai:ViT-B/16)::

    wimfris train --config configs/wimfris_l.py:refcoco --workdir runs/wimfris_l

Expected (paper, Table 2, mIoU): RefCOCO val 78.2 / testA 79.7 / testB 76.3; RefCOCO+ 71.9 / 76.2 / 67.2;
G-Ref val(u) 70.4, test(u) 71.0, val(g) 69.3.
"""

from configs import common


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    model = common.model_config(vision=dict(preset="l14_reg4"), neck_taps=(8, 16), msa_layers=(2, 6, 10, 14, 18, 22))
    return common.referring_config(model, arg, global_batch_size=64, lr=2e-4, init=common.INIT_L)
