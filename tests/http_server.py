"""A threaded HTTP server on 127.0.0.1 for offline download tests: serves a dict {path: bytes}, honours
``Range: bytes=N-`` / ``bytes=N-M`` (206 with Content-Range, 416 past the end), records every request's path and
headers, and has switches for the failure modes: cut the body of the first N responses after K bytes (then close the
connection), ignore Range (always 200), send no Content-Length (the body ends when the connection closes). Any other
path answers 404.

    with LocalServer({"/a.bin": data}, cut=(1, 1000)) as server:
        download(server.url("/a.bin"), dest)
        server.requests  # [(path, {header: value}), ...]
"""

from __future__ import annotations

import http.server
import re
import threading


class LocalServer:
    def __init__(
        self,
        files: dict[str, bytes],
        *,
        cut: tuple[int, int] | None = None,
        ignore_range: bool = False,
        send_length: bool = True,
    ):
        self.files = dict(files)
        self.cut_left, self.cut_after = cut if cut else (0, 0)
        self.ignore_range = ignore_range
        self.send_length = send_length
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def ranges(self) -> list[str | None]:
        """The Range header of each request, in order (None where there was none)."""
        return [headers.get("Range") for _, headers in self.requests]

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _take_cut(self) -> int | None:
        """The byte count to cut this response after, while cuts are left."""
        with self._lock:
            if self.cut_left <= 0:
                return None
            self.cut_left -= 1
            return self.cut_after


def _handler(state: LocalServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            with state._lock:
                state.requests.append((self.path, dict(self.headers.items())))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            start, end, status = 0, len(data), 200
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if match and not state.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
                status = 206
            body = data[start:end]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            if state.send_length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            cut = state._take_cut()
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            self.close_connection = True

    return Handler
