"""One lazily served eStargz layer: verified file reads and the raw blob.

Knows the eStargz format (through store.estargz) and a BlobSource to fetch compressed bytes
from; knows nothing of FUSE or HTTP. Thread-safe: the FUSE front calls it from worker threads.

Invariant: file bytes are only ever returned after their chunk digest was checked
(`decode_chunk` verifies), and the blob file is only used after its whole digest was checked.
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

from store.chunkcache import ChunkCache
from store.diffview import DiffView
from store.digest import Verifier
from store.errors import DigestMismatch, FormatError
from store.estargz import Chunk, Toc, TocEntry, decode_chunk, open_toc
from store.singleflight import SingleFlight

log = structlog.get_logger(__name__)


class BlobSource(Protocol):
    """Where the compressed layer blob lives (a registry repository, in production)."""

    digest: str
    size: int

    def read_range(self, offset: int, length: int) -> bytes: ...

    def download(self, dest: BinaryIO) -> int:
        """Write the whole blob to *dest*, raising DigestMismatch if it is not *digest*."""
        ...


@dataclass(frozen=True, slots=True)
class LayerStats:
    chunks_fetched: int
    bytes_fetched: int
    blob_local: bool


class RemoteLayer:
    def __init__(self, source: BlobSource, toc: Toc, cache: ChunkCache, blob_dir: Path) -> None:
        self.source = source
        self.toc = toc
        self.view = DiffView(toc)
        self.cache = cache
        self.blob_dir = blob_dir
        self._flight: SingleFlight[bytes] = SingleFlight()
        self._blob_flight: SingleFlight[Path] = SingleFlight()
        self._blob_path: Path | None = None
        self._blob_fd: int | None = None
        self._lock = threading.Lock()
        self._chunks_fetched = 0
        self._bytes_fetched = 0

    @classmethod
    def open(
        cls, source: BlobSource, toc_digest: str, cache: ChunkCache, blob_dir: Path
    ) -> RemoteLayer:
        """Fetch footer and TOC with range reads and verify the TOC against *toc_digest*."""
        toc = open_toc(source.read_range, source.size, toc_digest)
        return cls(source, toc, cache, blob_dir)

    # -- file contents ---------------------------------------------------------------------

    def read_file(self, entry: TocEntry, offset: int, size: int) -> bytes:
        if entry.type != "reg":
            raise FormatError(f"{entry.name} is not a regular file")
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        chunks = entry.chunks
        starts = [c.file_offset for c in chunks]
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            chunk = chunks[i]
            data = self._chunk(chunk)
            lo = pos - chunk.file_offset
            hi = min(end - chunk.file_offset, chunk.size)
            parts.append(data[lo:hi])
            pos = chunk.file_offset + hi
            i += 1
        return b"".join(parts)

    def _chunk(self, chunk: Chunk) -> bytes:
        if chunk.digest is None:
            # Nothing to verify against: serving it would defeat the TOC's purpose.
            raise FormatError("chunk has no digest; refusing to serve unverifiable data")
        key = (chunk.digest, chunk.size)
        data = self.cache.get(key)
        if data is not None:
            return data
        return self._flight.run(key, lambda: self._fetch_chunk(chunk, key))

    def _fetch_chunk(self, chunk: Chunk, key: tuple[str, int]) -> bytes:
        raw = self._compressed(chunk.blob_offset, chunk.blob_end - chunk.blob_offset)
        data = decode_chunk(raw, chunk)  # raises DigestMismatch: never cached, never served
        self.cache.put(key, data)
        with self._lock:
            self._chunks_fetched += 1
            self._bytes_fetched += len(raw)
        return data

    def _compressed(self, offset: int, length: int) -> bytes:
        fd = self._blob_fd
        if fd is not None:
            return os.pread(fd, length, offset)
        return self.source.read_range(offset, length)

    # -- the raw blob (podman save / push) ---------------------------------------------------

    def read_blob(self, offset: int, size: int) -> bytes:
        if offset >= self.source.size:
            return b""
        self._blob_flight.run("blob", self._ensure_blob)
        assert self._blob_fd is not None
        return os.pread(self._blob_fd, min(size, self.source.size - offset), offset)

    def _ensure_blob(self) -> Path:
        """Download the whole blob once, verify its digest, keep it on disk.

        Podman reads `blob` from start to end, so fetching it whole is what it needs anyway,
        and verifying before the first byte is served is the only way never to hand out a
        corrupt blob.
        """
        if self._blob_path is not None:
            return self._blob_path
        algo, hexpart = self.source.digest.split(":", 1)
        path = self.blob_dir / f"{algo}-{hexpart}"
        if path.exists() and not self._verified_on_disk(path):
            path.unlink()  # torn or corrupted since it was written: fetch it again
        if not path.exists():
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                with open(tmp, "wb") as out:
                    self.source.download(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("blob.downloaded", digest=self.source.digest, size=self.source.size)
        self._blob_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._blob_path = path
        return path

    def _verified_on_disk(self, path: Path) -> bool:
        """A blob kept from an earlier run is trusted only after its digest checks out."""
        if path.stat().st_size != self.source.size:
            return False
        verifier = Verifier(self.source.digest, what=f"blob {self.source.digest}")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                verifier.update(block)
        try:
            verifier.check()
        except DigestMismatch:
            log.warning("blob.cache_corrupt", digest=self.source.digest, path=str(path))
            return False
        return True

    def stats(self) -> LayerStats:
        with self._lock:
            return LayerStats(self._chunks_fetched, self._bytes_fetched, self._blob_fd is not None)

    def close(self) -> None:
        if self._blob_fd is not None:
            os.close(self._blob_fd)
            self._blob_fd = None
