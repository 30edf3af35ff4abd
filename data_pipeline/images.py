"""Image files to uint8 RGB arrays, each checked by its header before it is decoded (the one home of that check).

Every reader of a user image -- ``wimfris predict``, the refer layout's COCO files, the tfds records' JPEGs and mask
PNGs -- goes through :func:`image_size` before any decoder runs: PIL reads the width and height from the header only
(``Image.open`` is lazy; PNG, JPEG, BMP, GIF, TIFF, WebP, PPM, ...) and an image above :func:`max_image_pixels`
(default 89,478,485 = PIL's own ``Image.MAX_IMAGE_PIXELS``; the environment variable ``WIMFRIS_MAX_IMAGE_PIXELS``
sets it) is refused in one line naming the file and its size, before the gigabytes a 1 MB PNG of 20000 x 20000 pixels
decodes to. The check replaces PIL's own decompression-bomb check, which is off while a header is read or PIL decodes
(it would refuse without the size, and keep refusing images the variable allows). A file PIL cannot identify is
refused even where OpenCV could decode it (OpenEXR, Radiance HDR, PFM): its size cannot be known before decoding,
and none of those is an input of this library (COCO, the tfds records and ``predict``'s extensions are all formats
PIL reads).

Images are then decoded like DETRIS (``cv2.imdecode(IMREAD_COLOR)`` then BGR -> RGB: grayscale, RGBA, palette, CMYK
and 16-bit inputs all become uint8 RGB), with PIL as a fallback decoder. EXIF orientation is ignored (DETRIS applies
it): COCO polygons are drawn on the stored pixel grid, and tfds decodes the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image

from wimfris_jax.errors import UserError, one_line

MAX_PIXELS_VARIABLE = "WIMFRIS_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: 1 GiB of 24-bit pixels / 4 / 3 (~ 9459 x 9459)
_PIL_LOCK = threading.Lock()


class ExampleError(UserError, ValueError):
    """An example cannot be used; the message names it (ids and/or file)."""


class ImageTooLargeError(ExampleError):
    """An image whose header gives more pixels than :func:`max_image_pixels`; refused before it is decoded."""


class ImageLimitError(UserError, ValueError):
    """A ``WIMFRIS_MAX_IMAGE_PIXELS`` that is not a positive whole number."""


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may have: ``$WIMFRIS_MAX_IMAGE_PIXELS`` (digits, ``_`` allowed), else
    :data:`DEFAULT_MAX_PIXELS`. Read at every call, so the variable may change between reads."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ImageLimitError(f"{MAX_PIXELS_VARIABLE}={text!r} is not a positive whole number of pixels")
    return value


@contextlib.contextmanager
def _pil_check_off() -> Iterator[None]:
    """PIL's decompression-bomb check (warning and error) off while the block runs: :func:`image_size` does its
    work (module docstring). Held under a lock, so concurrent reads restore PIL's setting correctly."""
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def image_size(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of the image file ``source`` (a path, or its encoded bytes), read from its header only.

    Raises :class:`ImageTooLargeError` above :func:`max_image_pixels`, e.g. ``photo.png: 20000 x 20000 pixels
    (400.0 Mpx) is above the limit of 89.5 Mpx (set WIMFRIS_MAX_IMAGE_PIXELS to raise it)``, and :class:`ExampleError`
    when the file cannot be opened or PIL cannot read its header: one line naming ``name`` (default: the path).
    """
    name = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ExampleError(f"cannot read image file {name}: {e}") from e
    try:
        with f, _pil_check_off(), Image.open(f) as im:
            width, height = im.size
    except OSError as e:  # one PIL cannot identify (UnidentifiedImageError), or a read error
        raise ExampleError(f"cannot decode image {name}: {one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - a damaged header makes PIL's plugins raise many unrelated types
        raise ExampleError(f"cannot decode image {name}: damaged header ({one_line(e)})") from e
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageTooLargeError(
            f"{name}: {width} x {height} pixels ({_amount(width * height)}) is above the limit of {_amount(limit)} "
            f"(set {MAX_PIXELS_VARIABLE} to raise it)"
        )
    return height, width


def _amount(pixels: int) -> str:
    """'400.0 Mpx', or '110 px' below 0.1 Mpx."""
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 100_000 else f"{pixels:,} px"


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB (H, W, 3), as DETRIS does (OpenCV), PIL as fallback; the size is checked
    first (:func:`image_size`). Raises :class:`ExampleError` (one line naming ``name``) when it cannot be decoded."""
    image_size(data, name)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:  # e.g. above OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS, 2^30) that the variable allows
        img = None
    if img is not None:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    try:
        with _pil_check_off(), Image.open(io.BytesIO(data)) as pil:
            if pil.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(pil, np.float64)
                top = 65535.0 if pil.mode.startswith("I;16") or arr.max() > 255 else 255.0
                gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(pil.convert("RGB"), np.uint8).copy()
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise ExampleError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def decode_mask(data: bytes, name: str = "<bytes>") -> np.ndarray | None:
    """Encoded single-channel mask bytes (a PNG) -> uint8 (H, W), None when OpenCV cannot decode them; the size is
    checked first (:func:`image_size`, :class:`ExampleError` naming ``name``)."""
    image_size(data, name)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def load_image(path: str) -> np.ndarray:
    """Reads an image file to uint8 RGB (H, W, 3); a one-line :class:`ExampleError` naming the file if it is missing,
    unreadable or above the pixel limit (checked by its header before the file is read whole)."""
    image_size(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExampleError(f"cannot read image file {path}: {e}") from e
    return decode_image(data, path)
