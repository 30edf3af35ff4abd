"""WIMFRIS parameter-efficient adapters: Mamba Text Adapter (eq. 1) and Multi-Scale Aligner (eq. 2-3)."""

from wimfris_jax.adapters.msa import MultiScaleAligner, RFMixer
from wimfris_jax.adapters.mta import MambaTextAdapter

__all__ = ["MambaTextAdapter", "MultiScaleAligner", "RFMixer"]
