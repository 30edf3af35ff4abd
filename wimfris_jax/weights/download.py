"""A checksummed, resumable, bounded HTTP(S) download (standard library only, plus a tqdm bar).

:func:`download` streams ``url`` to ``dest + ".part"`` in 1 MiB chunks, hashing as it goes, and renames the part to
``dest`` only once its sha256 is known (and matches ``sha256`` when given): an interrupted run never leaves a half file
at ``dest``. A part left by an earlier run is resumed with ``Range: bytes=N-`` (206: append; 200, a server that
ignores ranges: start over; 416: complete if its size is the total, else start over). A connection that drops mid-body
is retried ``retries`` times from what is on disk. The size is bounded by ``max_bytes`` (default: the environment
variable ``WIMFRIS_MAX_DOWNLOAD_BYTES``, else 16 GiB) before and while reading, and the free space of dest's folder is
checked before streaming. Every failure is one line naming the URL: a :class:`DownloadError`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request

import tqdm

from wimfris_jax.errors import UserError

CHUNK = 1 << 20
MAX_BYTES_ENV = "WIMFRIS_MAX_DOWNLOAD_BYTES"
DEFAULT_MAX_BYTES = 16 << 30
USER_AGENT = "wimfris_jax"
# What a connection that drops while the response is read raises (socket.timeout is TimeoutError since 3.10).
_DROPPED = (http.client.HTTPException, ConnectionError, TimeoutError)


class DownloadError(UserError, OSError):
    """A download that failed: HTTP error, no connection, interrupted, too large, no disk space, checksum mismatch."""


class DownloadArgumentError(UserError, ValueError):
    """A bad argument of :func:`download`: a sha256 that is not 64 hex digits, a size limit that is not a number."""


class _Interrupted(Exception):
    """The body stopped early (or the server's answer to a resume was unusable); the part on disk is kept."""

    def __init__(self, total: int | None):
        super().__init__(total)
        self.total = total


def _expected_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise DownloadArgumentError(f"sha256 {sha256!r} is not a sha256 digest (64 hex digits)")
    return sha256.lower()


def _max_bytes(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return int(max_bytes)
    text = os.environ.get(MAX_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        return int(text)
    except ValueError:
        raise DownloadArgumentError(f"{MAX_BYTES_ENV}={text!r} is not a number of bytes") from None


def _too_large(url: str, size: int, limit: int, what: str) -> DownloadError:
    return DownloadError(
        f"{url}: {what} {size} bytes, over the download limit of {limit} bytes "
        f"(max_bytes, default from the environment variable {MAX_BYTES_ENV})"
    )


def _hash_file(path: str, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def _attempt(url: str, dest: str, part: str, limit: int, timeout: float, progress: bool):
    """One request: appends to (or rewrites) the part; returns (sha256 object, size) of the complete part, or raises
    _Interrupted (retry from disk) or DownloadError (give up)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            match = re.fullmatch(r"bytes \*/(\d+)", (e.headers.get("Content-Range") or "").strip())
            if match and int(match.group(1)) == have:  # the part is the whole file
                h = hashlib.sha256()
                _hash_file(part, h)
                return h, have
            os.remove(part)  # not the file the server has: start over
            raise _Interrupted(int(match.group(1)) if match else None) from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({e.reason})") from None
    except _DROPPED:
        raise _Interrupted(None) from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        total = None if length is None else length
        if response.status == 206 and have:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
            if not match or int(match.group(1)) != have:  # not the range asked for: start over
                os.remove(part)
                raise _Interrupted(None)
            total = int(match.group(2)) if match.group(2) != "*" else None if length is None else have + length
        else:
            have = 0  # a 200: the server sent the whole file
        if total is not None and total > limit:
            raise _too_large(url, total, limit, "the file has")
        if total is not None:
            folder = os.path.dirname(os.path.abspath(dest))
            free = shutil.disk_usage(folder).free
            if free < total - have:
                raise DownloadError(f"{url}: {dest} needs {total - have} more bytes, {folder} has {free} free")
        h = hashlib.sha256()
        if have:
            _hash_file(part, h)
        size = have
        with open(part, "ab" if have else "wb") as f, tqdm.tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=os.path.basename(dest), leave=False, disable=not progress,
        ) as bar:  # fmt: skip
            while True:
                try:
                    chunk = response.read(CHUNK)
                except _DROPPED:
                    raise _Interrupted(total) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    f.close()
                    os.remove(part)
                    raise _too_large(url, size, limit, "the body grew past")
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if total is not None and size < total:
            raise _Interrupted(total)
        return h, size


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> str:
    """Downloads url to dest (a file path); returns the hex sha256 of the file.

    ``sha256`` (any case): the expected digest; a mismatch removes the download and raises. ``max_bytes``: the size
    limit (default ``$WIMFRIS_MAX_DOWNLOAD_BYTES``, else 16 GiB). ``retries``: how many times a dropped connection is
    resumed before giving up (the part stays; calling again resumes it). ``timeout``: seconds per socket operation.
    Proxies are honoured as urllib does (``http_proxy``, ``https_proxy``, ``no_proxy``). Raises
    :class:`DownloadError` (one line naming the URL) or :class:`DownloadArgumentError`.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http and https URLs can be downloaded, not {scheme or 'a plain path'!r}")
    expected = _expected_sha256(sha256)
    limit = _max_bytes(max_bytes)
    dest = os.fspath(dest)
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tries = 0
    while True:
        tries += 1
        try:
            h, _ = _attempt(url, dest, part, limit, timeout, progress)
            break
        except _Interrupted as e:
            if tries > retries:
                have = os.path.getsize(part) if os.path.exists(part) else 0
                of = "an unknown number of" if e.total is None else e.total
                raise DownloadError(
                    f"{url}: interrupted after {have} of {of} bytes ({tries} {'try' if tries == 1 else 'tries'}); "
                    "run again to resume"
                ) from None
    digest = h.hexdigest()
    if expected is not None and digest != expected:
        os.remove(part)
        raise DownloadError(f"{url}: sha256 mismatch: expected {expected}, got {digest} (the download was removed)")
    os.replace(part, dest)
    return digest
