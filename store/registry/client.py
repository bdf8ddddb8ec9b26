"""Blocking, thread-safe client for the OCI distribution API (pull side only).

This module is the single place where requests/urllib3 exceptions and HTTP statuses become
store.errors exceptions; callers see only RegistryError subclasses, FormatError (content not
what it claims to be: digest mismatch, range beyond the end of a blob) or ValueError (bad
arguments).

Retry policy: only TransientRegistryError (5xx, 429, 408, dropped connection, timeout,
truncated body) is retried, with exponential backoff and jitter, honouring Retry-After, up to
`max_attempts` attempts and a total `deadline` per call. Each socket operation is also bounded
by the connect/read timeouts (clamped to what is left of the deadline), because the callers are
worker threads that cannot be cancelled: nothing here may block indefinitely.

Redirects are followed by hand (not by requests) so that the Authorization header is only
ever sent to the registry's own origin; blob redirects to object stores or CDNs carry their
own signature in the URL, which is why URLs are logged without their query string.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import structlog
import tenacity
import urllib3
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth

from store import oci
from store.digest import Digest, Verifier, is_digest, sha256_of
from store.errors import (
    AuthError,
    Denied,
    FormatError,
    LayerstoreError,
    NotFound,
    RangeUnsupported,
    RegistryError,
    TransientRegistryError,
)
from store.reference import Reference
from store.registry.auth import (
    Challenge,
    Credentials,
    NoCredentials,
    TokenCache,
    basic_header,
    bearer_header,
    parse_token_response,
    parse_www_authenticate,
    pull_scope,
    token_request_params,
)
from store.registry.credentials import IDENTITY_TOKEN_USER
from store.registry.registries_conf import Endpoint, RegistriesConf

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: distribution refuses manifests above 4 MiB; anything bigger is not a manifest.
MAX_MANIFEST_SIZE = 4 << 20
MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Reference normalises Docker Hub to "docker.io", which is not where its API lives.
_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_READ_CHUNK = 64 << 10
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_QUERY = re.compile(r"\?[^\s'\")]*")
# requests wraps most urllib3 errors, but not those raised while a streamed body is read.
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.IncompleteRead,
)


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    data: bytes = field(repr=False)
    media_type: str
    digest: str


def _hostname(netloc: str) -> str:
    """'host:port' or '[v6]:port' -> lowercased host without brackets or port."""
    return (urlsplit("//" + netloc).hostname or netloc).lower()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _redact(text: str) -> str:
    """Drop query strings: pre-signed redirect URLs carry credentials there."""
    return _QUERY.sub("?<redacted>", text)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(resp: requests.Response) -> str:
    """First code/message of a distribution error body, if there is one (read at most 4 KiB)."""
    try:
        raw = resp.raw.read(4096, decode_content=True) if resp.raw is not None else b""
        first = json.loads(raw)["errors"][0]
        return f" ({first.get('code')}: {str(first.get('message'))[:200]})"
    except Exception:  # the detail is best effort; the status code says enough
        return ""


def _read_body(resp: requests.Response, limit: int, what: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RegistryError(f"{what}: {declared} bytes exceeds the limit of {limit}")
    out = bytearray()
    for chunk in resp.iter_content(_READ_CHUNK):
        out += chunk
        if len(out) > limit:
            raise RegistryError(f"{what}: body exceeds the limit of {limit} bytes")
    if declared is not None and declared.isdigit() and len(out) != int(declared):
        raise TransientRegistryError(f"{what}: truncated body ({len(out)} of {declared} bytes)")
    return bytes(out)


def _read_exact(resp: requests.Response, n: int, what: str) -> bytes:
    """The first *n* bytes of the body, read in one call into one buffer.

    A range answer is a few MiB of raw bytes: reading it in 64 KiB pieces through the
    decoding layer and joining them copied it three times and halved range throughput.
    Content codings are refused instead of decoded (we ask for identity).
    """
    coding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise RegistryError(f"{what}: unexpected Content-Encoding {coding!r} on a range")
    data = resp.raw.read(n, decode_content=False)
    if len(data) != n:
        raise TransientRegistryError(f"{what}: truncated body ({len(data)} of {n} bytes)")
    return data


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


class RegistryClient:
    """Pull-side registry client. One instance is shared by all worker threads.

    Scheme: plain HTTP for 127.0.0.1, localhost and [::1] (any port) and for hosts in
    *plain_http_hosts*; HTTPS otherwise, without certificate verification for hosts in
    *insecure_hosts*. Host lists match either "host:port" exactly or the bare host.

    *pool_size* is the number of keep-alive connections kept per host; size it to the number
    of threads that call the client concurrently (extra connections work but are not reused).
    If a *session* is passed in, it is used as is and not closed by close().
    *backoff_initial*/*backoff_max* bound the sleeps between attempts (seconds).
    """

    def __init__(
        self,
        *,
        insecure_hosts: Iterable[str] = (),
        plain_http_hosts: Iterable[str] = (),
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 5,
        deadline: float = 60.0,
        credentials: Credentials | None = None,
        session: requests.Session | None = None,
        pool_size: int = 16,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        registries: RegistriesConf | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if deadline <= 0 or connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("deadline and timeouts must be positive")
        self._insecure = frozenset(h.lower() for h in insecure_hosts)
        self._plain_http = frozenset(h.lower() for h in plain_http_hosts)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._deadline = deadline
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._credentials: Credentials = credentials or NoCredentials()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            # No proxies, netrc or CA bundles from the environment: behaviour must not depend
            # on the shell the service was started from, and loopback must stay loopback.
            session.trust_env = False
            adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._session = session
        self._tokens = TokenCache()
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._auth_locks: dict[tuple[str, str], threading.Lock] = {}
        self._range_ignored: set[tuple[str, str, str]] = set()
        # registries.conf: mirrors, rewrites, insecure and blocked prefixes (None: none)
        self._registries = registries
        # (registry, repository, digest) -> the endpoint that served it last (mirror stickiness)
        self._preferred: dict[tuple[str, str, str], Endpoint] = {}
        # insecure hosts whose TLS handshake failed: spoken to in plain HTTP, as Podman does
        self._http_fallback: set[str] = set()
        self._closed = False

    # --- public API ----------------------------------------------------------------------------

    def get_manifest(self, ref: Reference) -> FetchedManifest:
        """Fetch the manifest or index *ref* names, verified against ref.digest if set.

        Without a digest in *ref*, a Docker-Content-Digest header is checked when present, and
        the returned digest is always the sha256 of the bytes received.
        """
        what = f"manifest {ref}"
        headers = {
            "Accept": ", ".join(oci.ACCEPTED_MANIFEST_TYPES),
            "Accept-Encoding": "identity",
        }

        def from_endpoint(
            ep: Endpoint, deadline_at: float, attempts: int
        ) -> tuple[bytes, str, str]:
            path = f"/v2/{ep.repository}/manifests/{ref.manifest_ref}"

            def attempt(deadline_at: float) -> tuple[bytes, str, str | None]:
                resp = self._open("GET", ep.host, ep.repository, path, headers, deadline_at, what)
                with resp:
                    data = _read_body(resp, MAX_MANIFEST_SIZE, what)
                    return (
                        data,
                        resp.headers.get("Content-Type", ""),
                        resp.headers.get("Docker-Content-Digest"),
                    )

            data, content_type, header_digest = self._retrying(
                what, attempt, deadline_at=deadline_at, max_attempts=attempts
            )
            # verified per endpoint, so that a mirror serving something else falls through
            if ref.digest:
                Digest.parse(ref.digest).verify(data, what)
                return data, content_type, ref.digest
            if header_digest and is_digest(header_digest.strip()):
                Digest.parse(header_digest.strip()).verify(data, f"{what} (Docker-Content-Digest)")
            return data, content_type, sha256_of(data)

        data, content_type, digest = self._across(
            ref.registry, ref.repository, ref.digest is not None, None, from_endpoint
        )
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in oci.MANIFEST_MEDIA_TYPES and media_type not in oci.INDEX_MEDIA_TYPES:
            media_type = oci.sniff_media_type(data) or media_type
        return FetchedManifest(data=data, media_type=media_type, digest=digest)

    def get_blob(
        self, registry: str, repository: str, digest: str, *, max_size: int = 64 << 20
    ) -> bytes:
        """A whole small blob (an image config), verified against *digest*."""
        expected = Digest.parse(digest)
        what = f"blob {repository}@{digest}"
        headers = {"Accept-Encoding": "identity"}

        def attempt(ep: Endpoint, path: str, deadline_at: float) -> bytes:
            resp = self._open("GET", ep.host, ep.repository, path, headers, deadline_at, what)
            with resp:
                data = _read_body(resp, max_size, what)
            expected.verify(data, what)  # a bad copy at a mirror: the next endpoint is tried
            return data

        return self._on_blob(registry, repository, digest, what, attempt)

    def read_range(
        self, registry: str, repository: str, digest: str, offset: int, length: int
    ) -> bytes:
        """Exactly *length* bytes of a blob from *offset*, or an exception.

        Raises FormatError if the range extends past the end of the blob (the blob is not
        what the caller's metadata says) and RangeUnsupported if the registry refuses a range
        that lies inside the blob. A registry that ignores Range and answers 200 with the whole
        blob is tolerated: the wanted part is cut out of the stream (logged once per blob).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        Digest.parse(digest)
        end = offset + length - 1
        what = f"blob {repository}@{digest} bytes {offset}-{end}"
        headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}

        def attempt(ep: Endpoint, path: str, deadline_at: float) -> bytes:
            resp = self._open(
                "GET", ep.host, ep.repository, path, headers, deadline_at, what,
                passthrough={416},
            )
            with resp:
                if resp.status_code == 416:
                    raise self._unsatisfiable(resp, offset, what)
                if resp.status_code == 206:
                    return self._read_partial(resp, offset, length, what)
                if resp.status_code == 200:
                    self._note_range_ignored(ep.host, ep.repository, digest)
                    return self._slice_full_body(resp, offset, length, what)
                raise RegistryError(f"{what}: unexpected HTTP {resp.status_code}")

        return self._on_blob(registry, repository, digest, what, attempt)

    def read_ranges(
        self,
        registry: str,
        repository: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
    ) -> list[bytes]:
        """read_range for each (offset, length), in order.

        For now one request per range (sequential on the calling thread): callers already
        merge adjacent chunks, and multipart/byteranges parsing can come later behind this
        same signature.
        """
        return [self.read_range(registry, repository, digest, off, ln) for off, ln in ranges]

    def blob_size(self, registry: str, repository: str, digest: str) -> int:
        """Size of a blob in bytes, from a HEAD request."""
        Digest.parse(digest)
        what = f"blob {repository}@{digest} (HEAD)"
        # the size of the blob itself, not of some compressed representation of it
        headers = {"Accept-Encoding": "identity"}

        def attempt(ep: Endpoint, path: str, deadline_at: float) -> int:
            resp = self._open("HEAD", ep.host, ep.repository, path, headers, deadline_at, what)
            with resp:
                size = _content_length(resp)
            if size is None:
                raise RegistryError(f"{what}: no Content-Length in the answer")
            return size

        return self._on_blob(registry, repository, digest, what, attempt)

    def download_blob(
        self,
        registry: str,
        repository: str,
        digest: str,
        dest: BinaryIO,
        *,
        expected_size: int | None = None,
        chunk_size: int = 1 << 20,
    ) -> int:
        """Stream a whole blob into *dest* (appending), verify it and return its size.

        A transfer that breaks off is resumed with `Range: bytes=<received>-` (or by skipping
        the part already written if the registry ignores Range), so *dest* only ever receives
        each byte once. On DigestMismatch/FormatError the caller discards *dest*.
        """
        what = f"blob {repository}@{digest} (download)"
        verifier = Verifier(digest, what)
        # The verifier spans endpoints: a transfer broken off at a mirror resumes elsewhere,
        # and the digest check at the end covers every byte whatever served it.

        def attempt(ep: Endpoint, path: str, deadline_at: float) -> int:
            have = verifier.size
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            resp = self._open(
                "GET", ep.host, ep.repository, path, headers, deadline_at, what, passthrough={416}
            )
            with resp:
                skip = 0
                if resp.status_code == 416:
                    m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
                    if have and m and int(m.group(1)) == have:
                        return have  # everything had arrived before the connection broke
                    raise RangeUnsupported(f"{what}: resuming at byte {have} refused (416)")
                if resp.status_code == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise RegistryError(f"{what}: resume answered with a different range")
                else:
                    skip = have
                    total = _content_length(resp)
                    if expected_size is not None and total is not None and total != expected_size:
                        raise FormatError(f"{what}: {total} bytes, expected {expected_size}")
                for chunk in resp.iter_content(chunk_size):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    if expected_size is not None and verifier.size + len(chunk) > expected_size:
                        raise FormatError(f"{what}: more than the expected {expected_size} bytes")
                    dest.write(chunk)
                    verifier.update(chunk)
                if skip:
                    raise TransientRegistryError(f"{what}: body ended before the resume point")
                return verifier.size

        size = self._on_blob(registry, repository, digest, what, attempt)
        if expected_size is not None and size != expected_size:
            raise FormatError(f"{what}: {size} bytes, expected {expected_size}")
        verifier.check()
        return size

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"RegistryClient({state}, credentials={self._credentials!r})"

    # --- push-side helpers (issue 3, used by store.registry.push) -------------------------------
    # Generic building blocks so the push side shares scheme/TLS/auth/retry handling with the
    # pull side; they add no behaviour of their own to the methods above.

    def call_with_retries(self, what: str, attempt: Callable[[float], T]) -> T:
        """Run attempt(deadline_at) under this client's retry policy and error translation."""
        return self._retrying(what, attempt)

    def request(
        self,
        method: str,
        registry: str,
        repository: str,
        target: str,
        deadline_at: float,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        body: Callable[[], object] | bytes | None = None,
        scope: str | None = None,
        passthrough: Iterable[int] = (),
    ) -> requests.Response:
        """One authenticated request without redirects (call it inside call_with_retries).

        *target* is a path on the registry or an absolute URL (an upload Location); auth is
        only sent to the registry's own origin. *body* is bytes or a callable returning a fresh
        body (it may be sent twice when a 401 challenge is answered). A 2xx or *passthrough*
        response is returned streamed (the caller closes it); anything else raises.
        """
        base = self._base_url(registry)
        url = target if target.startswith(("http://", "https://")) else base + target
        own_origin = _origin(url) == _origin(base)
        scope = scope or pull_scope(repository)
        send_headers = dict(headers or {})

        def send(auth: str | None) -> requests.Response:
            hdrs = dict(send_headers)
            if auth is not None and own_origin:
                hdrs["Authorization"] = auth
            data = body() if callable(body) else body
            return self._session.request(
                method,
                url,
                headers=hdrs,
                data=data,
                stream=True,
                allow_redirects=False,
                timeout=self._timeout(deadline_at),
                verify=self._verify(url),
            )

        auth = self._cached_auth(registry, scope, deadline_at)
        resp = send(auth)
        if resp.status_code == 401 and own_origin:
            challenge, auth = self._answer_challenge(resp, registry, scope, auth, deadline_at, what)
            resp = send(auth)
            if resp.status_code == 401:
                resp.close()
                raise AuthError(f"{what}: HTTP 401 after authenticating ({challenge.scheme})")
        if resp.status_code in set(passthrough):
            return resp
        self._raise_for_status(resp, what, not own_origin)
        return resp

    # --- registries.conf: where to pull from ------------------------------------------------

    def endpoints(self, registry: str, repository: str, *, digested: bool = True) -> list[Endpoint]:
        """The ordered places to fetch `registry/repository` from: mirrors, then the origin
        (rewritten by `location`). Raises Denied for a blocked prefix."""
        if self._registries is None:
            return [Endpoint(registry, repository)]
        if self._registries.blocked(registry, repository):
            raise Denied(f"{registry}/{repository} is blocked in registries.conf")
        return self._registries.endpoints(registry, repository, digested=digested)

    def _on_blob(
        self,
        registry: str,
        repository: str,
        digest: str,
        what: str,
        attempt: Callable[[Endpoint, str, float], T],
    ) -> T:
        """attempt(endpoint, blob path, deadline) at each endpoint in turn (mirrors, then the
        registry), each with its own retries, until one succeeds."""

        def from_endpoint(ep: Endpoint, deadline_at: float, attempts: int) -> T:
            path = f"/v2/{ep.repository}/blobs/{digest}"
            return self._retrying(
                what,
                lambda deadline: attempt(ep, path, deadline),
                deadline_at=deadline_at,
                max_attempts=attempts,
            )

        return self._across(registry, repository, True, digest, from_endpoint)

    def _across(
        self,
        registry: str,
        repository: str,
        digested: bool,
        digest: str | None,
        run: Callable[[Endpoint, float, int], T],
    ) -> T:
        """run(endpoint, deadline_at, max_attempts) on each endpoint in turn until one works.

        One deadline covers all endpoints; a mirror gets at most half of what is left and two
        attempts, so that a dead mirror still leaves the origin time to answer. Whatever
        fails on a mirror (missing blob, 5xx, wrong content) falls through to the next one.
        The endpoint that served a blob is tried first for its later ranges.
        """
        eps = self.endpoints(registry, repository, digested=digested)
        deadline_at = time.monotonic() + self._deadline
        if len(eps) == 1:
            return run(eps[0], deadline_at, self._max_attempts)
        key = (registry, repository, digest) if digest else None
        with self._lock:
            preferred = self._preferred.get(key) if key else None
        if preferred in eps:
            eps = [preferred, *(e for e in eps if e != preferred)]
        last_exc: LayerstoreError | None = None
        for i, ep in enumerate(eps):
            final = i == len(eps) - 1
            remaining = deadline_at - time.monotonic()
            if remaining <= 0 and last_exc is not None:
                break
            try:
                result = run(
                    ep,
                    deadline_at if final else time.monotonic() + remaining / 2,
                    self._max_attempts if final else min(2, self._max_attempts),
                )
            except LayerstoreError as exc:
                if final:
                    raise
                log.info("registry.endpoint_failed", endpoint=ep.name, cause=_redact(str(exc)))
                last_exc = exc
                continue
            if key is not None:
                with self._lock:
                    if len(self._preferred) > 4096:
                        self._preferred.clear()
                    self._preferred[key] = ep
            return result
        assert last_exc is not None
        raise last_exc

    # --- retry policy --------------------------------------------------------------------------

    def _retrying(
        self,
        what: str,
        attempt: Callable[[float], T],
        *,
        deadline_at: float | None = None,
        max_attempts: int | None = None,
    ) -> T:
        """Run attempt(deadline_at), translating exceptions, retrying transient failures."""
        if self._closed:
            raise RegistryError("RegistryClient is closed")
        started = time.monotonic()
        if deadline_at is None:
            deadline_at = started + self._deadline
        attempts_allowed = max_attempts or self._max_attempts

        def translated(deadline_at: float) -> T:
            try:
                return attempt(deadline_at)
            except LayerstoreError:
                raise
            except requests.exceptions.SSLError as exc:
                # a subclass of ConnectionError, but a bad certificate does not heal by waiting
                raise RegistryError(f"{what}: TLS error: {_redact(str(exc))}") from exc
            except _TRANSIENT_EXCEPTIONS as exc:
                raise TransientRegistryError(
                    f"{what}: {type(exc).__name__}: {_redact(str(exc))}"
                ) from exc
            except requests.RequestException as exc:
                raise RegistryError(f"{what}: {type(exc).__name__}: {_redact(str(exc))}") from exc

        def retry_after(rs: tenacity.RetryCallState) -> float | None:
            exc = rs.outcome.exception() if rs.outcome else None
            return exc.retry_after if isinstance(exc, TransientRegistryError) else None

        def stop(rs: tenacity.RetryCallState) -> bool:
            if rs.attempt_number >= attempts_allowed:
                return True
            remaining = deadline_at - time.monotonic()
            ra = retry_after(rs)
            # Waiting out a Retry-After that ends past the deadline only delays the failure.
            return remaining <= 0 or (ra is not None and ra >= remaining)

        def wait(rs: tenacity.RetryCallState) -> float:
            cap = min(self._backoff_max, self._backoff_initial * 2 ** (rs.attempt_number - 1))
            delay = cap / 2 + random.uniform(0, cap / 2)  # "equal jitter"
            delay = max(delay, retry_after(rs) or 0.0)
            return max(0.0, min(delay, deadline_at - time.monotonic()))

        def before_sleep(rs: tenacity.RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome else None
            log.warning(
                "registry.retry",
                what=what,
                attempt=rs.attempt_number,
                sleep=round(getattr(rs.next_action, "sleep", 0.0), 3),
                error=str(exc),
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientRegistryError),
            stop=stop,
            wait=wait,
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            return retrying(translated, deadline_at)
        except tenacity.RetryError as err:
            last = err.last_attempt
            exc = last.exception()
            assert isinstance(exc, TransientRegistryError)
            elapsed = time.monotonic() - started
            raise TransientRegistryError(
                f"{exc} (gave up after {last.attempt_number} attempts in {elapsed:.1f}s)",
                retry_after=exc.retry_after,
            ) from exc

    def _timeout(self, deadline_at: float) -> tuple[float, float]:
        remaining = max(0.05, deadline_at - time.monotonic())
        return min(self._connect_timeout, remaining), min(self._read_timeout, remaining)

    # --- one attempt: scheme, auth, redirects, status ------------------------------------------

    def _base_url(self, registry: str) -> str:
        host = _hostname(registry)
        plain = (
            host in _LOOPBACK_HOSTS
            or registry.lower() in self._plain_http
            or host in self._plain_http
            or registry.lower() in self._http_fallback
        )
        return f"{'http' if plain else 'https'}://{_API_HOSTS.get(registry, registry)}"

    def _verify(self, url: str) -> bool:
        netloc = urlsplit(url).netloc.lower()
        return not self._is_insecure(netloc)

    def _is_insecure(self, netloc: str) -> bool:
        if netloc in self._insecure or _hostname(netloc) in self._insecure:
            return True
        return self._registries is not None and self._registries.insecure_host(netloc)

    def _open(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        headers: dict[str, str],
        deadline_at: float,
        what: str,
        *,
        passthrough: Iterable[int] = (),
    ) -> requests.Response:
        """Send one request with auth, following redirects; return a 2xx (or passthrough)
        streamed response, raise for anything else. The caller closes the response."""
        url = self._base_url(registry) + path
        scope = pull_scope(repository)
        auth = self._cached_auth(registry, scope, deadline_at)
        try:
            resp, foreign = self._send(method, url, headers, auth, deadline_at)
        except requests.exceptions.SSLError:
            # registries.conf `insecure`: like Podman, fall back to plain HTTP when TLS fails
            if not url.startswith("https://") or not self._is_insecure(registry.lower()):
                raise
            with self._lock:
                self._http_fallback.add(registry.lower())
            log.warning("registry.insecure_http_fallback", registry=registry)
            url = self._base_url(registry) + path
            resp, foreign = self._send(method, url, headers, auth, deadline_at)
        if resp.status_code == 401 and not foreign:
            challenge, auth = self._answer_challenge(resp, registry, scope, auth, deadline_at, what)
            resp, foreign = self._send(method, url, headers, auth, deadline_at)
            if resp.status_code == 401 and not foreign:
                resp.close()
                raise AuthError(f"{what}: HTTP 401 after authenticating ({challenge.scheme})")
        if resp.status_code in passthrough:
            return resp
        self._raise_for_status(resp, what, foreign)
        return resp

    def _answer_challenge(
        self,
        resp: requests.Response,
        registry: str,
        scope: str,
        refused: str | None,
        deadline_at: float,
        what: str,
    ) -> tuple[Challenge, str]:
        """Read the challenge of a 401 (closing it), remember it for the registry, and get the
        credentials it asks for; the caller sends the request again with them."""
        header = resp.headers.get("WWW-Authenticate", "")
        resp.close()
        if not header:
            raise AuthError(f"{what}: HTTP 401 without a WWW-Authenticate challenge")
        challenge = parse_www_authenticate(header)
        with self._lock:
            self._challenges[registry] = challenge
        return challenge, self._authenticate(
            registry, scope, challenge, deadline_at, refused=refused
        )

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        deadline_at: float,
    ) -> tuple[requests.Response, bool]:
        """(response, came_from_another_origin) after following up to MAX_REDIRECTS."""
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers)
            if auth is not None and _origin(url) == origin:
                send_headers["Authorization"] = auth
            resp = self._session.request(
                method,
                url,
                headers=send_headers,
                stream=True,
                allow_redirects=False,
                timeout=self._timeout(deadline_at),
                verify=self._verify(url),
            )
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECT_CODES or not location:
                return resp, _origin(url) != origin
            resp.close()
            url = urljoin(url, location)
            if resp.status_code == 303 and method != "HEAD":
                method = "GET"
            log.debug("registry.redirect", to=_redact(url), status=resp.status_code)
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects for {_redact(url)}")

    def _raise_for_status(self, resp: requests.Response, what: str, foreign: bool) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        detail = _error_detail(resp)
        resp.close()
        msg = f"{what}: HTTP {code}{detail}"
        if foreign and code in (401, 403):
            # A redirect target (object store, CDN) refusing a pre-signed URL usually means
            # the URL expired; asking the registry again yields a fresh one.
            raise TransientRegistryError(msg + " from the redirect target")
        if code == 404:
            raise NotFound(msg)
        if code == 401:
            raise AuthError(msg)
        if code == 403:
            raise Denied(msg)
        if code in (408, 429) or (code >= 500 and code not in (501, 505)):
            raise TransientRegistryError(msg, retry_after=_retry_after(resp))
        if code == 416:
            raise RangeUnsupported(msg)
        raise RegistryError(msg)

    # --- auth ----------------------------------------------------------------------------------

    def _creds(self, registry: str, scope: str) -> tuple[str, str] | None:
        """Credentials for *registry*, per repository when the source knows about those."""
        by_repo = getattr(self._credentials, "lookup_repository", None)
        if by_repo is not None:
            parts = scope.split(":")
            return by_repo(registry, parts[1] if len(parts) == 3 else None)
        return self._credentials.lookup(registry)

    def _auth_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._auth_locks.setdefault(key, threading.Lock())

    def _cached_auth(self, registry: str, scope: str, deadline_at: float) -> str | None:
        """Authorization to send up front: a cached token, or credentials for a registry
        known to want them, so that only the first request per repository sees a 401."""
        tok = self._tokens.get(registry, scope)
        if tok is not None:
            return bearer_header(tok.value)
        with self._lock:
            challenge = self._challenges.get(registry)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds(registry, scope)
            return basic_header(*creds) if creds else None
        if challenge.scheme == "bearer":
            return self._authenticate(registry, scope, challenge, deadline_at)
        return None

    def _authenticate(
        self,
        registry: str,
        scope: str,
        challenge: Challenge,
        deadline_at: float,
        refused: str | None = None,
    ) -> str:
        """The Authorization value answering *challenge* (not *refused*, which just failed)."""
        if challenge.scheme == "basic":
            creds = self._creds(registry, scope)
            if creds is None:
                raise AuthError(f"{registry} asks for Basic credentials and none are configured")
            header = basic_header(*creds)
            if header == refused:
                raise AuthError(f"{registry} refused the configured credentials")
            return header
        if challenge.scheme != "bearer":
            raise AuthError(f"{registry}: unsupported auth scheme {challenge.scheme!r}")
        # One token request per (registry, scope) at a time; the others wait and reuse it.
        with self._auth_lock((registry, scope)):
            tok = self._tokens.get(registry, scope)
            if tok is not None and bearer_header(tok.value) != refused:
                return bearer_header(tok.value)
            self._tokens.invalidate(registry, scope)
            token, expires_in = self._fetch_token(registry, scope, challenge, deadline_at)
            self._tokens.put(registry, scope, token, expires_in)
            return bearer_header(token)

    def _fetch_token(
        self, registry: str, scope: str, challenge: Challenge, deadline_at: float
    ) -> tuple[str, float]:
        url, params = token_request_params(challenge, scope)
        creds = self._creds(registry, scope)
        if creds is not None and creds[0] == IDENTITY_TOKEN_USER:
            # an identity token is an OAuth2 refresh token: POST it (distribution's
            # "OAuth2 token" flow); it is never sent as a Basic password
            form = {**params, "grant_type": "refresh_token", "refresh_token": creds[1]}
            form["client_id"] = "layerstore"
            resp = self._session.post(
                url,
                data=form,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=self._timeout(deadline_at),
                verify=self._verify(url),
                stream=True,
            )
        else:
            resp = self._session.get(
                url,
                params=params,
                auth=HTTPBasicAuth(*creds) if creds else None,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=self._timeout(deadline_at),
                verify=self._verify(url),
                stream=True,
            )
        with resp:
            what = f"token request to {_redact(url)}"
            code = resp.status_code
            if code in (408, 429) or (code >= 500 and code not in (501, 505)):
                self._raise_for_status(resp, what, foreign=False)  # transient: retried
            if code != 200:
                raise AuthError(f"{what}: HTTP {code}")
            token, expires_in = parse_token_response(_read_body(resp, 1 << 20, what))
        log.debug("registry.token", registry=registry, scope=scope, expires_in=expires_in)
        return token, expires_in

    # --- ranges --------------------------------------------------------------------------------

    def _unsatisfiable(self, resp: requests.Response, offset: int, what: str) -> LayerstoreError:
        m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
        if m and offset >= int(m.group(1)):
            return FormatError(f"{what}: beyond the end of the blob ({m.group(1)} bytes)")
        return RangeUnsupported(f"{what}: registry answered 416 Range Not Satisfiable")

    def _read_partial(self, resp: requests.Response, offset: int, length: int, what: str) -> bytes:
        if resp.headers.get("Content-Type", "").lower().startswith("multipart/"):
            raise RegistryError(f"{what}: multipart answer to a single range")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m:
            raise RegistryError(f"{what}: 206 without a valid Content-Range")
        first, last = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        end = offset + length - 1
        if first != offset or last > end:
            raise RegistryError(f"{what}: registry sent bytes {first}-{last} instead")
        if last < end:
            if total is not None and last == total - 1:
                raise FormatError(f"{what}: beyond the end of the blob ({total} bytes)")
            raise RegistryError(f"{what}: registry sent bytes {first}-{last} instead")
        return _read_exact(resp, length, what)

    def _slice_full_body(
        self, resp: requests.Response, offset: int, length: int, what: str
    ) -> bytes:
        total = _content_length(resp)
        if total is not None and offset + length > total:
            raise FormatError(f"{what}: beyond the end of the blob ({total} bytes)")
        to_skip = offset
        out = bytearray()
        for chunk in resp.iter_content(_READ_CHUNK):
            if to_skip:
                cut = min(to_skip, len(chunk))
                chunk, to_skip = chunk[cut:], to_skip - cut
            out += chunk[: length - len(out)]
            if len(out) == length:
                return bytes(out)
        if total is None:
            raise FormatError(f"{what}: beyond the end of the blob")
        raise TransientRegistryError(f"{what}: truncated body")

    def _note_range_ignored(self, registry: str, repository: str, digest: str) -> None:
        key = (registry, repository, digest)
        with self._lock:
            if key in self._range_ignored:
                return
            if len(self._range_ignored) > 4096:
                self._range_ignored.clear()
            self._range_ignored.add(key)
        log.warning(
            "registry.range_ignored",
            registry=registry,
            repository=repository,
            digest=digest,
            note="registry answered 200 with the whole blob; slicing the stream",
        )
