r"""TFANet-B (Lu et al.): CLIP ViT-L/14 text tower + VMamba-B v2, an alignment unit (MLAM -> fusion block -> CFSM)
after each of the four VMamba stages, WFDM decoder; 480x480, RefCOCO by default.

Sizes the paper does not give follow its ancestor ReMamber where it is explicit (VMamba-B 0229, CLIP-L/14 text,
480 px, batch 8, 50 epochs, AdamW with weight decay 1e-4) and docs/TFANET.md elsewhere (MLAM width = the stage
width, fusion width 256, WFDM width 256, two score maps). Everything trains, the two towers at half the rate
(ReMamber: 2.5e-5 for the backbones, 5e-5 for the rest; ``train.lr_scale``). The learning rate decays x0.1 at epoch 25
("decayed starting from the 25th epoch", Sec. 4.1). Loss: BCE + Dice.

Run::

    wimfris train --config configs/tfanet_b.py:refcoco --workdir runs/tfanet_b   # VMamba-B's GitHub release and
                                                                                  # openai:ViT-L/14 (config.init)
    python -m wimfris_jax.summary --config configs/tfanet_b.py

Ablation switches (Table 3; docs/TFANET.md "Ablation switches"), as ``--set`` overrides of this config:

    (a) baseline            model.level.attention=none model.level.mixer=conv model.decoder.kind=simple
    (b) (a) + CFSM          model.level.attention=none model.decoder.kind=simple
    (c) (b) + transformer   model.level.attention=transformer model.decoder.kind=simple
    (d) (b) + MLAM          model.decoder.kind=simple
    (e) (d) + WFDM, full    (none: the defaults)

(``model.level.transformer.num_heads`` sets (c)'s heads, 8 by default.) Not a Table 3 row, combinable with them:

    model.level.cfsm_depth=2    CFSMs per level (default 1: eqs. 20-22); 2 stacks them as ReMamber stacks its two
                                Twister blocks (params "cfsm" kept, "cfsm_1" added): 256.68M instead of 242.28M;
                                must stay 1 with model.level.mixer=conv

Expected (paper, Table 1): RefCOCO val / testA / testB mIoU 77.84 / 79.42 / 75.16, oIoU 76.54 / 78.24 / 72.86;
268.46M parameters (the summary prints ours beside it; per Table 4 row and module, with or without the second CFSM:
docs/TFANET.md "Parameters")::

    python -m wimfris_jax.summary --config configs/tfanet_b.py --set model.level.cfsm_depth=2 --detail level_
"""

from configs import common
from wimfris_jax.weights import catalog


def model_config(*, image_size: int = 480, vision=None, text=None, level=None, decoder=None):
    """config.model of TFANet (``family = "tfanet"``; wimfris_jax/families/tfanet/model.py reads it)."""
    return common.ml_collections.ConfigDict(
        dict(
            family="tfanet",
            image_size=image_size,
            word_len=17,  # set from the dataset (configs/common.py DATASETS)
            text=dict(text or {"preset": "l14"}),
            vision=dict(vision or {"preset": "base"}),
            # attention "mlam" | "transformer" | "none", mixer "cfsm" | "conv": Table 3's switches (docstring);
            # cfsm_depth: CFSMs per level (1 as eqs. 20-22; 2 stacks them as ReMamber's two Twister blocks)
            level={
                "attention": "mlam",
                "mixer": "cfsm",
                "cfsm_depth": 1,
                "transformer": dict(num_heads=8),
                **(level or dict(mlam=dict(scales=(1, 3, 5), num_heads=1), fusion=dict(dim=256), cfsm=dict())),
            },
            # kind "wfdm" | "simple" (Table 3 a-d's lightweight decoder)
            decoder={"kind": "wfdm", **(decoder or dict(dim=256, out_channels=2, learn_alpha=True, alpha_init=0.5))},
            loss_weights=(1.0, 1.0),  # (BCE, Dice)
            paper_params=268.46e6,  # printed by the summary beside ours
        )
    )


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    init = dict(image_encoder=catalog.VMAMBA_B, text_encoder="openai:ViT-L/14")  # wimfris_jax/weights/catalog.py
    config = common.referring_config(model_config(), arg, global_batch_size=8, lr=5e-5, patch_size=16, init=init)
    config.train.update(
        lr_milestones=(25,), weight_decay=1e-4, trainable=(".*",), lr_scale=(("^(text|image)_encoder/", 0.5),)
    )
    return config
