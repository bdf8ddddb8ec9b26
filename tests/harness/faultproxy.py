"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real registry.

    proxy = FaultProxy(registry.host).start()
    proxy.faults.burst_5xx = 3          # every 3rd /v2/ request (after the ping) answers 503
    ... point the store / podman at proxy.host ...
    proxy.faults = Faults()             # all off
    proxy.stop()

Switches (a `Faults` instance; replace it or set its fields, changes apply to the next request):

- `burst_5xx = k`: every k-th request to /v2/<name>/... answers 503 (with Retry-After: 0);
- `reset_after = n`: every other blob body longer than n bytes is cut after n bytes with a
  TCP reset;
- `slow_delay = s`: blob bodies are sent in 16 KiB pieces with s seconds between them;
- `ignore_range = True`: Range is dropped before forwarding, so the registry answers 200 with
  the whole blob;
- `redirect_blobs = True`: blob GETs answer 307 to a second loopback port, which serves the
  blob (Range honoured) and records whether an Authorization header reached it;
- `token_ttl = s`: the proxy demands Bearer tokens from its own /token endpoint, valid s
  seconds (`token_users` = {user: password} requires Basic credentials for a token);
- `flip_byte = True`: one byte in the middle of every blob body is inverted.

Counters in `proxy.stats` tell a test that a fault really happened.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_PIECE = 16 << 10


@dataclass
class Faults:
    burst_5xx: int = 0
    reset_after: int | None = None
    slow_delay: float = 0.0
    ignore_range: bool = False
    redirect_blobs: bool = False
    token_ttl: float | None = None
    token_users: dict[str, str] | None = field(default=None, repr=False)
    flip_byte: bool = False


def _is_blob(path: str) -> bool:
    return "/blobs/sha256:" in path.split("?", 1)[0]


