"""WIMFRIS necks: Hierarchical Mamba Fusion (aggregation + Window Mamba Fuser, eq. 4) and the ablation necks."""

from wimfris_jax.families.wimfris.neck.hmf import HMF, NECKS, NoNeck, build_neck
from wimfris_jax.families.wimfris.neck.wmf import WindowMambaFuser, resolve_window, window_partition, window_reverse

__all__ = [
    "HMF",
    "NECKS",
    "NoNeck",
    "WindowMambaFuser",
    "build_neck",
    "resolve_window",
    "window_partition",
    "window_reverse",
]
