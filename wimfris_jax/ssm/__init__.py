"""Selective state-space models: the S6 selective scan and the Mamba block built on it."""

from wimfris_jax.ssm.mamba import Mamba
from wimfris_jax.ssm.scan import default_impl, selective_scan

__all__ = ["Mamba", "default_impl", "selective_scan"]
