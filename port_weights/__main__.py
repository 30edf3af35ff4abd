"""``python -m port_weights <family> SRC OUT``: convert a PyTorch checkpoint into a file the model loads.

Each family module exposes ``from_checkpoint(src: str) -> (params, meta)``; the result is written with
:func:`wimfris_jax.io.save_params` and read back with :func:`wimfris_jax.io.load_params`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from port_weights.common import ConversionError
from wimfris_jax.io import flatten, save_params

FAMILIES = {
    "dinov2": "port_weights.dinov2",
    "clip": "port_weights.clip",
    "mamba": "port_weights.mamba",
    "detris": "port_weights.detris",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m port_weights", description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("src", help="PyTorch checkpoint: .safetensors, .bin, .pth, .pt or a Hugging Face folder")
    ap.add_argument("out", help="output file (.msgpack)")
    args = ap.parse_args(argv)
    module = importlib.import_module(FAMILIES[args.family])
    try:
        params, meta = module.from_checkpoint(args.src)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_params(args.out, params, meta)
    n = sum(v.size for v in flatten(params).values())
    print(f"wrote {args.out}: {len(flatten(params))} arrays, {n:,} parameters ({args.family})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
