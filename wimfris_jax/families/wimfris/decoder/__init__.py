"""DETRIS task decoder and projector (mask head), reused by WIMFRIS after its HMF neck."""

from wimfris_jax.families.wimfris.decoder.decoder import Decoder, DecoderLayer
from wimfris_jax.families.wimfris.decoder.position import pos1d, pos2d
from wimfris_jax.families.wimfris.decoder.projector import Projector, dynamic_conv, upsample2x

__all__ = ["Decoder", "DecoderLayer", "Projector", "dynamic_conv", "pos1d", "pos2d", "upsample2x"]
