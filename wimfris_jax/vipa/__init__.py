"""VIPA (Cho et al.): Swin-B + BERT-base with early fusion, the Visual Expression Generator, and a decoder that
attends to the visual expression; a model family of the library (``config.model.family = "vipa"``)."""

from wimfris_jax.vipa.model import VIPA, build_vipa, vipa_loss_fn

__all__ = ["VIPA", "build_vipa", "vipa_loss_fn"]
