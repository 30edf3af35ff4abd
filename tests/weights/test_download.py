"""wimfris_jax.weights.download against a local HTTP server (tests/http_server.py; no internet): the file and its
sha256, checksum mismatch, resume after a dropped body and from a part left on disk, servers that ignore Range or
answer 416, one-line HTTP / connection / scheme errors, the size limit before and while reading, the disk space
check."""

import hashlib
import socket
from collections import namedtuple

import pytest
from http_server import LocalServer
from limits import limit

from wimfris_jax.errors import UserError, is_user_error
from wimfris_jax.weights import download as download_module
from wimfris_jax.weights.download import DownloadArgumentError, DownloadError, download

DATA = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB and a bit: three chunks
SHA = hashlib.sha256(DATA).hexdigest()
TIMEOUT = limit(5)


def _get(url, dest, **kw):
    return download(url, dest, progress=False, timeout=TIMEOUT, **kw)


def _left(dest):
    return sorted(p.name for p in dest.parent.iterdir())


def test_download_writes_the_file_and_returns_its_sha256(tmp_path):
    dest = tmp_path / "sub" / "w.bin"  # the folder is created
    with LocalServer({"/w.bin": DATA}) as server:
        assert _get(server.url("/w.bin"), dest, sha256=SHA.upper()) == SHA  # the expected digest in any case
    assert dest.read_bytes() == DATA
    assert _left(dest) == ["w.bin"]  # no .part
    assert [(path, headers.get("User-Agent")) for path, headers in server.requests] == [("/w.bin", "wimfris_jax")]
    assert server.ranges() == [None]


def test_checksum_mismatch_removes_the_download(tmp_path):
    dest = tmp_path / "w.bin"
    wrong = "0" * 64
    with LocalServer({"/w.bin": DATA}) as server, pytest.raises(DownloadError) as e:
        _get(server.url("/w.bin"), dest, sha256=wrong)
    url = server.url("/w.bin")
    assert str(e.value) == f"{url}: sha256 mismatch: expected {wrong}, got {SHA} (the download was removed)"
    assert _left(dest) == []  # neither dest nor dest.part


def test_an_interrupted_body_is_resumed_with_range(tmp_path):
    dest = tmp_path / "w.bin"
    with LocalServer({"/w.bin": DATA}, cut=(2, 1_000_000)) as server:  # the first two responses cut
        assert _get(server.url("/w.bin"), dest, sha256=SHA) == SHA
    assert server.ranges() == [None, "bytes=1000000-", "bytes=2000000-"]
    assert dest.read_bytes() == DATA and _left(dest) == ["w.bin"]


def test_too_many_interruptions_keep_the_part_and_a_second_call_resumes(tmp_path):
    dest = tmp_path / "w.bin"
    with LocalServer({"/w.bin": DATA}, cut=(3, 1000)) as server:
        url = server.url("/w.bin")
        with pytest.raises(DownloadError) as e:
            _get(url, dest, retries=2)
        assert str(e.value) == f"{url}: interrupted after 3000 of {len(DATA)} bytes (3 tries); run again to resume"
        assert _left(dest) == ["w.bin.part"] and (tmp_path / "w.bin.part").read_bytes() == DATA[:3000]
        assert _get(url, dest, sha256=SHA) == SHA  # the server no longer cuts
    assert server.ranges() == [None, "bytes=1000-", "bytes=2000-", "bytes=3000-"]
    assert dest.read_bytes() == DATA


def test_a_part_on_disk_is_resumed(tmp_path):
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(DATA[:1234567])
    with LocalServer({"/w.bin": DATA}) as server:
        assert _get(server.url("/w.bin"), dest) == SHA  # the existing part is hashed too
    assert server.ranges() == ["bytes=1234567-"]
    assert dest.read_bytes() == DATA and _left(dest) == ["w.bin"]


def test_a_complete_part_is_accepted_on_416_and_a_longer_one_restarted(tmp_path):
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(DATA)
    with LocalServer({"/w.bin": DATA}) as server:
        assert _get(server.url("/w.bin"), dest, sha256=SHA) == SHA
        assert server.ranges() == [f"bytes={len(DATA)}-"]  # answered 416 with the total: nothing more read
        dest.unlink()
        (tmp_path / "w.bin.part").write_bytes(DATA + b"extra")
        assert _get(server.url("/w.bin"), dest, sha256=SHA) == SHA
    assert server.ranges()[1:] == [f"bytes={len(DATA) + 5}-", None]  # 416, not the total: start over
    assert dest.read_bytes() == DATA and _left(dest) == ["w.bin"]


