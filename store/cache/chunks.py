"""A content-addressed on-disk cache of verified, decompressed chunks, with an LRU size cap.

Entries are named by their chunk digest, so they are shared by every layer and image that
holds the same bytes, and every hit is re-hashed before it is returned: a file damaged on disk
(or by hand) is a miss and is deleted, never served. Writes go to a temporary file that is
renamed into place, so a crash of the store (even SIGKILL mid-write) leaves either no entry or a
whole one; stale temporaries are removed at start. There is no fsync: after a power loss the
kernel may have kept the rename but not the data, and the re-hash on read turns such an entry
into a miss, so an fsync per chunk would cost throughput and buy nothing. Recency is kept in
the files' mtimes, so the LRU order survives restarts.

Write-behind: chunks a reader is waiting for are also in the memory cache, so writing them to
disk can wait. Such puts are queued (up to `write_behind_bytes`) and written by one thread once
the puts have paused for `quiet` seconds, the queue is three-quarters full, or its oldest entry
is WRITE_BEHIND_MAX_AGE old: a cold sequential read then does not pay for its own persistence,
and a slow disk never slows a read. Queued chunks are answered from the queue; close() writes
them all; a SIGKILL loses only the queued ones, which are fetched again when next needed. The
queue holds its own reference: chunks the memory cache has meanwhile evicted stay in RAM until
written, so the bound on chunk memory is the memory cache plus `write_behind_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import structlog

from store.digest import Digest
from store.errors import DigestMismatch, FormatError

log = structlog.get_logger(__name__)

Key = tuple[str, int]  # (chunk digest, uncompressed size), as in the memory ChunkCache
WRITE_BEHIND_QUIET = 0.25  # seconds without a deferred put before queued chunks are written
WRITE_BEHIND_MAX_AGE = 5.0  # ...but none waits longer than this under a steady trickle of reads


class DiskChunkCache:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        write_behind_bytes: int = 0,
        quiet: float = WRITE_BEHIND_QUIET,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._bytes = 0
        self._shards: set[Path] = set()  # directories known to exist
        # write-behind queue: digest -> (verified bytes, when queued), oldest first
        self._pending: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._writing: set[str] = set()  # written right now by a caller's thread
        self._pending_bytes = 0
        self._write_behind = write_behind_bytes
        self._quiet = quiet
        self._last_put = 0.0
        self._flushing = 0
        self._closed = False
        self._changed = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
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
            queued = self._pending.get(digest)
            if queued is not None:
                self.hits += 1
                return queued[0]  # verified by whoever queued it, and never left memory
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
            return key[0] in self._index or key[0] in self._pending

    def put(self, key: Key, data: bytes, *, defer: bool = True) -> None:
        """Store verified *data* (the caller checked its digest); evict LRU entries.

        With write-behind on and *defer*, the write is queued (see the module doc); a full
        queue, or defer=False (bulk background fetches, whose bytes are not in memory
        otherwise), writes now.
        """
        digest, size = key
        if not self.enabled or len(data) != size or size > self.max_bytes:
            return
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
                return
            if digest in self._pending or digest in self._writing:
                return
            now = time.monotonic()
            if (
                defer
                and not self._closed
                and self._pending_bytes + size <= self._write_behind
            ):
                self._pending[digest] = (data, now)
                self._pending_bytes += size
                self._last_put = now
                self._start_writer_locked()
                self._changed.notify_all()
                return
            self._writing.add(digest)
        try:
            self._write(digest, data)
        finally:
            with self._lock:
                self._writing.discard(digest)

    def flush(self, timeout: float | None = None) -> bool:
        """Write every queued chunk now; False if *timeout* ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                while self._pending:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._changed.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Write what is queued (up to *timeout*), then stop the writer; later puts write now.
        False if some queued chunks could not be written in time (they are fetched again)."""
        with self._changed:
            self._closed = True  # first: puts arriving meanwhile must not keep the queue full
            self._changed.notify_all()
        written = self.flush(timeout)
        if not written:
            with self._lock:
                left = len(self._pending)
            log.warning("chunk_cache.unwritten", chunks=left, note="fetched again when needed")
        if self._writer is not None:
            self._writer.join(5)
        return written

    @property
    def pending(self) -> int:
        """Bytes queued for writing."""
        with self._lock:
            return self._pending_bytes

    @property
    def size(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- internals ---------------------------------------------------------------------------

    def _write(self, digest: str, data: bytes) -> None:
        """Write one entry atomically (temporary file, then rename) and index it."""
        path = self._path(digest)
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            if path.parent not in self._shards:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._shards.add(path.parent)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only disk costs speed, never correctness.
            log.warning("chunk_cache.write_failed", digest=digest, error=str(exc))
            tmp.unlink(missing_ok=True)
            self._shards.discard(path.parent)
            return
        with self._lock:
            if digest not in self._index:
                self._index[digest] = len(data)
                self._bytes += len(data)
            # Unlinked under the lock: a victim put again right after must keep its new file.
            for victim in self._evict_locked():
                self._path(victim).unlink(missing_ok=True)

    def _start_writer_locked(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_behind_loop, name="chunk-cache-writer", daemon=True
            )
            self._writer.start()

    def _write_due_locked(self) -> float:
        """Seconds until the queue should be written (0: now)."""
        if self._closed or self._flushing > 0 or self._pending_bytes * 4 > self._write_behind * 3:
            return 0.0
        now = time.monotonic()
        oldest = next(iter(self._pending.values()))[1]
        return max(0.0, min(self._last_put + self._quiet, oldest + WRITE_BEHIND_MAX_AGE) - now)

    def _write_behind_loop(self) -> None:
        with self._changed:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    self._changed.wait()
                    continue
                due = self._write_due_locked()
                if due > 0:
                    self._changed.wait(max(due, 0.01))
                    continue
                digest, (data, _) = next(iter(self._pending.items()))
                self._lock.release()
                try:
                    self._write(digest, data)
                except Exception as exc:  # noqa: BLE001 - the writer must outlive one bad entry
                    log.warning("chunk_cache.write_failed", digest=digest, error=repr(exc))
                finally:
                    self._lock.acquire()
                # still readable from the queue until now; from the file (or refetch) after
                del self._pending[digest]
                self._pending_bytes -= len(data)
                self._changed.notify_all()

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
