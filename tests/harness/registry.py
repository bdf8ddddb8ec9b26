"""A real local registry for tests: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.

    reg = LocalRegistry().start(tmp_path)          # or: with LocalRegistry().start(p) as reg:
    img = reg.push_image("app", "v1", [LayerBlob(gz_bytes)], config)
    m = reg.mark()
    ... code under test fetches from reg.host ...
    assert not [e for e in reg.requests_since(m) if e.status == 200 and "/blobs/" in e.path]

Access log. With `log.accesslog.disabled: false` distribution writes one Apache "combined"
line per request (gorilla/handlers) next to its logrus lines, e.g.

    127.0.0.1 - - [03/Dec/2026:14:32:26 +0000] "GET /v2/foo/blobs/sha256:b605..0e HTTP/1.1" 206 4 ""
        "curl/7.88.1"                                  (one line; wrapped here)

(status 206 and 4 body bytes for a 4-byte Range request). Only those lines are parsed; the
logrus lines (`time="..." level=info msg="response completed" ...`) are ignored, so each request
is counted once. A line is written after the response was sent, so requests_since() first
sends a uniquely-named marker request and waits until its line appears (see _sync()).
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# 127.0.0.1 - - [03/Dec/2026:14:32:03 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)
_SYNC_PREFIX = "/v2/_harness_sync/"


@dataclass(frozen=True)
class AccessEntry:
    method: str
    path: str  # request URI as logged, query string included
    status: int
    bytes: int  # response body bytes written (0 for HEAD)


@dataclass(frozen=True)
class LayerBlob:
    data: bytes
    media_type: str = OCI_LAYER_GZIP
    annotations: dict[str, str] | None = None


@dataclass(frozen=True)
class PushedImage:
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    manifest_bytes: bytes = field(repr=False, default=b"")
    ref: str = ""  # "127.0.0.1:PORT/repo:tag"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_id(layer: LayerBlob) -> str:
    """DiffID (digest of the uncompressed tar) of a gzip or plain tar test layer."""
    if layer.media_type.endswith("gzip"):
        return sha256_digest(gzip.decompress(layer.data))
    if layer.media_type.endswith("zstd"):
        import zstandard

        return sha256_digest(zstandard.ZstdDecompressor().decompressobj().decompress(layer.data))
    return sha256_digest(layer.data)


def image_config(
    layers: list[LayerBlob], os_: str = "linux", architecture: str = "amd64"
) -> dict[str, Any]:
    """A minimal valid image config for *layers*."""
    return {
        "architecture": architecture,
        "os": os_,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id(layer) for layer in layers]},
    }


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry (cost 4: keeps per-request checks ~1 ms)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # removed in Python 3.13; the caller skips the auth test without it

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("libcrypt has no bcrypt support")
    path.write_text(f"{username}:{hashed}\n")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death_signal_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM` (util-linux): the registry gets SIGTERM when the process
    that started it dies, so a killed pytest run cannot leave a registry behind. setpriv
    execs the registry (same pid). The signal is tied to the starting *thread*: start
    registries from a thread that outlives them (pytest fixtures run in the main thread)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class LocalRegistry:
    """docker-registry on 127.0.0.1 with filesystem storage under a work directory."""

    def __init__(self, binary: str = "docker-registry") -> None:
        self.binary = binary
        self.workdir: Path | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._auth: tuple[str, str] | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # never send loopback traffic through a proxy

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        if self.port is None:
            raise RuntimeError("registry not started")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(
        self,
        workdir: Path,
        port: int | None = None,
        htpasswd: Path | None = None,
        *,
        credentials: tuple[str, str] | None = None,
        timeout: float = 15.0,
    ) -> LocalRegistry:
        """Start the registry and wait until /v2/ answers. *credentials* are what the push
        helpers use when *htpasswd* is set."""
        if self._proc is not None:
            raise RuntimeError("registry already started")
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(
                f"{self.binary!r} not found on PATH: install the Debian package docker-registry"
            )
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / "registry.log"
        self._auth = credentials
        # A free port picked here could be taken before the registry binds it; retry then.
        for _ in range(1 if port is not None else 3):
            self.port = port if port is not None else _free_port()
            self._spawn(binary, workdir, htpasswd)
            if self._wait_ready(timeout):
                atexit.register(self.stop)
                return self
            tail = self._log_tail()
            self.stop()
            if "address already in use" not in tail:
                break
        raise RuntimeError(f"docker-registry did not become ready; log tail:\n{tail}")

    def _spawn(self, binary: str, workdir: Path, htpasswd: Path | None) -> None:
        storage = workdir / "data"
        storage.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "  fields:",
            "    service: registry",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(storage))}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            # A fixed secret silences the startup warning; uploads never cross instances.
            "  secret: layerstore-test-harness",
        ]
        if htpasswd is not None:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: layerstore-test",
                f"    path: {json.dumps(str(Path(htpasswd).resolve()))}",
            ]
        config = workdir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        assert self.log_path is not None
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [*_death_signal_prefix(), binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=workdir,
            )

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                return False
            try:
                r = self._session.get(f"{self.url}/v2/", timeout=1.0)
                if r.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self, n: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the registry (SIGTERM, then SIGKILL after *timeout*). Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        self._session.close()

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- access log ----------------------------------------------------------------------------

    def mark(self) -> int:
        """Current end of the log; pass it to requests_since()."""
        self._sync()
        assert self.log_path is not None
        return self.log_path.stat().st_size

    def requests_since(self, mark: int) -> list[AccessEntry]:
        """Requests the registry answered after mark() returned, oldest first."""
        self._sync()
        assert self.log_path is not None
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        entries = []
        # A line without its newline is still being written: leave it for the next call.
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            entry = parse_access_line(line)
            if entry is not None and not entry.path.startswith(_SYNC_PREFIX):
                entries.append(entry)
        return entries

    def _sync(self, timeout: float = 5.0) -> None:
        """Make the log current: request a unique URL and wait for its access-log line.

        The registry writes a line only after it sent the response, so a test that just got
        its answer may look before the line exists. The marker request is issued after every
        request the test made has completed, so once its line is there theirs are too (up to
        goroutine scheduling, which a 2 ms grace covers in practice).
        """
        if not self.running:
            return
        assert self.log_path is not None
        token = f"{_SYNC_PREFIX}{uuid.uuid4().hex}"
        start = self.log_path.stat().st_size  # the marker's line can only come after this
        with contextlib.suppress(requests.RequestException):
            self._session.get(self.url + token, timeout=2.0)
        end = time.monotonic() + timeout
        needle = f" {token} ".encode()
        while time.monotonic() < end:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                if needle in f.read():
                    time.sleep(0.002)
                    return
            time.sleep(0.005)
        raise RuntimeError("registry access log did not show the marker request")

    def blob_gets(self, since: int, digest: str, status: int | None = None) -> list[AccessEntry]:
        """GETs of blob *digest* since the mark, optionally only those answered *status*."""
        return [
            e
            for e in self.requests_since(since)
            if e.method == "GET"
            and e.path.split("?", 1)[0].endswith(f"/blobs/{digest}")
            and (status is None or e.status == status)
        ]

    # --- push helpers (monolithic uploads over the HTTP API) -----------------------------------

    def _req(self, method: str, url: str, **kw: Any) -> requests.Response:
        if not url.startswith("http"):
            url = self.url + url
        if self._auth is not None:
            kw.setdefault("auth", self._auth)
        kw.setdefault("timeout", 30.0)
        return self._session.request(method, url, **kw)

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256_digest(data)
        head = self._req("HEAD", f"/v2/{repo}/blobs/{digest}")
        if head.status_code == 200:
            return digest
        post = self._req("POST", f"/v2/{repo}/blobs/uploads/")
        if post.status_code != 202:
            raise RuntimeError(f"upload start for {repo}: HTTP {post.status_code} {post.text}")
        location = requests.compat.urljoin(self.url, post.headers["Location"])
        sep = "&" if "?" in location else "?"
        put = self._req(
            "PUT",
            f"{location}{sep}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if put.status_code != 201:
            raise RuntimeError(f"upload of {digest} to {repo}: HTTP {put.status_code} {put.text}")
        return digest

    def push_manifest(
        self,
        repo: str,
        tag: str,
        manifest: dict[str, Any] | bytes,
        media_type: str = OCI_MANIFEST,
    ) -> str:
        """PUT a manifest (dict serialised compactly, or exact bytes) under *tag* (or digest)."""
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        digest = sha256_digest(data)
        r = self._req(
            "PUT",
            f"/v2/{repo}/manifests/{tag}",
            data=data,
            headers={"Content-Type": media_type},
        )
        if r.status_code != 201:
            raise RuntimeError(f"manifest push {repo}:{tag}: HTTP {r.status_code} {r.text}")
        served = r.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RuntimeError(f"registry computed {served} for manifest {digest}")
        return digest

    def push_image(
        self,
        repo: str,
        tag: str,
        layers: list[LayerBlob],
        config: dict[str, Any] | None = None,
    ) -> PushedImage:
        """Push layers, config (default: image_config(layers)) and an OCI manifest."""
        if config is None:
            config = image_config(layers)
        config_bytes = json.dumps(config).encode()
        config_digest = self.push_blob(repo, config_bytes)
        descs = []
        for layer in layers:
            desc: dict[str, Any] = {
                "mediaType": layer.media_type,
                "digest": self.push_blob(repo, layer.data),
                "size": len(layer.data),
            }
            if layer.annotations:
                desc["annotations"] = dict(layer.annotations)
            descs.append(desc)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": descs,
        }
        data = json.dumps(manifest).encode()
        digest = self.push_manifest(repo, tag, data, OCI_MANIFEST)
        return PushedImage(digest, manifest, config_digest, data, f"{self.host}/{repo}:{tag}")

    def push_index(
        self,
        repo: str,
        tag: str,
        manifests: list[tuple[str, int, dict[str, str]]],
        media_type: str = OCI_MANIFEST,
    ) -> str:
        """Push an OCI index of (manifest digest, size, platform dict) entries; returns its digest.

        *media_type* is that of the entries (the manifests must already be in *repo*)."""
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": media_type, "digest": d, "size": size, "platform": dict(platform)}
                for d, size, platform in manifests
            ],
        }
        return self.push_manifest(repo, tag, index, OCI_INDEX)


def parse_access_line(line: str) -> AccessEntry | None:
    """An AccessEntry for a combined-log line, None for any other line (logrus, startup)."""
    m = _ACCESS_LINE.match(line)
    if m is None:
        return None
    size = m.group("bytes")
    return AccessEntry(
        method=m.group("method"),
        path=m.group("path"),
        status=int(m.group("status")),
        bytes=0 if size == "-" else int(size),
    )


__all__ = [
    "AccessEntry",
    "LayerBlob",
    "LocalRegistry",
    "PushedImage",
    "diff_id",
    "image_config",
    "parse_access_line",
    "sha256_digest",
    "write_htpasswd",
]