def test_a_server_that_ignores_range_still_gives_the_right_file(tmp_path):
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(b"x" * 5000)  # not even the right bytes: the 200 body replaces it
    with LocalServer({"/w.bin": DATA}, ignore_range=True) as server:
        assert _get(server.url("/w.bin"), dest, sha256=SHA) == SHA
    assert server.ranges() == ["bytes=5000-"]
    assert dest.read_bytes() == DATA


def test_http_404_is_one_line(tmp_path):
    dest = tmp_path / "w.bin"
    with LocalServer({"/w.bin": DATA}) as server, pytest.raises(DownloadError) as e:
        _get(server.url("/missing.bin"), dest)
    assert str(e.value) == f"{server.url('/missing.bin')}: HTTP 404 Not Found"
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
    assert is_user_error(e.value) and isinstance(e.value, OSError)
    assert _left(dest) == []


def test_connection_refused_and_other_schemes(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.bin"
    with pytest.raises(DownloadError, match=rf"^{url}: cannot connect \(.*refused.*\)$"):
        _get(url, tmp_path / "w.bin")
    for url in ("file:///etc/hostname", "ftp://example.org/w.bin", "/etc/hostname"):
        with pytest.raises(DownloadError, match="only http and https URLs can be downloaded"):
            _get(url, tmp_path / "w.bin")
    assert _left(tmp_path / "w.bin") == []


@pytest.mark.parametrize("sha256", ["abc", "g" * 64, SHA + "0"])
def test_a_malformed_sha256_is_refused(sha256, tmp_path):
    with pytest.raises(DownloadArgumentError, match=f"sha256 '{sha256}' is not a sha256 digest") as e:
        _get("http://127.0.0.1:1/w.bin", tmp_path / "w.bin", sha256=sha256)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)


@pytest.mark.parametrize("by", ["argument", "environment"])
def test_max_bytes_refuses_before_reading(by, tmp_path, monkeypatch):
    dest = tmp_path / "w.bin"
    kw = {"max_bytes": 1000} if by == "argument" else {}
    monkeypatch.setenv("WIMFRIS_MAX_DOWNLOAD_BYTES", "1000")
    with LocalServer({"/w.bin": DATA}) as server, pytest.raises(DownloadError) as e:
        _get(server.url("/w.bin"), dest, **kw)
    assert str(e.value) == (
        f"{server.url('/w.bin')}: the file has {len(DATA)} bytes, over the download limit of 1000 bytes "
        "(max_bytes, default from the environment variable WIMFRIS_MAX_DOWNLOAD_BYTES)"
    )
    assert _left(dest) == []  # no body written, not even an empty part


def test_max_bytes_stops_a_body_without_length(tmp_path):
    dest = tmp_path / "w.bin"
    with LocalServer({"/w.bin": DATA}, send_length=False) as server:
        with pytest.raises(DownloadError, match=r"the body grew past \d+ bytes, over the download limit of 2000000"):
            _get(server.url("/w.bin"), dest, max_bytes=2_000_000)
        assert _left(dest) == []
        assert _get(server.url("/w.bin"), dest) == SHA  # without a length, the body ends when the connection closes
    assert dest.read_bytes() == DATA


def test_max_bytes_environment_must_be_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("WIMFRIS_MAX_DOWNLOAD_BYTES", "lots")
    with pytest.raises(DownloadArgumentError, match="WIMFRIS_MAX_DOWNLOAD_BYTES='lots' is not a number of bytes"):
        _get("http://127.0.0.1:1/w.bin", tmp_path / "w.bin")


def test_too_little_disk_space_is_one_line(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    dest = tmp_path / "w.bin"
    with LocalServer({"/w.bin": DATA}) as server, pytest.raises(DownloadError) as e:
        _get(server.url("/w.bin"), dest)
    assert str(e.value) == f"{server.url('/w.bin')}: {dest} needs {len(DATA)} more bytes, {tmp_path} has 100 free"
    assert _left(dest) == []


def test_the_progress_bar_names_the_file(tmp_path, capsys):
    with LocalServer({"/w.bin": DATA}) as server:
        assert download(server.url("/w.bin"), tmp_path / "w.bin", timeout=TIMEOUT) == SHA
    assert "w.bin" in capsys.readouterr().err
