r"""VIPA-B (Cho et al.): Swin-B (window 12, ImageNet-22K) + BERT-base (uncased) with CrossVLT's stage-wise early
fusion, the Visual Expression Generator (r = 30%) and the visual-expression decoder; 480 x 480, RefCOCO by default.

The paper's recipe (Sec. IV-A): everything trains, AdamW lr 3e-5 with polynomial decay (power 0.9 per update, as
CrossVLT), 40 epochs, batch 16, at most 21 WordPiece tokens with [CLS]; BCE + Dice + the pixel-contrastive loss
(Table VIII). Where the paper is silent (text stages 6/2/2/2 over all 12 BERT layers, widths 256, weight decay
1e-2 as CrossVLT, spared on Swin's norms and relative-position tables as there, loss weights 1/1/1, ...):
docs/VIPA.md.

Run::

    wimfris train --config configs/vipa_b.py:refcoco --workdir runs/vipa_b   # Swin-B 22K, BERT-base and its vocab
                                                                              # from the Hub (config.init, data.tokenizer)
    python -m wimfris_jax.summary --config configs/vipa_b.py

Ablation switches (``--set`` overrides; docs/VIPA.md "Ablation switches"):

    Table V    key-value set       model.key_value=ve | advanced_le | vanilla_le
    Table VI a VEG steps           model.veg.retrieve=False (w/o step 1: M = 1), model.veg.refine=False (w/o step 2:
                                   no eqs. 6-7, E_V = F_a), model.veg.share=False (no eq. 7 alone, E_V = F_r)
    Table VI b linguistic cues     model.veg.cues=both | global | local
    Table IX   articles            model.veg.skip_ids="(1037, 2019, 1996)" (w/o articles: a, an, the of
                                   bert-base-uncased; default () = all words)
    Fig. 4     retrieval ratio r   model.veg.ratio=0.1 | 0.3 | 0.8
    Table VII  encoder fusion      model.fusion=early | late | none
    Table VIII relevance loss      model.relevance_loss=contrastive | threshold (direct thresholding) | none (w/o
                                   supervision; as model.loss_weights="(1.0, 1.0, 0.0)")
    (ours)     Gumbel score scale  model.veg.score_scale=1.0 (eq. 2) | 10.0 (the noise moves the selection less)

Expected (paper, Table I): RefCOCO val / testA / testB oIoU 75.84 / 78.58 / 72.20, mIoU 78.68 / 79.93 / 75.98;
431 GFLOPs (the summary prints our parameter counts).
"""

from configs import common

# The VEG's fields (wimfris_jax/families/vipa/veg.py); ``model_config(veg=...)`` overrides some of them.
VEG = dict(dim=256, num_heads=8, ratio=0.3, cues="both", skip_ids=(), retrieve=True, refine=True, share=True,
           score_scale=1.0)  # fmt: skip


def model_config(*, image_size: int = 480, text=None, vision=None, text_stages=(6, 2, 2, 2), veg=None, decoder=None):
    """config.model of VIPA (``family = "vipa"``; wimfris_jax/families/vipa/model.py reads it); ``veg`` updates :data:`VEG`."""
    return common.ml_collections.ConfigDict(
        dict(
            family="vipa",
            image_size=image_size,
            word_len=21,  # VIPA: 21 tokens with [CLS], every dataset
            text=dict(text or {"preset": "base", "pooler": True}),  # the pooler as bert-base-uncased ships it
            vision=dict(vision or {"preset": "base", "drop_path_rate": 0.3}),  # CrossVLT's stochastic depth
            text_stages=tuple(text_stages),
            fusion="early",  # early | late | none (Table VII)
            key_value="ve",  # ve | advanced_le | vanilla_le (Table V)
            veg={**VEG, **(veg or {})},
            decoder=dict(decoder or dict(dim=256, num_heads=8)),
            relevance_loss="contrastive",  # contrastive (eq. 4) | threshold | none (Table VIII)
            loss_weights=(1.0, 1.0, 1.0),  # (BCE, Dice, relevance: eq. 4's pixel contrastive by default)
        )
    )


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    bert = "hf:google-bert/bert-base-uncased"  # its weights and its vocab.txt (wimfris_jax/weights/catalog.py)
    init = dict(image_encoder="hf:microsoft/swin-base-patch4-window12-384-in22k", text_encoder=bert)
    config = common.referring_config(model_config(), arg, global_batch_size=16, lr=3e-5, patch_size=16, init=init)
    config.model.word_len = 21  # the dataset's DETRIS length does not apply (data.word_len follows)
    config.data.tokenizer = f"wordpiece:{bert}"  # or wordpiece:PATH, a local vocab.txt or the folder holding it
    config.train.update(
        epochs=40, lr_schedule="poly", lr_power=0.9, lr_milestones=(), weight_decay=1e-2, trainable=(".*",),
        no_decay=("^image_encoder/.*norm", "relative_position_bias_table"),  # CrossVLT's no-decay group (Swin's)
    )  # fmt: skip
    return config
