"""Weights by name: a source string -> a local file, downloaded once and checked.

    hf:ORG/NAME[@REV]              a Hugging Face model: its model.safetensors (else pytorch_model.bin) and config.json
    hf:ORG/NAME/PATH/FILE[@REV]    one file of a Hugging Face repository (e.g. a released .pth)
    openai:ViT-B/16                OpenAI's CLIP release (:data:`OPENAI_CLIP`), pinned by the sha256 in its URL
    https://HOST/FILE.pth[#sha256=HEX]   any URL; with a pinned sha256 the download must match it
    PATH                           a local file or folder

``hf:`` sources go through ``huggingface_hub``: its cache (``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1``, tokens
(``HF_TOKEN``, ``hf auth login``) and mirrors (``HF_ENDPOINT``) apply. URLs are downloaded by
:func:`wimfris_jax.weights.download.download` into ``<cache>/downloads/`` (resumed when interrupted, size-bounded);
a URL without a pinned sha256 is trusted on first use: its sha256 is recorded, printed in a warning, and checked by
every later use of the file. :func:`fetch` returns the local path and an ``identity`` that changes whenever the bytes
may have (the commit of a Hugging Face file, a file's sha256, a local file's size and mtime), the key of the
converted-weights cache (:mod:`port_weights.cache`). Nothing here imports torch or converts anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

from wimfris_jax.errors import UserError

OPENAI_CLIP = {  # OpenAI's CLIP release (github.com/openai/CLIP, clip/clip.py); each URL's folder is the file's sha256
    name: f"https://openaipublic.azureedge.net/clip/models/{digest}/{name.replace('/', '-')}.pt"
    for name, digest in {
        "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    }.items()
}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a hf:ORG/NAME source's weights, in order of preference
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class SourceError(UserError, ValueError):
    """A source that cannot be parsed or fetched (one line naming it)."""


class UntrustedDownload(UserWarning):
    """A URL without a pinned sha256 was downloaded (its sha256 is recorded and checked from then on)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A parsed source: ``kind`` "hf" (``location`` the repo id, ``path`` a file in it or "" for the model's
    weights), "url" (``location`` the URL, ``sha256`` pinned or None) or "file" (``location`` the path)."""

    spec: str
    kind: str
    location: str
    path: str = ""
    revision: str | None = None
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A fetched source: ``path`` the local file (or folder), ``identity`` what its bytes are known by."""

    source: Source
    path: str
    identity: str


