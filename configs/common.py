"""Shared pieces of every family's configs (big_vision style: Python files returning an ml_collections ConfigDict).

``config.model`` keys (read by :func:`wimfris_jax.model.build_model`):
  image_size, word_len          448 and 17 (22 for G-Ref UMD)
  attention                     "auto" | "xla" | "cudnn" | "chunked" (wimfris_jax/attention.py): every attention
  text                          ClipText fields (CLIP ViT-B/16 text tower)
  vision                        DinoV2 fields, or {"preset": "b14_reg4"} (+ field overrides)
  neck_taps                     0-based DINOv2 blocks tapped (pre-norm) for the neck: DETRIS's (4, 8) / (8, 16)
  text_adapter                  kind "mta" ("none": off, Table 3b), layers (Table 5), scale 0.2, dim, zero_init_up
  vision_adapter                kind "msa" ("none": off), layers, dim, num_heads, kernels (Table 4), emphasis
                                (EP, Table 3b), alpha0, dropout; the schema: wimfris_jax/families/wimfris/adapters/__init__.py
  mamba                         Mamba sizes shared by MTA and WMF (d_state, d_conv, expand, scan_impl)
  neck                          kind "hmf" | "aggregate" | "none" | "detris" (Table 1), dim C, window
                                (2, 4, 8, 16; None or 0 = one window over the map, Table 3a), wmf (gate_heads)
  decoder                       DETRIS decoder sizes
  loss_weights                  (lambda_con, lambda_dice, lambda_align) = (0.5, 0.3, 0.2), eq. (10)

Hidden sizes (the paper gives only the trainable counts, Table 3b: MSA 0.8M, MTA 2.2M for WIMFRIS-B): MTA
d = 168 and MSA d = 48 (4 heads); ``python -m wimfris_jax.summary --config configs/wimfris_b.py`` prints the
resulting counts.
"""

from __future__ import annotations

from typing import Any

import ml_collections

TRAINABLE = (r"^(?!text_encoder/|image_encoder/)",)  # everything but the two frozen backbones

# config.init of the DINOv2 + CLIP ViT-B/16 text models (WIMFRIS, DETRIS): wimfris_jax/weights/catalog.py
INIT_B = dict(image_encoder="hf:facebook/dinov2-with-registers-base", text_encoder="openai:ViT-B/16")
INIT_L = dict(image_encoder="hf:facebook/dinov2-with-registers-large", text_encoder="openai:ViT-B/16")
CLIP_B16_TEXT = dict(vocab_size=49408, width=512, depth=12, num_heads=8, context_length=77, proj_dim=512)


def model_config(
    *,
    vision: dict[str, Any],
    text: dict[str, Any] | None = None,
    image_size: int = 448,
    word_len: int = 17,
    neck_taps: tuple[int, ...] = (4, 8),
    mta_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11),
    msa_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11),
    mta_dim: int = 168,
    msa_dim: int = 48,
    msa_heads: int = 4,
    dim: int = 512,
    decoder_layers: int = 3,
    decoder_heads: int = 8,
    window: Any = 4,
    gate_heads: int = 8,
) -> ml_collections.ConfigDict:
    """config.model with the paper's defaults (WIMFRIS-B sizes unless overridden)."""
    return ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            word_len=word_len,
            attention="auto",
            text=dict(text or CLIP_B16_TEXT),
            vision=dict(vision),
            neck_taps=tuple(neck_taps),
            text_adapter=dict(kind="mta", layers=tuple(mta_layers), scale=0.2, dim=mta_dim, zero_init_up=False),
            vision_adapter=dict(
                kind="msa", layers=tuple(msa_layers), dim=msa_dim, num_heads=msa_heads, kernels=(3, 5, 7),
                emphasis=True, alpha0=0.2, dropout=0.1,
            ),  # fmt: skip
            mamba=dict(d_state=16, d_conv=4, expand=2, scan_impl=ml_collections.FieldReference(None, field_type=str)),
            neck=dict(kind="hmf", dim=dim, window=window, wmf=dict(gate_heads=gate_heads)),
            decoder=dict(num_layers=decoder_layers, d_model=dim, num_heads=decoder_heads, dim_ffn=dim, dropout=0.1),
            loss_weights=(0.5, 0.3, 0.2),
        )
    )


