"""The WIMFRIS network (Fig. 2a): frozen CLIP text + DINOv2 encoders tuned by MTA / MSA, HMF neck, DETRIS head;
and DETRIS itself as a configuration of the same parts (``adapter_kind="detris"``, ``neck.kind="detris"``).

    ids (B, L) --CLIP text tower, MTA beside the MLP of layers mta_layers (scale 0.2)--> words (B, L, Ct),
                 sentence feature state (B, C) = text_embeds
    images (B, S, S, 3) --DINOv2, MSA beside the MLP of layers msa_layers (alpha_i)--> 3 maps (B, h, w, Cv):
                 blocks neck_taps (pre-norm, 0-based block indices: hidden_states[t + 1]) and the last
                 block after the final norm, prefix tokens dropped
    neck (HMF: aggregate + WMF, or an ablation) --> (B, h, w, C) [+ window logits (B, n_win)]
    decoder (words, pad_mask = ids == 0) --> projector (state) --> mask logits (B, 4h, 4w)

Text runs first (all blocks), its final word features go to every MSA (DETRIS's order). Top-level parameter
names: "text_encoder", "image_encoder" (frozen), "mta_<i>", "msa_<i>" (i = backbone layer; DETRIS:
"text_adapter_<i>", "dense_aligner_<i>"), "neck", "decoder", "projector". ``train`` switches dropout (needs
the "dropout" rng) and BatchNorm batch statistics (``mutable=["batch_stats"]``).

Outputs: "logits" (B, 4h, 4w); "window_logits" (B, n_win) when the WMF partitions the map; "alphas" (n_msa,)
the emphasis values of the MSA layers (when MSA is on); "state" (B, C) the sentence feature.

:func:`build_model` reads ``config.model`` (configs/common.py documents every key); :func:`loss_fn` is WIMFRIS
eq. (10) for that model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.adapters.detris import DenseAligner, TextAdapter
from wimfris_jax.adapters.msa import MultiScaleAligner
from wimfris_jax.adapters.mta import MambaTextAdapter
from wimfris_jax.attention import IMPLEMENTATIONS
from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config
from wimfris_jax.decoder import Decoder, Projector
from wimfris_jax.layers import resolve_remat
from wimfris_jax.losses import wimfris_loss
from wimfris_jax.neck.hmf import NECKS, build_neck
from wimfris_jax.neck.wmf import normalize_window, resolve_window

# adapter_kind -> (text adapter name prefix, vision adapter name prefix)
ADAPTER_NAMES = {"wimfris": ("mta", "msa"), "detris": ("text_adapter", "dense_aligner")}


class Wimfris(nn.Module):
    """WIMFRIS, or DETRIS with ``adapter_kind="detris"``. Build it with :func:`build_model`.

    Attributes:
      text_encoder: ClipText; image_encoder: DinoV2 (fields patch_size, num_registers, depth are read).
      neck, decoder, projector: the neck (see :mod:`wimfris_jax.neck.hmf`), Decoder, Projector.
      neck_taps: 0-based DINOv2 blocks whose (pre-norm) outputs feed the neck beside the final output.
      adapter_kind: "wimfris" (MTA ``mta_<i>`` + MSA ``msa_<i>``) or "detris" (D-MoC text adapter
        ``text_adapter_<i>`` + Dense Aligner ``dense_aligner_<i>``).
      text_layers / vision_layers: 0-based backbone layers carrying an adapter (empty: adapter off).
      text_kwargs / vision_kwargs: keyword arguments of the adapter modules (width excluded).
      text_scale: fixed scale of the text adapter's output (0.2, both models).
      logits_only: when ``train`` is not given, run in evaluation mode and return the logits alone
        (:func:`wimfris_jax.load_model` sets it).
    """

    text_encoder: nn.Module
    image_encoder: nn.Module
    neck: nn.Module
    decoder: nn.Module
    projector: nn.Module
    neck_taps: tuple[int, ...] = (4, 8)
    adapter_kind: str = "wimfris"
    text_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    text_kwargs: Mapping[str, Any] | None = None
    text_scale: float = 0.2
    vision_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    vision_kwargs: Mapping[str, Any] | None = None
    logits_only: bool = False

    def _adapters(self, train: bool) -> tuple[dict[int, Callable], Callable, dict[int, nn.Module]]:
        """Creates the adapters: ({layer: text adapter callable}, a factory (words, pad_mask, grid, num_prefix)
        -> {layer: vision adapter callable}, {layer: vision adapter module})."""
        text_name, vision_name = ADAPTER_NAMES[self.adapter_kind]
        tkw, vkw = dict(self.text_kwargs or {}), dict(self.vision_kwargs or {})
        width_t, width_v = self.text_encoder.width, self.image_encoder.width
        if self.adapter_kind == "wimfris":
            text_mods = {i: MambaTextAdapter(width=width_t, name=f"{text_name}_{i}", **tkw) for i in self.text_layers}
            text = {i: (lambda x, m=m: self.text_scale * m(x)) for i, m in text_mods.items()}
            vis_mods = {
                i: MultiScaleAligner(width=width_v, name=f"{vision_name}_{i}", **vkw) for i in self.vision_layers
            }

            def vision(words, pad_mask, grid, num_prefix):
                kw = dict(words=words, pad_mask=pad_mask, grid=grid, num_prefix=num_prefix, deterministic=not train)
                return {i: functools.partial(m, **kw) for i, m in vis_mods.items()}

        else:
            text_mods = {i: TextAdapter(width=width_t, name=f"{text_name}_{i}", **tkw) for i in self.text_layers}
            text = {i: (lambda x, m=m: self.text_scale * m(x, train=train)) for i, m in text_mods.items()}
            vis_mods = {i: DenseAligner(width=width_v, name=f"{vision_name}_{i}", **vkw) for i in self.vision_layers}

            def vision(words, pad_mask, grid, num_prefix):
                kw = dict(grid=grid, num_prefix=num_prefix, train=train)
                return {i: (lambda x, m=m: m(x, words, **kw)) for i, m in vis_mods.items()}

        return text, vision, vis_mods

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, ids: jnp.ndarray, *, train: bool | None = None
    ) -> dict[str, jnp.ndarray] | jnp.ndarray:
        """images (B, S, S, 3) CLIP-normalised; ids (B, L) int32, 0 = padding -> dict (module docstring), or the
        logits (B, 4h, 4w) alone when ``logits_only`` and ``train`` is not given (evaluation mode)."""
        logits_only = self.logits_only and train is None
        train = bool(train)
        if images.ndim != 4 or ids.ndim != 2 or images.shape[0] != ids.shape[0]:
            raise ValueError(f"Wimfris expects images (B, S, S, 3) and ids (B, L); got {images.shape}, {ids.shape}")
        if self.adapter_kind not in ADAPTER_NAMES:
            raise ValueError(f"adapter_kind={self.adapter_kind!r}: choose one of {sorted(ADAPTER_NAMES)}")
        pad_mask = ids == 0
        text_adapters, vision_adapters, vis_mods = self._adapters(train)
        text = self.text_encoder(ids, adapters=text_adapters)
        words, state = text["last_hidden_state"], text["text_embeds"]

        p = self.image_encoder.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        num_prefix = 1 + self.image_encoder.num_registers
        vis = self.image_encoder(images, adapters=vision_adapters(words, pad_mask, grid, num_prefix))
        hidden = vis["hidden_states"]
        tokens = [hidden[t + 1] for t in self.neck_taps] + [vis["last_hidden_state"]]
        b = images.shape[0]
        maps = [x[:, num_prefix:].reshape(b, grid[0], grid[1], x.shape[-1]) for x in tokens]

        fused, window_logits = self.neck(maps, state, train=train)
        dec = self.decoder(fused, words, pad_mask, deterministic=not train)
        logits = self.projector(dec, state, train=train)
        if logits_only:
            return logits
        out = {"logits": logits, "state": state}
        if window_logits is not None:
            out["window_logits"] = window_logits
        if self.adapter_kind == "wimfris" and vis_mods:
            out["alphas"] = jnp.stack([m.alpha() for m in vis_mods.values()])
        return out


def vision_fields(model_config: Any) -> dict[str, Any]:
    """:class:`DinoV2` fields of ``config.model.vision``: a ``preset`` expanded (:func:`dinov2_config`), then the
    explicit fields on top."""
    fields = dict(model_config.vision)
    preset = fields.pop("preset", None)
    return {**dinov2_config(preset), **fields} if preset is not None else fields


def build_backbones(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> tuple[ClipText, DinoV2]:
    """The text and vision towers of ``config.model`` (``attention``, ``dtype`` and ``remat_mode`` applied)."""
    common = dict(dtype=dtype, attention=_attention(model_config), remat_mode=remat_mode)
    return ClipText(**common, **dict(model_config.text)), DinoV2(**common, **vision_fields(model_config))


def _attention(cfg: Any) -> str:
    """``config.model.attention`` (default "auto"), checked."""
    impl = cfg.get("attention", "auto")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={impl!r}: choose one of {IMPLEMENTATIONS}")
    return impl


def _check(cfg: Any, text: nn.Module, vision: nn.Module, text_layers: tuple, vision_layers: tuple) -> None:
    depth_t, depth_v = text.depth, vision.depth
    keys = (
        ("mta_layers", "msa_layers")
        if cfg.get("adapter_kind", "wimfris") == "wimfris"
        else ("text_adapter.layers", "vision_adapter.layers")
    )
    for key, layers, depth in ((keys[0], text_layers, depth_t), (keys[1], vision_layers, depth_v)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"config.model.{key}: layers {bad} outside the backbone's 0..{depth - 1}")
    bad = [t for t in cfg.neck_taps if not 0 <= t < depth_v]
    if bad:
        raise ValueError(f"config.model.neck_taps: blocks {bad} outside 0..{depth_v - 1}")
    dim, proj = cfg.neck.dim, text.proj_dim
    if cfg.decoder.d_model != dim or proj != dim or text.width != dim:
        raise ValueError(
            f"widths disagree: neck.dim={dim}, decoder.d_model={cfg.decoder.d_model}, text width={text.width}, "
            f"text proj_dim={proj}; the model needs them equal (512): the decoder attends to the word features and "
            "the WMF class token / projector kernel come from the sentence feature"
        )
    if cfg.neck.kind not in NECKS:
        raise ValueError(f"config.model.neck.kind={cfg.neck.kind!r}: choose one of {NECKS}")


def _adapter_config(cfg: Any, text_width: int, dtype: Any) -> tuple[tuple, dict, float, tuple, dict]:
    """(text layers, text kwargs, text scale, vision layers, vision kwargs) of ``config.model``."""
    kind = cfg.get("adapter_kind", "wimfris")
    if kind == "wimfris":
        mta_kwargs = {**dict(cfg.mamba), **dict(cfg.mta), "dtype": dtype}
        msa_kwargs = {**dict(cfg.msa), "dtype": dtype, "attention": _attention(cfg)}
        msa_kwargs["kernels"] = tuple(msa_kwargs.get("kernels", (3, 5, 7)))
        text_layers = tuple(cfg.mta_layers) if cfg.use_mta else ()
        vision_layers = tuple(cfg.msa_layers) if cfg.use_msa else ()
        return text_layers, mta_kwargs, float(cfg.mta_scale), vision_layers, msa_kwargs
    if kind == "detris":
        t, v = dict(cfg.text_adapter), dict(cfg.vision_adapter)
        text_layers, scale = tuple(t.pop("layers")), float(t.pop("scale"))
        vision_layers = tuple(v.pop("layers"))
        v.update(text_dim=text_width, dtype=dtype, attention=_attention(cfg))
        return text_layers, {**t, "dtype": dtype}, scale, vision_layers, v
    raise ValueError(f"config.model.adapter_kind={kind!r}: choose one of {sorted(ADAPTER_NAMES)}")


def build_model(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> Wimfris:
    """The Wimfris module for ``config.model`` (an ml_collections ConfigDict or a mapping with the same keys).

    ``dtype``: computation dtype of the trainable parts (None: float32); parameters stay float32.
    ``remat_mode``: rematerialisation of the backbone blocks' attention and MLP, the WMF's Mamba, the decoder
    layers and the projector's visual path,
    "auto" | "none" | "block" | "dots" (:func:`wimfris_jax.layers.remat`; training passes ``train.remat``). Adapter
    switches: ``use_mta`` / ``use_msa`` (Table 3b), ``msa.emphasis`` (EP), ``msa.kernels`` (Table 4),
    ``mta_layers`` / ``msa_layers`` (Table 5), ``neck.kind`` and ``neck.window`` (Tables 1, 3a);
    ``adapter_kind="detris"`` with ``text_adapter`` / ``vision_adapter`` builds DETRIS (configs/detris_b.py).
    """
    cfg = model_config
    remat_mode = resolve_remat(remat_mode)
    text, vision = build_backbones(cfg, dtype, remat_mode)
    text_layers, text_kwargs, text_scale, vision_layers, vision_kwargs = _adapter_config(cfg, text.width, dtype)
    _check(cfg, text, vision, text_layers, vision_layers)
    neck_cfg = dict(cfg.neck)
    kind, dim = neck_cfg.pop("kind"), neck_cfg.pop("dim")
    wmf = None
    if kind == "hmf":
        wmf = {**dict(cfg.mamba), **neck_cfg.pop("wmf", {}), "window": normalize_window(neck_cfg.pop("window", 4))}
        wmf["remat_mode"] = remat_mode
    else:
        neck_cfg.pop("wmf", None)
        neck_cfg.pop("window", None)
    neck = build_neck(kind, dim=dim, wmf=wmf, dtype=dtype, **neck_cfg)
    return Wimfris(
        text_encoder=text,
        image_encoder=vision,
        neck=neck,
        decoder=Decoder(dtype=dtype, attention=_attention(cfg), remat_mode=remat_mode, **dict(cfg.decoder)),
        projector=Projector(word_dim=text.proj_dim, in_dim=dim, dtype=dtype, remat_mode=remat_mode),
        neck_taps=tuple(cfg.neck_taps),
        adapter_kind=cfg.get("adapter_kind", "wimfris"),
        text_layers=text_layers,
        text_kwargs=text_kwargs,
        text_scale=text_scale,
        vision_layers=vision_layers,
        vision_kwargs=vision_kwargs,
    )


def feature_grid(model_config: Any) -> tuple[int, int]:
    """(h, w) of the neck's feature map: image_size // patch_size."""
    s, p = int(model_config.image_size), int(vision_fields(model_config).get("patch_size", DinoV2.patch_size))
    return (s // p, s // p)


def loss_fn(model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """WIMFRIS eq. (10): 0.5 contrastive + 0.3 dice + 0.2 window alignment (weights: ``loss_weights``).

    outputs: the model's dict; mask: (B, Hm, Wm) soft mask at the logit size. Returns (total, aux scalars).
    """
    grid = feature_grid(model_config)
    window = resolve_window(model_config.neck.get("window", 4), grid)
    weights = tuple(model_config.get("loss_weights", (0.5, 0.3, 0.2)))
    return wimfris_loss(outputs, mask, grid=grid, window=window, weights=weights)
