"""Push side of the OCI distribution API: blob existence, uploads, cross-repo mounts, manifests.

Built on RegistryClient.request/call_with_retries, so scheme, TLS, auth (with a push scope)
and the retry policy are the pull side's. An upload that fails transiently is restarted as a
whole with a new upload session: a half-sent PATCH cannot be resumed safely without asking
the registry for its offset, and restarting is simple and always correct.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode

import structlog

from store.digest import Digest, sha256_of
from store.errors import RegistryError
from store.registry.client import RegistryClient

log = structlog.get_logger(__name__)

#: Blobs above this size go up in PATCH chunks instead of one PUT.
DEFAULT_CHUNKED_THRESHOLD = 64 << 20
DEFAULT_PATCH_SIZE = 16 << 20


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def _with_query(location: str, **params: str) -> str:
    sep = "&" if "?" in location else "?"
    return location + sep + urlencode(params)


class Pusher:
    """Uploads to one registry through a shared RegistryClient."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        chunked_threshold: int = DEFAULT_CHUNKED_THRESHOLD,
        patch_size: int = DEFAULT_PATCH_SIZE,
    ) -> None:
        if patch_size <= 0:
            raise ValueError("patch_size must be positive")
        self.client = client
        self.chunked_threshold = chunked_threshold
        self.patch_size = patch_size

    # --- blobs ----------------------------------------------------------------------------------

    def blob_exists(self, registry: str, repository: str, digest: str) -> bool:
        Digest.parse(digest)
        what = f"blob {repository}@{digest} (HEAD)"
        path = f"/v2/{repository}/blobs/{digest}"

        def attempt(deadline_at: float) -> bool:
            resp = self.client.request(
                "HEAD", registry, repository, path, deadline_at, what,
                headers={"Accept-Encoding": "identity"},
                scope=push_scope(repository), passthrough={404},
            )
            with resp:
                return resp.status_code != 404

        return self.client.call_with_retries(what, attempt)

    def push_blob(
        self,
        registry: str,
        repository: str,
        digest: str,
        path: Path,
        *,
        mount_from: str | None = None,
    ) -> str:
        """Make blob *digest* (the content of *path*) exist in *repository*.

        Returns how: "exists", "mounted" (cross-repository mount from *mount_from*) or
        "uploaded". The registry verifies the digest on upload.
        """
        if self.blob_exists(registry, repository, digest):
            return "exists"
        if mount_from and mount_from != repository and self._mount(
            registry, repository, digest, mount_from
        ):
            return "mounted"
        size = os.path.getsize(path)
        what = f"blob upload {repository}@{digest}"

        def attempt(deadline_at: float) -> None:
            location = self._start_upload(registry, repository, deadline_at, what)
            with open(path, "rb") as f:
                if size > self.chunked_threshold:
                    location = self._patch_all(registry, repository, location, f, deadline_at)
                    self._finish(registry, repository, location, digest, None, deadline_at)
                else:
                    self._finish(
                        registry, repository, location, digest,
                        lambda: _rewound(f), deadline_at, size=size,
                    )

        self.client.call_with_retries(what, attempt)
        log.debug("push.blob", repository=repository, digest=digest, size=size)
        return "uploaded"

    def _mount(self, registry: str, repository: str, digest: str, source: str) -> bool:
        what = f"blob mount {source} -> {repository}@{digest}"
        query = urlencode({"mount": digest, "from": source})
        target = f"/v2/{repository}/blobs/uploads/?{query}"

        def attempt(deadline_at: float) -> bool:
            resp = self.client.request(
                "POST", registry, repository, target, deadline_at, what,
                headers={"Content-Length": "0"}, body=b"",
                scope=f"{push_scope(repository)} repository:{source}:pull",
            )
            with resp:
                if resp.status_code == 201:
                    return True
                # 202: the registry opened a normal upload instead; abandon it.
                location = resp.headers.get("Location")
            if location:
                self._cancel(registry, repository, location, deadline_at)
            return False

        return self.client.call_with_retries(what, attempt)

    def _cancel(self, registry: str, repository: str, location: str, deadline_at: float) -> None:
        try:
            resp = self.client.request(
                "DELETE", registry, repository, location, deadline_at, "cancel upload",
                scope=push_scope(repository), passthrough={404},
            )
            resp.close()
        except RegistryError:
            pass  # an abandoned upload session expires on its own

    def _start_upload(
        self, registry: str, repository: str, deadline_at: float, what: str
    ) -> str:
        resp = self.client.request(
            "POST", registry, repository, f"/v2/{repository}/blobs/uploads/", deadline_at, what,
            headers={"Content-Length": "0"}, body=b"", scope=push_scope(repository),
        )
        with resp:
            return self._location(resp, what)

    def _patch_all(
        self, registry: str, repository: str, location: str, f: BinaryIO, deadline_at: float
    ) -> str:
        f.seek(0)
        offset = 0
        while True:
            piece = f.read(self.patch_size)
            if not piece:
                return location
            end = offset + len(piece) - 1
            what = f"blob upload {repository} bytes {offset}-{end}"
            resp = self.client.request(
                "PATCH", registry, repository, location, deadline_at, what,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end}",
                    "Content-Length": str(len(piece)),
                },
                body=piece, scope=push_scope(repository),
            )
            with resp:
                location = self._location(resp, what)
            offset = end + 1

    def _finish(
        self,
        registry: str,
        repository: str,
        location: str,
        digest: str,
        body: Callable[[], object] | None,
        deadline_at: float,
        *,
        size: int = 0,
    ) -> None:
        what = f"blob upload {repository}@{digest} (commit)"
        resp = self.client.request(
            "PUT", registry, repository, _with_query(location, digest=digest), deadline_at, what,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body if body is not None else b"", scope=push_scope(repository),
        )
        with resp:
            if resp.status_code != 201:
                raise RegistryError(f"{what}: unexpected HTTP {resp.status_code}")

    @staticmethod
    def _location(resp: object, what: str) -> str:
        location = getattr(resp, "headers", {}).get("Location")
        if not location:
            raise RegistryError(f"{what}: answer without a Location header")
        return location

    # --- manifests --------------------------------------------------------------------------------

    def put_manifest(
        self, registry: str, repository: str, reference: str, data: bytes, media_type: str
    ) -> str:
        """PUT a manifest or index under *reference* (tag or digest); returns its digest."""
        what = f"manifest {repository}:{reference} (PUT)"
        digest = sha256_of(data)

        def attempt(deadline_at: float) -> None:
            resp = self.client.request(
                "PUT", registry, repository, f"/v2/{repository}/manifests/{reference}",
                deadline_at, what, headers={"Content-Type": media_type}, body=data,
                scope=push_scope(repository),
            )
            with resp:
                served = resp.headers.get("Docker-Content-Digest")
            if served and served.strip() != digest:
                raise RegistryError(f"{what}: registry computed {served}, expected {digest}")

        self.client.call_with_retries(what, attempt)
        return digest


def _rewound(f: BinaryIO) -> BinaryIO:
    f.seek(0)
    return f