# The config argument (``--config configs/wimfris_b.py:refcoco+``): one row per dataset, everything that depends on
# it. tfds_config: the tensorflow-datasets ``ref_coco`` config; dataset / split_by: the refer layout's names;
# eval_splits: the paper's evaluation splits; word_len: DETRIS's sentence length (22 for G-Ref UMD).
DATASETS = {
    "refcoco": dict(tfds_config="refcoco_unc", dataset="refcoco", split_by="unc", eval_splits=("val", "testA", "testB"),
                    word_len=17),
    "refcoco+": dict(tfds_config="refcocoplus_unc", dataset="refcoco+", split_by="unc",
                     eval_splits=("val", "testA", "testB"), word_len=17),
    "refcocog_umd": dict(tfds_config="refcocog_umd", dataset="refcocog", split_by="umd", eval_splits=("val", "test"),
                         word_len=22),
    "refcocog_google": dict(tfds_config="refcocog_google", dataset="refcocog", split_by="google", eval_splits=("val",),
                            word_len=17),
}  # fmt: skip


def referring_config(
    model: ml_collections.ConfigDict,
    arg: str | None,
    *,
    global_batch_size: int,
    lr: float,
    patch_size: int = 14,
    init: dict[str, str] | None = None,
) -> ml_collections.ConfigDict:
    """The whole config of a RefCOCO-family run: ``model``, ``data`` for the dataset ``arg`` names (a key of
    :data:`DATASETS`; None: "refcoco"), ``train``, and ``init``: ``{subtree: weights source}``, the pretrained
    params ``wimfris train`` loads before training (sources by name: wimfris_jax/weights/sources.py; ``wimfris
    weights list`` shows them, ``--init SUBTREE=SOURCE|none`` or ``--set init.SUBTREE=`` replace one). The sentence
    length lives once, in ``model.word_len`` (``data.word_len`` refers to it)."""
    name = arg or "refcoco"
    if name not in DATASETS:
        raise ValueError(f"config argument {name!r} is not a dataset; choose one of {sorted(DATASETS)}")
    fields = dict(DATASETS[name])
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model
    config.model.word_len = fields.pop("word_len")
    config.data = data_config(name="refcoco_tfds", image_size=int(model.image_size), patch_size=patch_size, **fields)
    config.data.word_len = config.model.get_ref("word_len")
    config.train = train_config(global_batch_size=global_batch_size, lr=lr)
    config.init = ml_collections.ConfigDict(dict(init or {}))
    return config


def data_config(
    *, name: str = "refcoco_tfds", image_size: int = 448, word_len: int = 17, patch_size: int = 14, **kw: Any
) -> ml_collections.ConfigDict:
    """config.data; mask_size = 4 * image_size / patch_size (the projector's output size)."""
    base = dict(
        name=name,
        dataset="refcoco",  # refcoco | refcoco+ | refcocog
        split_by="unc",  # refer layout: unc (RefCOCO, RefCOCO+), umd / google (G-Ref)
        tfds_config="refcoco_unc",
        data_dir=ml_collections.FieldReference(None, field_type=str),
        data_root="data/refer",
        eval_split="val",  # validated during training
        eval_splits=("val",),  # scored by ``wimfris eval`` without --split
        image_size=image_size,
        word_len=word_len,
        mask_size=4 * (image_size // patch_size),
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def train_config(*, global_batch_size: int, lr: float, epochs: int = 50, **kw: Any) -> ml_collections.ConfigDict:
    """config.train: Adam, step decay x lr_decay at lr_milestones (epochs), trainable = all but the backbones.

    Every key the training code reads is declared here with its default, so that ``--set train.KEY=VALUE`` can set
    it (the README's table says what each does)."""
    base = dict(
        global_batch_size=global_batch_size,  # over all devices of all processes
        epochs=epochs,
        steps_per_epoch=0,  # 0: len(train set) // global_batch_size
        lr=lr,
        lr_schedule="step",  # step: x lr_decay at each of lr_milestones (epochs); poly: (1 - t/T) ** lr_power
        lr_milestones=(35,),
        lr_decay=0.1,
        lr_power=0.9,
        lr_scale=(),  # ((regex, factor), ...): scales the rate of the matching parameters
        weight_decay=0.0,  # > 0: AdamW (decoupled), sparing the parameters matching no_decay
        no_decay=(),
        trainable=TRAINABLE,
        compute_dtype="float32",  # or "bfloat16": bf16 compute, float32 parameters / optimiser / loss
        remat="auto",  # none | block | dots; auto: "dots" on GPU and TPU, "none" on CPU (wimfris_jax/layers.py)
        fsdp=False,
        fsdp_min_size=2**18,  # elements; smaller arrays stay replicated (= sharding.DEFAULT_FSDP_MIN_SIZE)
        log_every=50,
        ckpt_every=2000,
        keep_last=2,
        eval_every_epochs=1,
        eval_every=0,
        eval_batch_size=0,  # 0: global_batch_size
        eval_max_examples=ml_collections.FieldReference(None, field_type=int),  # None: the whole validation split
        best_metric="mIoU",
        resume=False,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)
