"""The VIPA network (Cho et al., Fig. 2): Swin + BERT with CrossVLT's stage-wise early fusion, the Visual Expression
Generator, and a decoder whose vision queries attend to the visual expression.

    images (B, S, S, 3) CLIP-normalised -> ImageNet-normalised (Swin's pretraining statistics; exact affine map)
    ids (B, L) WordPiece [CLS] ... [SEP], 0 = [PAD]
    text stage 0: BERT embeddings + layers [0, n_0)                            (B, L, 768)
    x = Swin embed(images)                                                     (B, S/4, S/4, C)
    for stage i = 0..3:
        i > 0: words = TextCrossLayer_i(words, x) then BERT layers of text stage i (x: stage i's merged input)
        v = Swin stage i(x);  v, r = VisionLanguageFusion_i(v, words)          (B, h_i, w_i, C_i)
        F_i = LN_i(r)  (CrossVLT's per-stage output norm);  x = Swin merge_i(v) for i < 3
    VEG(F_4, words, ids) -> visual expression E_V (B, L, D), [CLS] relevance map (B, h_4, w_4)       eqs. (1)-(7)
    VipaDecoder(F_1..F_4, E_V) -> logits (B, S/4, S/4)                                               eq. (8)

Switches (Tables V-VII; docs/VIPA.md "Ablation switches"): ``fusion`` "early" | "late" (one fusion of the last
stage's features and the final words) | "none"; ``key_value`` "ve" | "advanced_le" (the fused words) |
"vanilla_le" (the words of text stage 0, before any cross-attention); the VEG's own (ratio, cues, skip_ids,
retrieve, refine, share, score_scale); the loss's ``relevance_loss`` "contrastive" | "threshold" | "none" (Table VIII).
Parameter names: "text_encoder", "image_encoder" (as converted), "text_cross_<i>", "vision_fusion_<i>",
"stage_norm_<i>", "veg", "decoder" ("le_proj", the words' projection to the decoder width, for the "le" switches).

Outputs: "logits" (B, S/4, S/4), "global_logits" (B, h_4, w_4) eq. (4)'s logits, "relevance" (B, h_4, w_4) the raw
cosines they scale, "state" (B, 768) the sentence feature: BERT's
pooler on the final [CLS] token when the text tower has one (bert-base-uncased does), else that token itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from wimfris_jax.backbones.bert import Bert, bert_config
from wimfris_jax.backbones.swin import Swin, swin_config
from wimfris_jax.config_fields import choice, expand_preset
from wimfris_jax.errors import ConfigError
from wimfris_jax.families import family_inputs
from wimfris_jax.families.vipa.decoder import VipaDecoder
from wimfris_jax.families.vipa.fusion import TextCrossLayer, VisionLanguageFusion
from wimfris_jax.families.vipa.losses import RELEVANCE_LOSSES, vipa_loss
from wimfris_jax.families.vipa.veg import CUES, VEG
from wimfris_jax.layers import layer_norm
from wimfris_jax.normalization import to_imagenet

FUSIONS = ("early", "late", "none")
KEY_VALUES = ("ve", "advanced_le", "vanilla_le")


class VIPA(nn.Module):
    """VIPA; build it with :func:`build_vipa`.

    Attributes:
      text_encoder: Bert (run layer by layer); image_encoder: Swin (stage by stage); veg: VEG; decoder: VipaDecoder.
      text_stages: BERT layers per text stage (sums to at most the BERT depth), one stage per Swin stage.
      fusion, key_value: the switches of the module docstring; fusion_heads: TextCrossLayer heads.
      logits_only: as :class:`wimfris_jax.model.Wimfris` (evaluation mode, the logits alone, when ``train`` is None).
    """

    text_encoder: nn.Module
    image_encoder: nn.Module
    veg: nn.Module
    decoder: nn.Module
    text_stages: tuple[int, ...] = (6, 2, 2, 2)
    fusion: str = "early"
    key_value: str = "ve"
    fusion_heads: int = 12
    logits_only: bool = False

    def _fuse(self, i: int, v: jnp.ndarray, words: jnp.ndarray, pad: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        swin = self.image_encoder
        fusion = VisionLanguageFusion(dtype=swin.dtype, attention=swin.attention, name=f"vision_fusion_{i}")
        return fusion(v, words, pad)

    def _cross(self, name: str, words: jnp.ndarray, vision: jnp.ndarray) -> jnp.ndarray:
        bert = self.text_encoder
        return TextCrossLayer(self.fusion_heads, bert.mlp_dim, bert.ln_eps, bert.dtype, bert.attention, name=name)(
            words, vision
        )

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, ids: jnp.ndarray, *, train: bool | None = None
    ) -> dict[str, jnp.ndarray] | jnp.ndarray:
        """images (B, S, S, 3) CLIP-normalised; ids (B, L) int32, 0 = padding -> dict (module docstring), or the
        logits (B, S/4, S/4) alone when ``logits_only`` and ``train`` is not given."""
        logits_only = family_inputs("VIPA", images, ids, self.logits_only, train)
        bert, swin, n = self.text_encoder, self.image_encoder, len(self.image_encoder.depths)
        pad = ids == 0
        bounds = np.cumsum((0, *self.text_stages))
        words = bert.embed(ids)
        for j in range(bounds[0], bounds[1]):
            words = bert.layer(j, words, pad)
        vanilla = words
        x = swin.embed(to_imagenet(images))
        feats = []
        for i in range(n):
            if i > 0:
                if self.fusion == "early":
                    words = self._cross(f"text_cross_{i}", words, x)
                for j in range(bounds[i], bounds[i + 1]):
                    words = bert.layer(j, words, pad)
            v = swin.blocks(i, x, train=bool(train))
            out = v
            if self.fusion == "early" or (self.fusion == "late" and i == n - 1):
                v, out = self._fuse(i, v, words, pad)
            feats.append(layer_norm(1e-5, swin.dtype, f"stage_norm_{i}")(out))
            if i < n - 1:
                x = swin.downsample(i, v)
        if self.fusion == "late":
            words = self._cross("text_cross_late", words, feats[-1])
        veg = self.veg(feats[-1], words, pad, ids=ids, train=bool(train))
        if self.key_value == "ve":
            kv, kv_mask = veg["expression"], veg["expression_mask"]
        else:  # Table V's language key-value sets, projected to the decoder's width
            kv = nn.Dense(self.decoder.dim, dtype=bert.dtype, name="le_proj")(
                words if self.key_value == "advanced_le" else vanilla
            )
            kv_mask = ~pad
        logits = self.decoder(feats, kv, kv_mask)
        if logits_only:
            return logits
        state = bert.pool(words) if bert.pooler else words[:, 0]
        return {"logits": logits, "global_logits": veg["global_logits"], "relevance": veg["relevance"], "state": state}


def build_vipa(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> VIPA:
    """The VIPA module for ``config.model`` (configs/vipa_b.py documents the keys): ``text`` Bert fields or
    ``{"preset": "base"}``, ``vision`` Swin fields or ``{"preset": "base"}``, ``text_stages``, ``fusion``,
    ``key_value``, ``veg`` (VEG fields), ``decoder`` (VipaDecoder fields), ``relevance_loss`` (checked here, read by
    :func:`vipa_loss_fn`). ``remat_mode`` rematerialises the backbones' blocks."""
    cfg = model_config
    text = Bert(dtype=dtype, remat_mode=remat_mode, **expand_preset(cfg.text, bert_config))
    vision = Swin(dtype=dtype, remat_mode=remat_mode, **expand_preset(cfg.vision, swin_config))
    stages = tuple(int(s) for s in cfg.get("text_stages", (6, 2, 2, 2)))
    if len(stages) != len(vision.depths) or sum(stages) > text.depth or min(stages) < 0:
        raise ConfigError(
            f"config.model.text_stages={list(stages)}: need {len(vision.depths)} stages (one per Swin stage) of at "
            f"most {text.depth} BERT layers in all"
        )
    veg = dict(cfg.get("veg") or {})
    choice(veg, "cues", "both", CUES, "veg")
    choice(cfg, "relevance_loss", "contrastive", RELEVANCE_LOSSES)
    if not 0.0 < float(veg.get("ratio", 0.3)) <= 1.0:
        raise ConfigError(f"config.model.veg.ratio={veg['ratio']!r}: the retrieved share r must be in (0, 1]")
    if not float(veg.get("score_scale", 1.0)) > 0.0:
        raise ConfigError(f"config.model.veg.score_scale={veg['score_scale']!r}: must be positive (1 = eq. 2)")
    skip = veg.get("skip_ids", ())
    if not isinstance(skip, (tuple, list)) or not all(type(i) is int and i > 0 for i in skip):  # bool is no id
        raise ConfigError(f"config.model.veg.skip_ids={skip!r}: token ids > 0, e.g. (1037, 2019, 1996) for "
                          'bert-base-uncased (a, an, the; docs/VIPA.md "Ablation switches")')  # fmt: skip
    veg["skip_ids"] = tuple(skip)
    dec = dict(cfg.get("decoder") or {})
    return VIPA(
        text_encoder=text,
        image_encoder=vision,
        veg=VEG(dtype=dtype, **veg),
        decoder=VipaDecoder(dtype=dtype, **dec),
        text_stages=stages,
        fusion=choice(cfg, "fusion", "early", FUSIONS),
        key_value=choice(cfg, "key_value", "ve", KEY_VALUES),
        fusion_heads=int(cfg.get("fusion_heads", text.num_heads)),
    )


def vipa_loss_fn(model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """BCE + Dice on the logits + the relevance map's supervision ``relevance_loss`` (eq. 4's pixel-contrastive loss
    by default; Table VIII), weights ``loss_weights`` = (bce, dice, relevance), (1, 1, 1); mask (B, Hm, Wm)."""
    weights = tuple(model_config.get("loss_weights", (1.0, 1.0, 1.0)))
    relevance = choice(model_config, "relevance_loss", "contrastive", RELEVANCE_LOSSES)
    ratio = float(dict(model_config.get("veg") or {}).get("ratio", VEG.ratio))
    return vipa_loss(outputs, mask, weights, relevance, ratio)
