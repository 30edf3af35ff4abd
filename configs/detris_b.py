r"""DETRIS-B (Huang et al. 2025): CLIP ViT-B/16 text tower + DINOv2-B/14 with 4 registers, 448x448, RefCOCO.

The whole DETRIS model as a configuration of the shared parts (adapter kinds "dmoc" and "dense_aligner"):
D-MoC text adapters (d = 64, scale 0.2) at CLIP layers 1,3,5,7,9,11; Dense Aligners (d = 128, 8-head
cross-attention, scale 0.2) at DINOv2 layers 1,3,5,7,9,11; DETRIS neck on DINOv2 blocks 4, 8 (pre-norm) and 11
(post-norm), C = 512; decoder (3 layers) and projector; 128x128 logits. DINOv2's 37x37 position table is
resampled to 32x32 with the torch-hub rule (bicubic a = -0.75, scale factor 32.1 / 37), as DETRIS does. Loss:
mean per-pixel BCE (``loss_weights`` (1, 0, 0) of eq. (10) of WIMFRIS = DETRIS's loss). Adam 1e-4, batch 32,
50 epochs, lr x0.1 at epoch 35 (the paper's recipe; the released yaml runs 65 epochs with milestones 35, 55).

Run::

    wimfris eval --config configs/detris_b.py --checkpoint hf:thuteam/DETRIS/base/base_refcoco.pth  # the release
    python -m wimfris_jax.summary --config configs/detris_b.py
    wimfris train --config configs/detris_b.py --workdir runs/detris_b   # backbones from config.init (WIMFRIS-B's)

    model, variables = wimfris_jax.load_model("configs/detris_b.py", "hf:thuteam/DETRIS/base/base_refcoco.pth")
    logits = model.apply(variables, images, ids)     # (B, 448, 448, 3), (B, 17) -> (B, 128, 128)

Expected: parameter counts of the official checkpoint -- 175,529,778 in all (the checkpoint also holds DINOv2's
mask_token and CLIP's logit_scale, 769 values the forward never reads and this model does not store), trainable
25,518,129 = Dense Aligners 2,297,376 + text adapters 418,320 + neck 10,114,560 + decoder 7,899,136 + projector
4,788,737. Paper (DETRIS Table 1, IoU): RefCOCO val 76.0 / testA 78.2 / testB 73.5; RefCOCO+ 68.9 / 74.0 / 61.5;
G-Ref val(u) 67.9, test(u) 68.1, val(g) 65.9.
"""

from configs import common


def model_config(*, vision, vision_layers, neck_taps):
    """config.model of DETRIS (sizes shared by B and L; see configs/common.py for the common keys)."""
    return common.ml_collections.ConfigDict(
        dict(
            image_size=448,
            word_len=17,  # set from the dataset (configs/common.py DATASETS)
            attention="auto",  # "xla" | "cudnn" | "chunked" (wimfris_jax/attention.py)
            text=dict(common.CLIP_B16_TEXT),
            vision=dict(vision),
            neck_taps=tuple(neck_taps),
            text_adapter=dict(kind="dmoc", layers=(1, 3, 5, 7, 9, 11), dim=64, scale=0.2),
            vision_adapter=dict(
                kind="dense_aligner", layers=tuple(vision_layers), dim=128, num_heads=8, dropout=0.1, scale=0.2
            ),
            neck=dict(kind="detris", dim=512, num_heads=8),
            decoder=dict(num_layers=3, d_model=512, num_heads=8, dim_ffn=512, dropout=0.1),
            loss_weights=(1.0, 0.0, 0.0),
            # Entries of an official checkpoint that the forward never reads and this model does not hold:
            # DINOv2's mask_token (vision width values) and CLIP's logit_scale (1); the summary counts them.
            source_only_params=("image_encoder/mask_token", "text_encoder/logit_scale"),
        )
    )


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    model = model_config(vision=dict(preset="b14_reg4"), vision_layers=(1, 3, 5, 7, 9, 11), neck_taps=(4, 8))
    return common.referring_config(model, arg, global_batch_size=32, lr=1e-4, init=common.INIT_B)
