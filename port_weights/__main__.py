"""``python -m port_weights <family> SRC OUT``: convert a PyTorch checkpoint into a file the model loads.

Each family module exposes ``from_checkpoint(src: str) -> (params, meta)`` (:func:`port_weights.protocol.port` of its
:class:`~port_weights.protocol.Family`); the result is written with
:func:`wimfris_jax.io.save_params` and read back with :func:`wimfris_jax.io.load_params`.

Bad input (a missing or unsafe SRC, a checkpoint that does not fit, an OUT whose folder is missing or read-only)
exits with status 1 and one ``python -m port_weights: error: ...`` line; OUT's folder is checked before converting.
Any other exception is a bug and keeps its traceback; ``--debug`` shows the traceback of every error. Converter
warnings (float16/bfloat16 tensors upcast) are printed as one ``python -m port_weights: warning: ...`` line each.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings

from port_weights.common import UpcastWarning
from wimfris_jax.errors import describe, is_user_error
from wimfris_jax.io import flatten, save_params

PROG = "python -m port_weights"
FAMILIES = {
    "dinov2": "port_weights.dinov2",
    "clip": "port_weights.clip",
    "mamba": "port_weights.mamba",
    "vmamba": "port_weights.vmamba",
    "detris": "port_weights.detris",
    "swin": "port_weights.swin",
    "bert": "port_weights.bert",
}


def check_output(out: str) -> None:
    """Raises an ``OSError`` naming ``out`` when it cannot be written: it is a folder, or its folder is missing,
    not a folder, or not writable."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise IsADirectoryError(errno.EISDIR, "is a folder; give the output file's name (e.g. out.msgpack)", out)
    if not os.path.exists(folder):
        raise FileNotFoundError(errno.ENOENT, f"its folder {folder} does not exist", out)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder", out)
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, f"its folder {folder} is not writable", out)


def convert(
    family: str, src: str, out: str, *, meta: dict | None = None, prog: str = PROG, options: dict | None = None
) -> str:
    """Converts ``src`` with the ``family`` converter (its ``from_checkpoint(src, **options)``) and writes ``out``
    (with ``meta`` added to the converter's); returns the summary line. Upcast warnings are printed as one
    ``{prog}: warning:`` line each (also when the conversion then fails); other warnings as usual."""
    check_output(out)
    module = importlib.import_module(FAMILIES[family])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UpcastWarning)
            params, found = module.from_checkpoint(src, **(options or {}))
    finally:
        for w in caught:
            if issubclass(w.category, UpcastWarning):
                print(f"{prog}: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    save_params(out, params, {**found, **(meta or {})})
    flat = flatten(params)
    n = sum(v.size for v in flat.values())
    return f"wrote {out}: {len(flat)} arrays, {n:,} parameters ({family})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m port_weights``; returns the exit status."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("src", help="PyTorch checkpoint: .safetensors, .bin, .pth, .pt or a Hugging Face folder")
    ap.add_argument("out", help="output file (.msgpack)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = ap.parse_args(argv)
    try:
        print(convert(args.family, args.src, args.out))
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"{PROG}: error: {describe(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