def _repo_of(path: str) -> str:
    p = path.split("?", 1)[0][len("/v2/") :]
    for marker in ("/blobs/", "/manifests/"):
        if marker in p:
            return p.split(marker, 1)[0]
    return ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self.stats: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._n_v2 = 0
        self._n_blob = 0
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._main = _Server(("127.0.0.1", 0), self._handler(redirect_target=False))
        self._side = _Server(("127.0.0.1", 0), self._handler(redirect_target=True))
        for srv in (self._main, self._side):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1})
            t.daemon = True
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._main.server_address[1]}"

    @property
    def side_host(self) -> str:
        return f"127.0.0.1:{self._side.server_address[1]}"

    def count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # -- token auth ------------------------------------------------------------------------

    def _issue_token(self, ttl: float) -> str:
        tok = secrets.token_hex(16)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[tok] = now + ttl
        return tok

    def _token_valid(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        with self._lock:
            exp = self._tokens.get(header[7:].strip())
        return exp is not None and exp > time.monotonic()

    # -- the handler -----------------------------------------------------------------------

    def _handler(self, *, redirect_target: bool) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._handle()

            def do_HEAD(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def do_PATCH(self) -> None:
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

            def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _handle(self) -> None:
                try:
                    if redirect_target:
                        self._serve_redirected()
                    else:
                        self._serve()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _serve_redirected(self) -> None:
                # /blobs/<repo...>/<digest>?sig=...
                path = self.path.split("?", 1)[0][len("/blobs/") :]
                repo, digest = path.rsplit("/", 1)
                proxy.count("redirected_requests")
                if self.headers.get("Authorization"):
                    proxy.count("auth_leaked_to_redirect")
                self._forward(f"/v2/{repo}/blobs/{digest}", strip_auth=True)

            def _serve(self) -> None:
                f = proxy.faults
                path = self.path
                proxy.count("requests")
                if path.startswith("/token"):
                    return self._token(f)
                if (
                    f.token_ttl is not None
                    and path.startswith("/v2/")
                    and not proxy._token_valid(self.headers.get("Authorization", ""))
                ):
                    proxy.count("token_401")
                    repo = _repo_of(path)
                    challenge = f'Bearer realm="http://{proxy.host}/token",service="faultproxy"'
                    if repo:
                        challenge += f',scope="repository:{repo}:pull"'
                    body = json.dumps({"errors": [{"code": "UNAUTHORIZED"}]}).encode()
                    return self._reply(401, body, {"WWW-Authenticate": challenge})
                if path.startswith("/v2/") and path.rstrip("/") != "/v2" and f.burst_5xx:
                    with proxy._lock:
                        proxy._n_v2 += 1
                        fail = proxy._n_v2 % f.burst_5xx == 0
                    if fail:
                        proxy.count("injected_5xx")
                        return self._reply(503, b"injected", {"Retry-After": "0"})
                if f.redirect_blobs and self.command == "GET" and _is_blob(path):
                    proxy.count("redirects")
                    repo = _repo_of(path)
                    digest = path.split("?", 1)[0].rsplit("/", 1)[1]
                    loc = (
                        f"http://{proxy.side_host}/blobs/{repo}/{digest}?sig={secrets.token_hex(8)}"
                    )
                    return self._reply(307, b"", {"Location": loc})
                self._forward(path, strip_auth=f.token_ttl is not None)

            def _token(self, f: Faults) -> None:
                proxy.count("token_requests")
                if f.token_users is not None:
                    auth = self.headers.get("Authorization", "")
                    ok = False
                    if auth.startswith("Basic "):
                        user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                        ok = f.token_users.get(user) == pw
                    if not ok:
                        return self._reply(401, b"bad credentials")
                ttl = f.token_ttl or 60.0
                tok = proxy._issue_token(ttl)
                body = json.dumps({"token": tok, "expires_in": int(max(1, ttl))}).encode()
                self._reply(200, body, {"Content-Type": "application/json"})

            def _forward(self, path: str, *, strip_auth: bool) -> None:
                f = proxy.faults
                blob_get = self.command == "GET" and _is_blob(path)
                # a list, not a dict: clients repeat headers (Podman sends several Accept)
                headers = [
                    (k, v)
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP and k.lower() not in ("host", "content-length")
                ]
                if strip_auth:
                    headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
                if blob_get and f.ignore_range and any(k.lower() == "range" for k, _ in headers):
                    proxy.count("range_ignored")
                    headers = [(k, v) for k, v in headers if k.lower() != "range"]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(self.upstream_host, timeout=60)
                try:
                    conn.putrequest(self.command, path, skip_accept_encoding=True)
                    for k, v in headers:
                        conn.putheader(k, v)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    declared = resp.getheader("Content-Length")
                    if declared is None and self.command != "HEAD":
                        data = resp.read()
                        out_headers.append(("Content-Length", str(len(data))))
                        pieces = iter([data])
                        total = len(data)
                    else:
                        total = int(declared or 0)
                        pieces = iter(lambda: resp.read(_PIECE), b"")
                    self.send_response(resp.status)
                    for k, v in out_headers:
                        self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    if self.command == "HEAD":
                        return
                    cut = None
                    if (
                        blob_get
                        and f.reset_after is not None
                        and resp.status in (200, 206)
                        and total > f.reset_after
                    ):
                        with proxy._lock:
                            proxy._n_blob += 1
                            if proxy._n_blob % 2 == 1:
                                cut = f.reset_after
                    flip_at = total // 2 if blob_get and f.flip_byte and total else None
                    sent = 0
                    for piece in pieces:
                        if flip_at is not None and sent <= flip_at < sent + len(piece):
                            i = flip_at - sent
                            piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1 :]
                            proxy.count("flipped")
                        if cut is not None and sent + len(piece) >= cut:
                            self.wfile.write(piece[: max(0, cut - sent)])
                            self.wfile.flush()
                            proxy.count("resets")
                            self._rst()
                            return
                        self.wfile.write(piece)
                        sent += len(piece)
                        if blob_get and f.slow_delay:
                            self.wfile.flush()
                            proxy.count("slow_pieces")
                            time.sleep(f.slow_delay)
                finally:
                    conn.close()

            @property
            def upstream_host(self) -> str:
                return proxy.upstream

            def _rst(self) -> None:
                # SO_LINGER 0: close() sends a RST instead of a FIN
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

        return Handler
