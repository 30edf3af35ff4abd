"""Parameter-efficient adapters and the one adapter schema every model config uses.

``config.model.text_adapter`` and ``config.model.vision_adapter`` are dicts with a ``kind`` (a key of
:data:`ADAPTERS`, or "none"), ``layers`` (0-based backbone layers carrying one; empty: off) and the module's
sizes. ``text_adapter.scale`` is the fixed factor the model applies to the text adapter's output (0.2, as
DETRIS). Kinds:

  text    "mta"            MambaTextAdapter, WIMFRIS eq. (1)    params ``mta_<i>``           (+ config.model.mamba)
          "dmoc"           DETRIS D-MoC text adapter            params ``text_adapter_<i>``
  vision  "msa"            MultiScaleAligner, WIMFRIS eq. (2-3) params ``msa_<i>``
          "dense_aligner"  DETRIS Dense Aligner                 params ``dense_aligner_<i>``

The protocol (what the model calls; a new kind is a module following it plus one row of :data:`ADAPTERS`):

  text adapter    module(width=, dtype=, **sizes);                  __call__(x (B, L, Ct), *, train) -> (B, L, Ct)
  vision adapter  module(width=, text_dim=, dtype=, attention=, **sizes);
                  __call__(x (B, T, Cv), words (B, L, Ct), pad_mask (B, L) | None, *, grid, num_prefix, train)
                  -> (B, T, Cv); optional ``alpha()``: its emphasis, reported as the model's "alphas" output.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from wimfris_jax.families.wimfris.adapters.detris import DenseAligner, DMoC
from wimfris_jax.families.wimfris.adapters.msa import MultiScaleAligner, RFMixer
from wimfris_jax.families.wimfris.adapters.mta import MambaTextAdapter


@dataclasses.dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter.

    Attributes:
      side: "text" (inside the text tower) or "vision" (inside the vision tower).
      module: the Flax module class (the protocol of the module docstring).
      prefix: parameters live under ``f"{prefix}_{layer}"`` (the names of converted checkpoints).
      label: its row in the parameter summary (``python -m wimfris_jax.summary``).
      shared: groups of ``config.model`` merged into the module's keyword arguments (MTA: the Mamba sizes).
    """

    side: str
    module: type[nn.Module]
    prefix: str
    label: str
    shared: tuple[str, ...] = ()


ADAPTERS: dict[str, AdapterKind] = {
    "mta": AdapterKind("text", MambaTextAdapter, "mta", "MTA", shared=("mamba",)),
    "dmoc": AdapterKind("text", DMoC, "text_adapter", "text adapter (D-MoC)"),
    "msa": AdapterKind("vision", MultiScaleAligner, "msa", "MSA"),
    "dense_aligner": AdapterKind("vision", DenseAligner, "dense_aligner", "Dense Aligner"),
}

__all__ = ["ADAPTERS", "AdapterKind", "DenseAligner", "MambaTextAdapter", "MultiScaleAligner", "RFMixer", "DMoC"]
