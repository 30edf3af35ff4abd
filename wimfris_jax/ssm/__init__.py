"""Selective state-space models: the S6 selective scan, the Mamba block and VMamba's 2-D SS2D built on it."""

from wimfris_jax.ssm.mamba import Mamba
from wimfris_jax.ssm.scan import default_impl, selective_scan
from wimfris_jax.ssm.ss2d import SS2D, cross_merge, cross_scan

__all__ = ["SS2D", "Mamba", "cross_merge", "cross_scan", "default_impl", "selective_scan"]
