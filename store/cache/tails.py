"""The metadata tail of each layer blob (footer and TOC), kept on disk.

Opening a layer needs its TOC, which sits at the end of the blob. Keeping those bytes lets the
store open a layer again without the registry: after a restart, or after it dropped a layer
Podman had released. Nothing kept here is trusted: the TOC is checked against its digest on
every open (by the format readers), and a tail that fails is deleted and fetched again.

A file per blob, named by the blob digest, holding where the tail starts (8 bytes, big
endian) and the bytes from there to the end of the blob. Written to a temporary file and
renamed. The oldest files (by last use) go beyond `max_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from store.errors import LayerstoreError

log = structlog.get_logger(__name__)

T = TypeVar("T")
ReadRange = Callable[[int, int], bytes]
_HEADER = 8


class TailCache:
    def __init__(self, root: Path, max_bytes: int = 256 << 20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def open_with(
        self, digest: str, size: int, read_range: ReadRange, open_fn: Callable[[ReadRange], T]
    ) -> T:
        """open_fn(read_at): a format reader that fetches and verifies the TOC through read_at.

        Tried first on the kept tail (falling back to *read_range* for anything outside it); if
        that fails verification the tail is deleted. A successful open through the network
        keeps what it read, when it is one piece reaching the end of the blob.
        """
        kept = self._load(digest, size)
        if kept is not None:
            start, data = kept
            try:
                return open_fn(_Reader(start, data, read_range).read)
            except LayerstoreError as exc:
                log.warning("toc_cache.unusable", blob=digest, error=str(exc))
                self._path(digest).unlink(missing_ok=True)
        recorder = _Recorder(size, read_range)
        result = open_fn(recorder.read)
        tail = recorder.tail()
        if tail is not None:
            self._store(digest, *tail)
        return result

    # -- files ---------------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.root / f"{algo}-{hexpart}"

    def _load(self, digest: str, size: int) -> tuple[int, bytes] | None:
        path = self._path(digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("toc_cache.read_failed", blob=digest, error=str(exc))
            return None
        start = int.from_bytes(raw[:_HEADER], "big") if len(raw) >= _HEADER else -1
        if start < 0 or start + len(raw) - _HEADER != size:
            path.unlink(missing_ok=True)  # torn or not this blob's: fetched again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency, for the size cap
        return start, raw[_HEADER:]

    def _store(self, digest: str, start: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        tmp = self.root / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(start.to_bytes(_HEADER, "big"))
                f.write(data)
            os.replace(tmp, self._path(digest))
        except OSError as exc:  # a full disk costs a refetch later, nothing else
            log.warning("toc_cache.write_failed", blob=digest, error=str(exc))
            tmp.unlink(missing_ok=True)
            return
        self._trim()

    def _trim(self) -> None:
        with self._lock:
            files = []
            for ent in os.scandir(self.root):
                if ent.name.endswith(".tmp"):
                    continue
                with contextlib.suppress(OSError):
                    st = ent.stat()
                    files.append((st.st_mtime, st.st_size, ent.path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                total -= size


class _Reader:
    """Answers reads inside the kept tail from it, and the rest from the registry."""

    def __init__(self, start: int, data: bytes, read_range: ReadRange) -> None:
        self.start, self.data, self.read_range = start, data, read_range

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.start and offset + length <= self.start + len(self.data):
            return self.data[offset - self.start : offset - self.start + length]
        return self.read_range(offset, length)


class _Recorder:
    """Passes reads through and remembers them, to keep the tail they form."""

    def __init__(self, size: int, read_range: ReadRange) -> None:
        self.size = size
        self.read_range = read_range
        self.pieces: dict[int, bytes] = {}

    def read(self, offset: int, length: int) -> bytes:
        data = self.read_range(offset, length)
        self.pieces[offset] = data
        return data

    def tail(self) -> tuple[int, bytes] | None:
        """(start, bytes) if the reads form one piece that ends at the end of the blob."""
        if not self.pieces:
            return None
        start = min(self.pieces)
        pos, parts = start, []
        while pos < self.size:
            piece = self.pieces.get(pos)
            if not piece:
                return None
            parts.append(piece)
            pos += len(piece)
        return (start, b"".join(parts)) if pos == self.size else None