def cache_dir() -> str:
    """``$WIMFRIS_CACHE``, else ``$XDG_CACHE_HOME/wimfris_jax``, else ``~/.cache/wimfris_jax``."""
    if os.environ.get("WIMFRIS_CACHE"):
        return os.path.abspath(os.environ["WIMFRIS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wimfris_jax")


def is_named(spec: str) -> bool:
    """Whether ``spec`` names a remote source (hf:, openai:, http(s)://) rather than a local path."""
    return spec.startswith(("hf:", "openai:", "http://", "https://"))


def parse_source(spec: str) -> Source:
    """The :class:`Source` of ``spec`` (module docstring); SourceError naming it when malformed."""
    spec = spec.strip()
    if not spec:
        raise SourceError("empty weights source; give hf:ORG/NAME, openai:NAME, an https:// URL or a file")
    if spec.startswith("openai:"):
        name = spec[len("openai:") :]
        if name not in OPENAI_CLIP:
            raise SourceError(f"{spec}: unknown OpenAI CLIP model; known: {', '.join(OPENAI_CLIP)}")
        url = OPENAI_CLIP[name]
        return Source(spec, "url", url, sha256=url.split("/")[-2])
    if spec.startswith("hf:"):
        rest, _, revision = spec[len("hf:") :].partition("@")
        parts = rest.strip("/").split("/")
        if len(parts) < 2 or not all(parts) or (_ and not revision):
            raise SourceError(f"{spec}: not hf:ORG/NAME[/FILE][@REVISION], e.g. hf:facebook/dinov2-with-registers-base")
        return Source(spec, "hf", "/".join(parts[:2]), "/".join(parts[2:]), revision or None)
    if spec.startswith(("http://", "https://")):
        url, _, fragment = spec.partition("#")
        digest = None
        if fragment:
            key, _, digest = fragment.partition("=")
            if key != "sha256" or not _HEX64.fullmatch(digest):
                raise SourceError(f"{spec}: the fragment must be #sha256=<64 hex digits>")
            digest = digest.lower()
        if not os.path.basename(urllib.parse.urlparse(url).path):
            raise SourceError(f"{spec}: the URL names no file")
        return Source(spec, "url", url, sha256=digest)
    if re.match(r"^[a-z][a-z0-9+.-]*://", spec):
        raise SourceError(f"{spec}: unsupported scheme; give hf:ORG/NAME, openai:NAME, an https:// URL or a file")
    return Source(spec, "file", os.path.expanduser(spec))


def fetch(source: Source | str, *, progress: bool = True) -> Fetched:
    """The local copy of ``source``, downloaded if needed (module docstring). SourceError / DownloadError (one line)
    when it cannot be had; FileNotFoundError for a missing local path."""
    if isinstance(source, str):
        source = parse_source(source)
    if source.kind == "hf":
        return _hub_fetched(source, hub_file(source, source.path or None, progress=progress))
    if source.kind == "url":
        path, digest = _download(source, progress)
        return Fetched(source, path, f"sha256:{digest}")
    path = os.path.abspath(source.location)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such file or folder", source.location)
    stats = [os.stat(path)] if os.path.isfile(path) else [e.stat() for e in os.scandir(path) if e.is_file()]
    stamp = hashlib.sha256(repr(sorted((s.st_size, s.st_mtime_ns) for s in stats)).encode()).hexdigest()[:16]
    return Fetched(source, path, f"file:{path}:{stamp}")


def local(source: Source | str) -> Fetched | None:
    """What :func:`fetch` would return if it needs no network (the file is in the caches), else None."""
    if isinstance(source, str):
        source = parse_source(source)
    if source.kind == "hf":
        from huggingface_hub import try_to_load_from_cache

        for name in [source.path] if source.path else HF_WEIGHTS:
            path = try_to_load_from_cache(source.location, name, revision=source.revision)
            if isinstance(path, str):
                return _hub_fetched(source, path)
        return None
    if source.kind == "url":
        path, _, known = _recorded(source.location)
        usable = known and os.path.exists(path) and source.sha256 in (None, known)
        return Fetched(source, path, f"sha256:{known}") if usable else None
    return fetch(source, progress=False) if os.path.exists(source.location) else None


def _hub_fetched(source: Source, path: str) -> Fetched:
    commit = re.search(r"[/\\]snapshots[/\\]([^/\\]+)[/\\]", path)
    return Fetched(source, path, f"hf:{source.location}/{os.path.basename(path)}@{commit.group(1) if commit else '?'}")


def hub_file(source: Source, filename: str | None, *, progress: bool = True) -> str:
    """The local path of ``filename`` in the Hugging Face repo of ``source`` (None: the model's weights, the first of
    :data:`HF_WEIGHTS` the repo has, with its config.json when there is one)."""
    import huggingface_hub as hub  # lazy: only for hf: sources
    from huggingface_hub import constants, errors

    where = f"hf:{source.location}" + (f"@{source.revision}" if source.revision else "")
    names = [filename] if filename else list(HF_WEIGHTS)
    kw: dict[str, Any] = dict(revision=source.revision, library_name="wimfris_jax")
    if not progress:
        kw["tqdm_class"] = _Silent
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    missing_here, missing_there = [], []
    for i, name in enumerate(names):
        try:
            with _quiet("huggingface_hub.utils._http"):  # its retry warnings; the outcome is one line here
                path = hub.hf_hub_download(source.location, name, **kw)
        except errors.LocalEntryNotFoundError as e:  # not in the cache, and offline or the Hub unreachable
            if constants.is_offline_mode():
                missing_here.append(name)
                continue
            for other in names[i + 1 :]:  # unreachable: a later candidate the cache holds will do
                found = hub.try_to_load_from_cache(source.location, other, revision=source.revision)
                if isinstance(found, str):
                    return found
            raise SourceError(f"{where}: cannot reach the Hub ({_innermost(e)}), and {' / '.join(names[i:])} not in "
                              f"the Hugging Face cache ({cache})") from None  # fmt: skip
        except errors.RevisionNotFoundError:
            raise SourceError(f"{where}: no such revision on the Hub") from None
        except (errors.RepositoryNotFoundError, errors.GatedRepoError):
            raise SourceError(f"{where}: no such repository, or it is gated or private (set HF_TOKEN or run "
                              "`hf auth login`)") from None  # fmt: skip
        except errors.EntryNotFoundError:
            missing_there.append(name)
            continue
        except errors.HfHubHTTPError as e:
            raise SourceError(f"{where}: {str(e).splitlines()[0]}") from None
        if filename is None:
            with contextlib.suppress(errors.EntryNotFoundError):  # without one, the converters size from the weights
                hub.hf_hub_download(source.location, "config.json", **kw)
        return path
    if missing_here:
        raise SourceError(f"{where}: {' / '.join(missing_here)} not in the Hugging Face cache ({cache}), and the Hub "
                          "is off (HF_HUB_OFFLINE=1): fetch it once online (wimfris weights fetch)")  # fmt: skip
    raise SourceError(f"{where} has no {' or '.join(missing_there)}; name the file: hf:{source.location}/FILE")


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The ``logger``'s records below ERROR dropped for the block (a filter: huggingface_hub resets its levels)."""
    log = logging.getLogger(logger)
    drop = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _innermost(error: BaseException) -> str:
    """The first line of the deepest cause of ``error`` (e.g. the DNS failure behind a Hub error)."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class _Silent:  # a tqdm stand-in for huggingface_hub when progress is off
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _download_paths(url: str) -> tuple[str, str]:
    """``<cache>/downloads/<hash of the URL>/<file name>`` and its ``.sha256`` record."""
    name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    path = os.path.join(cache_dir(), "downloads", hashlib.sha256(url.encode()).hexdigest()[:16], name)
    return path, path + ".sha256"


def _recorded(url: str) -> tuple[str, str, str | None]:
    """``(path, record, sha256)``: :func:`_download_paths` and the sha256 recorded by an earlier finished download of
    ``url`` (None if there was none)."""
    path, record = _download_paths(url)
    if not os.path.exists(record):
        return path, record, None
    with open(record, encoding="ascii") as f:
        return path, record, f.read().strip()


def _download(source: Source, progress: bool) -> tuple[str, str]:
    """``(path, sha256)`` of a URL source in ``<cache>/downloads/<hash of the URL>/<file name>``; the sha256 of each
    finished download is kept beside it (``.sha256``), so a file already there is neither fetched nor hashed again."""
    from wimfris_jax.weights.download import download

    url = source.location
    path, record, known = _recorded(url)
    if known and os.path.exists(path):
        if source.sha256 in (None, known):
            return path, known
        os.remove(path)  # pinned to other bytes than the copy we hold: fetch again
    expected = source.sha256 or known  # an unpinned URL downloaded before must give the bytes it gave then
    os.makedirs(os.path.dirname(path), exist_ok=True)
    digest = download(url, path, sha256=expected, progress=progress)
    with open(record + ".tmp", "w", encoding="ascii") as f:
        f.write(digest + "\n")
    os.replace(record + ".tmp", record)
    if expected is None:
        warnings.warn(
            f"{url} has no pinned sha256; recorded {digest} on this first download (later uses must match); "
            f"pin it as {url}#sha256={digest}", UntrustedDownload, stacklevel=2,
        )  # fmt: skip
    return path, digest
