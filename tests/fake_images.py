"""Image files for the tests of the readers' limits (``from fake_images import header_only_png``: pytest puts tests/ on
the path, as for tests/fake_refcoco.py)."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header (IHDR) says ``width`` x ``height`` RGB pixels, with an empty IDAT: what a
    decompression bomb looks like to a reader that checks the header (a decoder would allocate the full size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
