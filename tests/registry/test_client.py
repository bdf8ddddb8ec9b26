"""RegistryClient against the real local docker-registry, and against a scripted fake server
(ThreadingHTTPServer on 127.0.0.1) for what distribution 2.8 never does: token auth, redirects,
5xx/429, ignored Range headers, truncated bodies."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import structlog

from store import oci
from store.digest import sha256_of
from store.errors import (
    AuthError,
    Denied,
    DigestMismatch,
    FormatError,
    NotFound,
    RegistryError,
    TransientRegistryError,
)
from store.reference import Reference
from store.registry import RegistryClient, StaticCredentials
from store.registry.auth import basic_header
from tests.harness.registry import (
    LayerBlob,
    LocalRegistry,
    PushedImage,
    parse_access_line,
    write_htpasswd,
)

# --- the real registry -----------------------------------------------------------------------

REPO = "client-test"


@dataclass
class Pushed:
    image: PushedImage
    layers: list[bytes]
    config: bytes


@pytest.fixture(scope="module")
def pushed(registry: LocalRegistry) -> Pushed:
    rnd = random.Random(42)
    raw = bytes(rnd.getrandbits(8) for _ in range(300_000))
    layers = [
        LayerBlob(gzip.compress(raw, mtime=0)),
        LayerBlob(gzip.compress(b"small layer\n" * 1000, mtime=0), annotations={"a": "b"}),
    ]
    image = registry.push_image(REPO, "v1", layers)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256_of(raw), sha256_of(b"small layer\n" * 1000)],
            },
        }
    ).encode()
    assert sha256_of(config) == image.config_digest
    return Pushed(image, [layer.data for layer in layers], config)


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    c = RegistryClient(deadline=10.0, backoff_initial=0.01, backoff_max=0.05)
    yield c
    c.close()


def test_manifest_by_tag(registry: LocalRegistry, pushed: Pushed, client: RegistryClient) -> None:
    fm = client.get_manifest(Reference.parse(f"{registry.host}/{REPO}:v1"))
    assert fm.data == pushed.image.manifest_bytes
    assert fm.digest == pushed.image.manifest_digest
    assert fm.media_type == oci.OCI_MANIFEST
    m = oci.parse_manifest(fm.data, fm.media_type)
    assert isinstance(m, oci.Manifest)
    assert [d.digest for d in m.layers] == [sha256_of(b) for b in pushed.layers]
    assert m.layers[1].annotations == {"a": "b"}


def test_manifest_by_digest(
    registry: LocalRegistry, pushed: Pushed, client: RegistryClient
) -> None:
    digest = pushed.image.manifest_digest
    fm = client.get_manifest(Reference.parse(f"{registry.host}/{REPO}@{digest}"))
    assert fm.digest == digest
    assert fm.data == pushed.image.manifest_bytes


def test_config_blob(registry: LocalRegistry, pushed: Pushed, client: RegistryClient) -> None:
    data = client.get_blob(registry.host, REPO, pushed.image.config_digest)
    assert data == pushed.config
    cfg = oci.parse_config(data)
    assert len(cfg.diff_ids) == 2
    with pytest.raises(RegistryError, match="limit"):
        client.get_blob(registry.host, REPO, pushed.image.config_digest, max_size=10)


def test_ranges_are_206_only(
    registry: LocalRegistry, pushed: Pushed, client: RegistryClient
) -> None:
    blob = pushed.layers[0]
    digest = sha256_of(blob)
    size = len(blob)
    mark = registry.mark()
    for off, ln in [(0, 100), (12345, 70_000), (size - 512, 512), (size - 1, 1), (0, size)]:
        assert client.read_range(registry.host, REPO, digest, off, ln) == blob[off : off + ln]
    assert client.read_ranges(registry.host, REPO, digest, [(5, 5), (size - 3, 3)]) == [
        blob[5:10],
        blob[-3:],
    ]
    gets = registry.blob_gets(mark, digest)
    assert len(gets) == 7
    assert {e.status for e in gets} == {206}, gets
    assert [e.bytes for e in gets][:2] == [100, 70_000]
    assert registry.blob_gets(mark, digest, status=200) == []


def test_range_beyond_end(registry: LocalRegistry, pushed: Pushed, client: RegistryClient) -> None:
    blob = pushed.layers[1]
    digest = sha256_of(blob)
    size = len(blob)
    with pytest.raises(FormatError, match="beyond the end"):
        client.read_range(registry.host, REPO, digest, size - 10, 20)  # registry clamps: 206
    with pytest.raises(FormatError, match="beyond the end"):
        client.read_range(registry.host, REPO, digest, size + 10, 20)  # registry: 416
    assert client.read_range(registry.host, REPO, digest, 3, 0) == b""


def test_blob_size(registry: LocalRegistry, pushed: Pushed, client: RegistryClient) -> None:
    for blob in pushed.layers:
        assert client.blob_size(registry.host, REPO, sha256_of(blob)) == len(blob)


def test_download_blob(registry: LocalRegistry, pushed: Pushed, client: RegistryClient) -> None:
    blob = pushed.layers[0]
    digest = sha256_of(blob)
    mark = registry.mark()
    buf = io.BytesIO()
    size = client.download_blob(registry.host, REPO, digest, buf, expected_size=len(blob))
    assert size == len(blob)
    assert buf.getvalue() == blob
    assert [(e.status, e.bytes) for e in registry.blob_gets(mark, digest)] == [(200, len(blob))]
    with pytest.raises(FormatError, match="expected"):
        client.download_blob(registry.host, REPO, digest, io.BytesIO(), expected_size=10)


def test_not_found_is_quick(
    registry: LocalRegistry, pushed: Pushed, client: RegistryClient
) -> None:
    missing = "sha256:" + "0" * 64
    start = time.monotonic()
    with pytest.raises(NotFound):
        client.get_manifest(Reference.parse(f"{registry.host}/{REPO}:no-such-tag"))
    with pytest.raises(NotFound):
        client.get_manifest(Reference.parse(f"{registry.host}/no-such-repo:v1"))
    with pytest.raises(NotFound):
        client.read_range(registry.host, REPO, missing, 0, 10)
    with pytest.raises(NotFound):
        client.blob_size(registry.host, REPO, missing)
    with pytest.raises(NotFound):
        client.get_blob(registry.host, REPO, missing)
    # a blob exists only in the repositories it was pushed to
    with pytest.raises(NotFound):
        client.blob_size(registry.host, "other-repo", sha256_of(pushed.layers[0]))
    assert time.monotonic() - start < 10.0  # no retry storm (a bug would take minutes)


def test_multi_platform_index(registry: LocalRegistry, client: RegistryClient) -> None:
    repo = "client-multi"
    images = {}
    for arch in ("amd64", "arm64"):
        layer = LayerBlob(gzip.compress(f"layer for {arch}\n".encode(), mtime=0))
        cfg = {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256_of(f"layer for {arch}\n".encode())]},
        }
        images[arch] = registry.push_image(repo, arch, [layer], cfg)
    index_digest = registry.push_index(
        repo,
        "multi",
        [
            (
                images["amd64"].manifest_digest,
                len(images["amd64"].manifest_bytes),
                {"os": "linux", "architecture": "amd64"},
            ),
            (
                images["arm64"].manifest_digest,
                len(images["arm64"].manifest_bytes),
                {"os": "linux", "architecture": "arm64", "variant": "v8"},
            ),
        ],
    )
    fm = client.get_manifest(Reference.parse(f"{registry.host}/{repo}:multi"))
    assert fm.digest == index_digest
    assert fm.media_type == oci.OCI_INDEX
    idx = oci.parse_manifest(fm.data, fm.media_type)
    assert isinstance(idx, oci.Index)
    for arch, want in (
        ("amd64", oci.Platform("linux", "amd64")),
        ("arm64", oci.Platform("linux", "aarch64")),
    ):
        chosen = oci.choose_platform(idx, want)
        assert chosen.digest == images[arch].manifest_digest
        ref = Reference.parse(f"{registry.host}/{repo}@{chosen.digest}")
        assert client.get_manifest(ref).data == images[arch].manifest_bytes


def test_concurrent_ranges(registry: LocalRegistry, pushed: Pushed) -> None:
    blob = pushed.layers[0]
    digest = sha256_of(blob)
    rnd = random.Random(7)
    wanted = [
        (off, rnd.randrange(1, 20_000))
        for off in (rnd.randrange(0, len(blob) - 20_000) for _ in range(200))
    ]
    with RegistryClient(pool_size=16) as c, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: c.read_range(registry.host, REPO, digest, *r), wanted))
    assert results == [blob[off : off + ln] for off, ln in wanted]


def test_basic_auth_against_real_registry(tmp_path: Path) -> None:
    try:
        htpasswd = write_htpasswd(tmp_path / "htpasswd", "alice", "s3cret")
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"cannot create a bcrypt htpasswd here: {exc}")
    with LocalRegistry() as reg:
        reg.start(tmp_path / "reg", htpasswd=htpasswd, credentials=("alice", "s3cret"))
        img = reg.push_image("private", "v1", [LayerBlob(gzip.compress(b"x" * 100, mtime=0))])
        ref = Reference.parse(f"{reg.host}/private:v1")
        with RegistryClient(deadline=5.0) as anon, pytest.raises(AuthError):
            anon.get_manifest(ref)
        bad = StaticCredentials({reg.host: ("alice", "wrong")})
        with RegistryClient(credentials=bad, deadline=5.0) as c, pytest.raises(AuthError):
            c.get_manifest(ref)
        good = StaticCredentials({reg.host: ("alice", "s3cret")})
        with RegistryClient(credentials=good, deadline=5.0) as c:
            mark = reg.mark()
            assert c.get_manifest(ref).digest == img.manifest_digest
            assert c.get_blob(reg.host, "private", img.config_digest)
            # one 401 to learn the challenge, then credentials are sent up front
            assert [e.status for e in reg.requests_since(mark)] == [401, 200, 200]


# --- harness self-checks -----------------------------------------------------------------------


def test_access_log_parsing() -> None:
    lines = [
        '127.0.0.1 - - [03/Dec/2026:14:32:26 +0000] "GET /v2/foo/blobs/sha256:ab HTTP/1.1" '
        '206 4 "" "curl/7.88.1"\n',
        '127.0.0.1 - alice [03/Dec/2026:14:32:26 +0000] "HEAD /v2/foo/manifests/latest HTTP/1.1" '
        '404 - "" "python-requests/2.34.2"\n',
        'time="2026-12-03T14:32:03.45Z" level=info msg="response completed" '
        "http.request.method=GET http.response.status=200\n",
        "garbage\n",
    ]
    parsed = [parse_access_line(line) for line in lines]
    assert parsed[0] is not None and (parsed[0].method, parsed[0].status, parsed[0].bytes) == (
        "GET",
        206,
        4,
    )
    assert parsed[0].path == "/v2/foo/blobs/sha256:ab"
    assert parsed[1] is not None and (parsed[1].method, parsed[1].bytes) == ("HEAD", 0)
    assert parsed[2:] == [None, None]


def test_requests_since_sees_own_requests(registry: LocalRegistry, pushed: Pushed) -> None:
    import requests

    mark = registry.mark()
    assert registry.requests_since(mark) == []
    requests.get(f"{registry.url}/v2/{REPO}/tags/list", timeout=5)
    entries = registry.requests_since(mark)
    assert [(e.method, e.path, e.status) for e in entries] == [
        ("GET", f"/v2/{REPO}/tags/list", 200)
    ]
    assert registry.running


def test_registry_stop_is_idempotent(tmp_path: Path) -> None:
    reg = LocalRegistry()
    reg.start(tmp_path)
    assert reg.running
    pid = reg._proc.pid  # type: ignore[union-attr]
    reg.stop()
    reg.stop()
    assert not reg.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    reg.close()


# --- a scripted fake registry ------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lowercased names


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    send_only: int | None = None  # write only this many body bytes, then drop the connection
    delay: float = 0.0


Handler = Callable[[Seen], Reply]


class FakeServer:
    def __init__(self) -> None:
        self.handler: Handler = lambda seen: Reply(404, {})
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        fake = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                seen = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
                with fake._lock:
                    fake._seen.append(seen)
                reply = fake.handler(seen)
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                headers = dict(reply.headers)
                headers.setdefault("Content-Length", str(len(reply.body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    body = reply.body if reply.send_only is None else reply.body[: reply.send_only]
                    self.wfile.write(body)
                if reply.send_only is not None:
                    self.close_connection = True

            do_GET = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def fake2() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.close()


def fast_client(**kw: object) -> RegistryClient:
    opts: dict[str, object] = {
        "deadline": 5.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "read_timeout": 2.0,
    }
    opts.update(kw)
    return RegistryClient(**opts)  # type: ignore[arg-type]


DATA = bytes(range(256)) * 40  # 10240 bytes
DIGEST = sha256_of(DATA)
BLOB_PATH = f"/v2/app/blobs/{DIGEST}"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def blob_reply(seen: Seen, data: bytes = DATA, honour_range: bool = True) -> Reply:
    headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": sha256_of(data)}
    m = _RANGE.match(seen.headers.get("range", ""))
    if not m or not honour_range:
        return Reply(200, headers, data)
    first = int(m.group(1))
    last = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
    if first >= len(data):
        return Reply(416, {"Content-Range": f"bytes */{len(data)}"})
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return Reply(206, headers, data[first : last + 1])


def blob_requests(srv: FakeServer) -> list[Seen]:
    return [s for s in srv.seen if "/blobs/" in s.path]


def test_bearer_token_flow(fake: FakeServer) -> None:
    realm = f"http://{fake.host}/token"
    tokens = iter(["tok-1", "tok-2", "tok-3"])
    valid = {"tok-1"}

    def handler(seen: Seen) -> Reply:
        if seen.path.startswith("/token"):
            return Reply(200, {}, json.dumps({"token": next(tokens), "expires_in": 300}).encode())
        auth = seen.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in valid:
            repo = seen.path.split("/")[2]
            challenge = (
                f'Bearer realm="{realm}",service="fake-registry",scope="repository:{repo}:pull"'
            )
            return Reply(
                401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
            )
        return blob_reply(seen)

    fake.handler = handler
    with fast_client() as c, structlog.testing.capture_logs() as logs:
        assert c.read_range(fake.host, "app", DIGEST, 0, 10) == DATA[:10]
        assert c.read_range(fake.host, "app", DIGEST, 100, 10) == DATA[100:110]
        assert c.blob_size(fake.host, "app", DIGEST) == len(DATA)
        token_reqs = [s for s in fake.seen if s.path.startswith("/token")]
        assert len(token_reqs) == 1  # cached for the next requests
        assert parse_qs(urlsplit(token_reqs[0].path).query) == {
            "service": ["fake-registry"],
            "scope": ["repository:app:pull"],
        }
        assert "authorization" not in token_reqs[0].headers  # anonymous: no credentials
        auths = [s.headers.get("authorization") for s in blob_requests(fake)]
        assert auths == [None, "Bearer tok-1", "Bearer tok-1", "Bearer tok-1"]

        # the registry revokes tok-1: one 401, a new token, success
        valid.clear()
        valid.add("tok-2")
        assert c.read_range(fake.host, "app", DIGEST, 0, 4) == DATA[:4]
        assert len([s for s in fake.seen if s.path.startswith("/token")]) == 2

        # another repository: its token is fetched up front (the challenge is known), no 401
        valid.add("tok-3")
        before = len(fake.seen)
        assert c.blob_size(fake.host, "other", DIGEST) == len(DATA)
        new = fake.seen[before:]
        assert [s.path.split("?")[0] for s in new] == ["/token", f"/v2/other/blobs/{DIGEST}"]
        assert parse_qs(urlsplit(new[0].path).query)["scope"] == ["repository:other:pull"]
    assert not any("tok-" in repr(event) for event in logs)


def test_bearer_token_refused(fake: FakeServer) -> None:
    realm = f"http://{fake.host}/token"

    def handler(seen: Seen) -> Reply:
        if seen.path.startswith("/token"):
            return Reply(200, {}, b'{"token": "useless"}')
        return Reply(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'})

    fake.handler = handler
    start = time.monotonic()
    with fast_client() as c, pytest.raises(AuthError, match="after authenticating"):
        c.blob_size(fake.host, "app", DIGEST)
    assert time.monotonic() - start < 10.0  # no retry storm (a bug would take minutes)
    assert len(blob_requests(fake)) == 2  # no retries of an auth failure

    fake.handler = lambda seen: Reply(401, {}) if seen.path.startswith("/token") else handler(seen)
    with fast_client() as c, pytest.raises(AuthError, match="token request"):
        c.blob_size(fake.host, "app", DIGEST)


def test_basic_challenge_uses_credentials(fake: FakeServer) -> None:
    expected = basic_header("bob", "pa55")

    def handler(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != expected:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="fake"'})
        return blob_reply(seen)

    fake.handler = handler
    with fast_client() as c, pytest.raises(AuthError, match="none are configured"):
        c.blob_size(fake.host, "app", DIGEST)
    creds = StaticCredentials({fake.host: ("bob", "pa55")})
    with fast_client(credentials=creds) as c:
        before = len(fake.seen)
        assert c.blob_size(fake.host, "app", DIGEST) == len(DATA)
        assert c.read_range(fake.host, "app", DIGEST, 1, 2) == DATA[1:3]
        statuses = [s.headers.get("authorization") for s in fake.seen[before:]]
        assert statuses == [None, expected, expected]


def test_redirect_does_not_leak_authorization(fake: FakeServer, fake2: FakeServer) -> None:
    """Blob GETs redirect to a second origin (like an object store); Authorization must stay
    with the registry, Range must follow, and the signed query string must not be logged."""
    expected = basic_header("bob", "pa55")

    def registry_handler(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != expected:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="fake"'})
        if seen.path.startswith("/v2/app/blobs/"):
            # same-origin hop first, then off to the "object store"
            return Reply(307, {"Location": f"/v2/app/real-blobs/{DIGEST}"})
        return Reply(302, {"Location": f"http://{fake2.host}/store/{DIGEST}?X-Signature=SECRETSIG"})

    fake.handler = registry_handler
    fake2.handler = blob_reply
    creds = StaticCredentials({fake.host: ("bob", "pa55")})
    with fast_client(credentials=creds) as c, structlog.testing.capture_logs() as logs:
        assert c.read_range(fake.host, "app", DIGEST, 1000, 24) == DATA[1000:1024]
        assert c.blob_size(fake.host, "app", DIGEST) == len(DATA)
        out = io.BytesIO()
        assert c.download_blob(fake.host, "app", DIGEST, out) == len(DATA)
        assert out.getvalue() == DATA
    assert fake2.seen, "redirect not followed"
    for s in fake2.seen:
        assert "authorization" not in s.headers
        assert s.path.endswith("X-Signature=SECRETSIG")
    assert fake2.seen[0].headers["range"] == "bytes=1000-1023"
    assert [s.method for s in fake2.seen] == ["GET", "HEAD", "GET"]
    same_origin_hops = [s for s in fake.seen if "/real-blobs/" in s.path]
    assert same_origin_hops and all(
        s.headers.get("authorization") == expected for s in same_origin_hops
    )
    assert "SECRETSIG" not in repr(logs)


def test_retry_503_twice_then_ok(fake: FakeServer) -> None:
    count = 0

    def handler(seen: Seen) -> Reply:
        nonlocal count
        count += 1
        return Reply(503, {}) if count <= 2 else blob_reply(seen)

    fake.handler = handler
    with fast_client() as c, structlog.testing.capture_logs() as logs:
        assert c.read_range(fake.host, "app", DIGEST, 5, 5) == DATA[5:10]
    assert count == 3
    assert [e["event"] for e in logs].count("registry.retry") == 2


def test_429_retry_after_is_honoured(fake: FakeServer) -> None:
    count = 0

    def handler(seen: Seen) -> Reply:
        nonlocal count
        count += 1
        return Reply(429, {"Retry-After": "1"}) if count == 1 else blob_reply(seen)

    fake.handler = handler
    start = time.monotonic()
    with fast_client() as c:
        assert c.blob_size(fake.host, "app", DIGEST) == len(DATA)
    assert 0.95 <= time.monotonic() - start < 10.0  # waited for Retry-After, no more
    assert count == 2


def test_retry_after_beyond_deadline_fails_fast(fake: FakeServer) -> None:
    fake.handler = lambda seen: Reply(503, {"Retry-After": "120"})
    start = time.monotonic()
    with fast_client(deadline=3.0) as c, pytest.raises(TransientRegistryError) as info:
        c.blob_size(fake.host, "app", DIGEST)
    assert time.monotonic() - start < 10.0  # no retry storm (a bug would take minutes)
    assert info.value.retry_after == 120
    assert len(fake.seen) == 1


def test_permanent_500_stops_within_deadline(fake: FakeServer) -> None:
    fake.handler = lambda seen: Reply(500, {}, b'{"errors":[{"code":"UNKNOWN","message":"boom"}]}')
    start = time.monotonic()
    with (
        fast_client(deadline=1.0, max_attempts=1000, backoff_max=0.2) as c,
        pytest.raises(TransientRegistryError, match="gave up after") as info,
    ):
        c.read_range(fake.host, "app", DIGEST, 0, 1)
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed < 10.0  # ran to the deadline, then stopped
    assert "UNKNOWN: boom" in str(info.value)
    assert len(fake.seen) > 3


def test_max_attempts(fake: FakeServer) -> None:
    fake.handler = lambda seen: Reply(502, {})
    with (
        fast_client(max_attempts=3) as c,
        pytest.raises(TransientRegistryError, match="3 attempts"),
    ):
        c.get_blob(fake.host, "app", DIGEST)
    assert len(fake.seen) == 3


@pytest.mark.parametrize(
    ("status", "exc"), [(404, NotFound), (403, Denied), (400, RegistryError), (501, RegistryError)]
)
def test_permanent_errors_not_retried(fake: FakeServer, status: int, exc: type[Exception]) -> None:
    fake.handler = lambda seen: Reply(status, {})
    with fast_client() as c, pytest.raises(exc) as info:
        c.read_range(fake.host, "app", DIGEST, 0, 1)
    assert not isinstance(info.value, TransientRegistryError)
    assert len(fake.seen) == 1


def test_ignored_range_is_sliced(fake: FakeServer) -> None:
    fake.handler = lambda seen: blob_reply(seen, honour_range=False)
    with fast_client() as c, structlog.testing.capture_logs() as logs:
        assert c.read_range(fake.host, "app", DIGEST, 0, 10) == DATA[:10]
        assert c.read_range(fake.host, "app", DIGEST, 5000, 3000) == DATA[5000:8000]
        assert c.read_range(fake.host, "app", DIGEST, len(DATA) - 7, 7) == DATA[-7:]
        with pytest.raises(FormatError, match="beyond the end"):
            c.read_range(fake.host, "app", DIGEST, len(DATA) - 7, 8)
    assert all(s.headers.get("range") for s in fake.seen)
    warnings = [e for e in logs if e["event"] == "registry.range_ignored"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"


def test_truncated_body_is_retried(fake: FakeServer) -> None:
    count = 0

    def handler(seen: Seen) -> Reply:
        nonlocal count
        count += 1
        reply = blob_reply(seen)
        if count == 1:
            reply.send_only = len(reply.body) // 2
        return reply

    fake.handler = handler
    with fast_client() as c:
        assert c.read_range(fake.host, "app", DIGEST, 100, 5000) == DATA[100:5100]
    assert count == 2

    def always_short(seen: Seen) -> Reply:
        reply = blob_reply(seen)
        reply.send_only = 10
        return reply

    fake.handler = always_short
    with fast_client(max_attempts=2) as c, pytest.raises(TransientRegistryError):
        c.read_range(fake.host, "app", DIGEST, 100, 5000)
    with fast_client(max_attempts=2) as c, pytest.raises(TransientRegistryError):
        c.get_blob(fake.host, "app", DIGEST)


def test_download_resumes_after_truncation(fake: FakeServer) -> None:
    count = 0

    def handler(seen: Seen) -> Reply:
        nonlocal count
        count += 1
        reply = blob_reply(seen)
        if count == 1:
            reply.send_only = 3000
        return reply

    fake.handler = handler
    out = io.BytesIO()
    with fast_client() as c:
        assert c.download_blob(fake.host, "app", DIGEST, out, chunk_size=1000) == len(DATA)
    assert out.getvalue() == DATA
    ranges = [s.headers.get("range") for s in fake.seen]
    assert ranges[0] is None
    assert ranges[1] == "bytes=3000-"

    # a registry that ignores Range on the resume: the part already written is skipped
    calls = 0

    def no_range(seen: Seen) -> Reply:
        nonlocal calls
        calls += 1
        return Reply(200, {}, DATA, send_only=4000 if calls == 1 else None)

    fake.handler = no_range
    out = io.BytesIO()
    with fast_client() as c:
        assert c.download_blob(fake.host, "app", DIGEST, out) == len(DATA)
    assert out.getvalue() == DATA


def test_digest_mismatches(fake: FakeServer) -> None:
    manifest = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    other = "sha256:" + "9" * 64

    def handler(seen: Seen) -> Reply:
        if "/manifests/" in seen.path:
            return Reply(
                200, {"Content-Type": oci.OCI_INDEX, "Docker-Content-Digest": other}, manifest
            )
        return Reply(200, {}, b"not the blob")

    fake.handler = handler
    with fast_client() as c:
        with pytest.raises(DigestMismatch):
            c.get_manifest(Reference.parse(f"{fake.host}/app@{other}"))
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            c.get_manifest(Reference.parse(f"{fake.host}/app:v1"))
        with pytest.raises(DigestMismatch):
            c.get_blob(fake.host, "app", DIGEST)
        with pytest.raises(DigestMismatch):
            c.download_blob(fake.host, "app", DIGEST, io.BytesIO())
    assert len(fake.seen) == 4  # a mismatch is not retried

    fake.handler = lambda seen: Reply(200, {"Content-Type": "application/json"}, manifest)
    with fast_client() as c:
        fm = c.get_manifest(Reference.parse(f"{fake.host}/app:v1"))
    assert fm.digest == sha256_of(manifest)
    assert fm.media_type == "application/json"  # no mediaType in the body to sniff
    assert isinstance(oci.parse_manifest(fm.data, fm.media_type), oci.Index)


def test_wrong_content_range(fake: FakeServer) -> None:
    def handler(seen: Seen) -> Reply:
        return Reply(206, {"Content-Range": f"bytes 0-9/{len(DATA)}"}, DATA[:10])

    fake.handler = handler
    with fast_client() as c, pytest.raises(RegistryError, match="instead"):
        c.read_range(fake.host, "app", DIGEST, 20, 10)
    assert len(fake.seen) == 1


def test_read_timeout_is_retried(fake: FakeServer) -> None:
    count = 0

    def handler(seen: Seen) -> Reply:
        nonlocal count
        count += 1
        reply = blob_reply(seen)
        if count == 1:
            reply.delay = 1.0
        return reply

    fake.handler = handler
    start = time.monotonic()
    with fast_client(read_timeout=0.2) as c:
        assert c.read_range(fake.host, "app", DIGEST, 0, 3) == DATA[:3]
    assert time.monotonic() - start < 10.0  # the slow reply was abandoned
    assert count == 2


def test_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with (
        fast_client(deadline=0.5, max_attempts=100) as c,
        pytest.raises(TransientRegistryError, match="ConnectionError"),
    ):
        c.blob_size(f"127.0.0.1:{port}", "app", DIGEST)
    assert time.monotonic() - start < 10.0  # stopped at the deadline


def test_closed_client_and_bad_arguments(fake: FakeServer) -> None:
    fake.handler = blob_reply
    c = fast_client()
    with pytest.raises(ValueError):
        c.read_range(fake.host, "app", DIGEST, -1, 5)
    with pytest.raises(FormatError):
        c.read_range(fake.host, "app", "sha256:nothex", 0, 5)
    c.close()
    c.close()
    with pytest.raises(RegistryError, match="closed"):
        c.blob_size(fake.host, "app", DIGEST)
    assert fake.seen == []


def test_scheme_selection() -> None:
    c = RegistryClient(plain_http_hosts=["reg.lan:5000", "plain.lan"], insecure_hosts=["self.lan"])
    assert c._base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert c._base_url("localhost:1234") == "http://localhost:1234"
    assert c._base_url("[::1]:5000") == "http://[::1]:5000"
    assert c._base_url("reg.lan:5000") == "http://reg.lan:5000"
    assert c._base_url("reg.lan:6000") == "https://reg.lan:6000"
    assert c._base_url("plain.lan:7000") == "http://plain.lan:7000"
    assert c._base_url("quay.io") == "https://quay.io"
    assert c._base_url("docker.io") == "https://registry-1.docker.io"
    assert c._verify("https://quay.io/v2/") is True
    assert c._verify("https://self.lan:8443/v2/") is False
    c.close()
