"""A content-addressed on-disk cache of verified, decompressed chunks, with an LRU size cap.

Entries are named by their chunk digest, so they are shared by every layer and image that
holds the same bytes, and every hit is re-hashed before it is returned: a file damaged on disk
(or by hand) is a miss and is deleted, never served. Writes go to a temporary file that is
renamed into place, so a crash of the store (even SIGKILL mid-write) leaves either no entry or a
whole one; stale temporaries are removed at start. There is no fsync: after a power loss the
kernel may have kept the rename but not the data, and the re-hash on read turns such an entry
into a miss, so an fsync per chunk would cost throughput and buy nothing. Recency is kept in
the files' mtimes, so the LRU order survives restarts.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import structlog

from store.digest import Digest
from store.errors import DigestMismatch, FormatError

log = structlog.get_logger(__name__)

Key = tuple[str, int]  # (chunk digest, uncompressed size), as in the memory ChunkCache


class DiskChunkCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.evictions = 0
        if self.enabled:
            self._load()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    # -- public ------------------------------------------------------------------------------

    def get(self, key: Key) -> bytes | None:
        """The chunk's bytes if cached and still hashing to its digest, else None."""
        digest, size = key
        with self._lock:
            known = self._index.get(digest)
            if known is None:
                self.misses += 1
                return None
            self._index.move_to_end(digest)
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)
        except FileNotFoundError:
            self._forget(digest)
            return None
        try:
            if len(data) != size:
                raise DigestMismatch(f"cached chunk {path}", digest, f"{len(data)} bytes")
            Digest.parse(digest).verify(data, what=f"cached chunk {path}")
        except (DigestMismatch, FormatError):
            log.warning("chunk_cache.corrupt", digest=digest, path=str(path))
            self.corrupt += 1
            self._forget(digest)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the LRU order of the next run
        with self._lock:
            self.hits += 1
        return data

    def contains(self, key: Key) -> bool:
        with self._lock:
            return key[0] in self._index

    def put(self, key: Key, data: bytes) -> None:
        """Store verified *data* (the caller checked its digest) atomically; evict LRU entries."""
        digest, size = key
        if not self.enabled or len(data) != size or size > self.max_bytes:
            return
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
                return
        path = self._path(digest)
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only disk costs speed, never correctness.
            log.warning("chunk_cache.write_failed", digest=digest, error=str(exc))
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            if digest not in self._index:
                self._index[digest] = size
                self._bytes += size
            victims = self._evict_locked()
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    @property
    def size(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- internals ---------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.root / algo / hexpart[:2] / hexpart

    def _forget(self, digest: str) -> None:
        with self._lock:
            size = self._index.pop(digest, None)
            if size is not None:
                self._bytes -= size

    def _evict_locked(self) -> list[str]:
        victims = []
        while self._bytes > self.max_bytes and self._index:
            digest, size = self._index.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
            victims.append(digest)
        return victims

    def _load(self) -> None:
        """Index what an earlier run left, oldest use first; drop torn temporaries."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():
            stale.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for algo_dir in self.root.iterdir():
            if algo_dir.name not in ("sha256", "sha512") or not algo_dir.is_dir():
                continue
            for shard in algo_dir.iterdir():
                if not shard.is_dir():
                    continue
                with os.scandir(shard) as it:
                    for ent in it:
                        digest = f"{algo_dir.name}:{ent.name}"
                        try:
                            Digest.parse(digest)
                            st = ent.stat()
                        except (FormatError, OSError):
                            continue
                        found.append((st.st_mtime, digest, st.st_size))
        found.sort()
        for _, digest, size in found:
            self._index[digest] = size
            self._bytes += size
        victims = self._evict_locked()  # the cap may have shrunk since the last run
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)
        log.info("chunk_cache.loaded", entries=len(self._index), bytes=self._bytes)
