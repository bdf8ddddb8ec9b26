"""One lazily served eStargz layer: verified file reads and the raw blob.

Knows the eStargz format (through store.estargz; zstd:chunked layers bring their own chunk
decoder, store.zstdchunked) and a BlobSource to fetch compressed bytes from; knows nothing of
FUSE or HTTP. Thread-safe: the FUSE front calls it from worker threads.

Invariant: file bytes are only ever returned after their chunk digest was checked
(`decode_chunk` verifies), and the blob file is only used after its whole digest was checked.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import structlog

from store.chunkcache import ChunkCache
from store.diffview import DiffView
from store.digest import Verifier
from store.errors import DigestMismatch, FormatError
from store.estargz import Chunk, Toc, TocEntry, decode_chunk, open_toc
from store.singleflight import SingleFlight

if TYPE_CHECKING:
    from store.cache.chunks import DiskChunkCache
    from store.prefetch import ForegroundGate

log = structlog.get_logger(__name__)

ChunkKey = tuple[str, int]
# (compressed bytes starting at the chunk's blob offset, chunk) -> verified chunk bytes
ChunkDecoder = Callable[[memoryview, Chunk], bytes]
DEFAULT_MERGE_LIMIT = 4 << 20  # compressed bytes one merged range request may span
# Windows of merge_limit bytes fetched ahead of a sequential reader, each in its own thread, so
# inflating and hashing use more than one core.
READAHEAD_WINDOWS = 2


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
    requests: int = 0  # range requests (or local preads) for chunks; merged runs count once


class _ChunkFlight:
    """In-flight chunk fetches by key: a caller claims the keys nobody fetches yet and waits
    for the others, so identical chunk requests are coalesced even when they are fetched as
    part of different merged range requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[ChunkKey, list] = {}  # key -> [event, data, error]

    def claim(self, keys: Sequence[ChunkKey]) -> tuple[list[ChunkKey], dict[ChunkKey, list]]:
        mine: list[ChunkKey] = []
        theirs: dict[ChunkKey, list] = {}
        with self._lock:
            for key in keys:
                call = self._calls.get(key)
                if call is None:
                    self._calls[key] = [threading.Event(), None, None]
                    mine.append(key)
                else:
                    theirs[key] = call
        return mine, theirs

    def finish(self, key: ChunkKey, data: bytes | None, error: BaseException | None) -> None:
        with self._lock:
            call = self._calls.pop(key)
        call[1], call[2] = data, error
        call[0].set()

    @staticmethod
    def wait(call: list) -> bytes:
        call[0].wait()
        if call[2] is not None:
            raise call[2]
        return call[1]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)

    def busy(self, key: ChunkKey) -> bool:
        return key in self._calls


class RemoteLayer:
    def __init__(
        self,
        source: BlobSource,
        toc: Toc,
        cache: ChunkCache,
        blob_dir: Path,
        *,
        disk: DiskChunkCache | None = None,
        gate: ForegroundGate | None = None,
        merge_limit: int = DEFAULT_MERGE_LIMIT,
        readahead: Callable[[Callable[[], object]], None] | None = None,
        decode: ChunkDecoder = decode_chunk,
    ) -> None:
        self.source = source
        self.toc = toc
        # The layer format's verified chunk decoder: eStargz (gzip members) by default,
        # store.zstdchunked.decode_chunk for zstd:chunked layers.
        self.decode = decode
        self.view = DiffView(toc)
        self.cache = cache
        self.disk = disk if disk is not None and disk.enabled else None
        self.gate = gate
        self.merge_limit = merge_limit
        self.readahead = readahead  # runs a job off this thread (the Prefetcher's pool)
        self.blob_dir = blob_dir
        self._flight = _ChunkFlight()
        self._blob_flight: SingleFlight[Path] = SingleFlight()
        self._blob_path: Path | None = None
        self._blob_fd: int | None = None
        self._lock = threading.Lock()
        self._chunks_fetched = 0
        self._bytes_fetched = 0
        self._requests = 0
        self._closed = False  # dropped (unreachable) or the store is stopping

    @classmethod
    def open(
        cls,
        source: BlobSource,
        toc_digest: str,
        cache: ChunkCache,
        blob_dir: Path,
        **options: object,
    ) -> RemoteLayer:
        """Fetch footer and TOC with range reads and verify the TOC against *toc_digest*."""
        toc = open_toc(source.read_range, source.size, toc_digest)
        return cls(source, toc, cache, blob_dir, **options)  # type: ignore[arg-type]

    # -- file contents ---------------------------------------------------------------------

    def read_file(self, entry: TocEntry, offset: int, size: int) -> bytes:
        if entry.type != "reg":
            raise FormatError(f"{entry.name} is not a regular file")
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        chunks = entry.chunks
        first = max(0, bisect.bisect_right(chunks, offset, key=_file_offset) - 1)
        last = first
        while last + 1 < len(chunks) and chunks[last + 1].file_offset < end:
            last += 1
        got: dict[ChunkKey, bytes] = {}
        missing: list[Chunk] = []
        for chunk in chunks[first : last + 1]:
            key = _key(chunk)
            data = self._cached(key)
            if data is None:
                missing.append(chunk)
            else:
                got[key] = data
        if missing:
            # Read ahead within the file: the following chunks ride along in the same range
            # request while it stays under the merge limit (sequential reads of big files).
            budget = self.merge_limit - (missing[-1].blob_end - missing[0].blob_offset)
            nxt = last + 1
            while nxt < len(chunks) and budget > 0:
                c = chunks[nxt]
                if c.digest is None or c.blob_offset != missing[-1].blob_end:
                    break
                if c.blob_end - c.blob_offset > budget or self._known(_key(c)):
                    break
                budget -= c.blob_end - c.blob_offset
                missing.append(c)
                nxt += 1
            with self._foreground():
                got.update(self.fetch_chunks(missing))
            last = max(last, nxt - 1)
        if self.readahead is not None and last + 1 < len(chunks):
            self._read_ahead(chunks, last + 1)
        parts: list[bytes] = []
        pos = offset
        i = first
        while pos < end:
            chunk = chunks[i]
            data = got[_key(chunk)]
            lo = pos - chunk.file_offset
            hi = min(end - chunk.file_offset, chunk.size)
            parts.append(data[lo:hi])
            pos = chunk.file_offset + hi
            i += 1
        return b"".join(parts)

    def read_cached(self, entry: TocEntry, offset: int, size: int) -> bytes | None:
        """The bytes if every chunk they need is in the memory cache, else None. Never blocks.

        The FUSE front calls this on its event loop before handing a read to a worker thread:
        a sequential reader issues dozens of kernel reads per chunk, and all but the first are
        hits, which are far cheaper to serve here than to send through a thread.
        """
        end = min(entry.size, offset + size)
        if entry.type != "reg" or offset >= end:
            return None
        chunks = entry.chunks
        i = max(0, bisect.bisect_right(chunks, offset, key=_file_offset) - 1)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            chunk = chunks[i]
            if chunk.digest is None:
                return None
            data = self.cache.get(_key(chunk))
            if data is None:
                return None
            lo = pos - chunk.file_offset
            hi = min(end - chunk.file_offset, chunk.size)
            parts.append(data[lo:hi])
            pos = chunk.file_offset + hi
            i += 1
        if self.readahead is not None and i < len(chunks):
            self._read_ahead(chunks, i)  # keep the window ahead of a sequential reader
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, chunks: list[Chunk], start: int) -> None:
        """Fetch the next window of a file being read while the reader consumes this one, so
        network, inflate and hashing overlap with the reads (sequential throughput).

        The window's chunks are claimed here, before the job is queued: a reader reaching them
        waits for this fetch instead of fetching them again, and the next call (every kernel
        read calls this) sees them busy and queues nothing, so at most READAHEAD_WINDOWS jobs
        per reader are ever outstanding.
        """
        if self._closed:
            return  # dropped or stopping: no new work
        windows: list[list[Chunk]] = [[]]
        span = 0
        for chunk in chunks[start:]:
            key = _key(chunk)
            if chunk.digest is None or self._known(key) or self._flight.busy(key):
                break
            span += chunk.blob_end - chunk.blob_offset
            if windows[-1] and span > self.merge_limit:
                if len(windows) == READAHEAD_WINDOWS:
                    break
                windows.append([])
                span = chunk.blob_end - chunk.blob_offset
            windows[-1].append(chunk)
        assert self.readahead is not None
        for window in windows:
            if not window:
                continue
            mine, _ = self._flight.claim([_key(c) for c in window])
            if not mine:
                continue
            claimed = set(mine)
            todo = [c for c in window if _key(c) in claimed]
            try:
                self.readahead(lambda w=todo: self._quiet_fetch(w))
            except RuntimeError as exc:  # not queued (the store is stopping): release them
                for chunk in todo:
                    self._flight.finish(_key(chunk), None, exc)
                return

    def _quiet_fetch(self, chunks: list[Chunk]) -> None:
        """Fetch chunks this thread already claimed (a read-ahead window)."""
        try:
            self._fetch_claimed(chunks, {}, True, self.merge_limit)
        except Exception as exc:  # noqa: BLE001 - the on-demand read will retry and report
            log.debug("readahead.failed", blob=self.source.digest, error=str(exc))

    def _foreground(self) -> contextlib.AbstractContextManager[object]:
        return self.gate.foreground() if self.gate is not None else contextlib.nullcontext()

    def _cached(self, key: ChunkKey) -> bytes | None:
        """Memory first, then disk (a disk hit is promoted: it is likely read again soon)."""
        if key[0] is None:
            # Nothing to verify against: serving it would defeat the TOC's purpose.
            raise FormatError("chunk has no digest; refusing to serve unverifiable data")
        data = self.cache.get(key)
        if data is None and self.disk is not None:
            data = self.disk.get(key)
            if data is not None:
                self.cache.put(key, data)
        return data

    def _known(self, key: ChunkKey) -> bool:
        """Cached somewhere, without reading it (to skip work, never to serve)."""
        if key in self.cache._items:  # noqa: SLF001 - a racy peek is fine for a skip decision
            return True
        return self.disk is not None and self.disk.contains(key)

    def _chunk(self, chunk: Chunk) -> bytes:
        key = _key(chunk)
        data = self._cached(key)
        if data is not None:
            return data
        return self.fetch_chunks([chunk])[key]

    def data_chunks(self) -> Iterator[Chunk]:
        """Every verifiable chunk of the layer, once per content, in blob order."""
        seen: set[ChunkKey] = set()
        out: list[Chunk] = []
        for entry in self.toc.entries:
            if entry.type != "reg":
                continue
            for chunk in entry.chunks:
                key = _key(chunk)
                if chunk.digest is None or key in seen:
                    continue
                seen.add(key)
                out.append(chunk)
        out.sort(key=lambda c: (c.blob_offset, c.inner_offset))
        return iter(out)

    def missing_chunks(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        return [c for c in chunks if not self._known(_key(c))]

    def fetch_chunks(
        self, chunks: Sequence[Chunk], *, memory: bool = True, merge_limit: int | None = None
    ) -> dict[ChunkKey, bytes]:
        """Fetch, verify and cache *chunks*; adjacent ones share one range request.

        Chunks someone else is already fetching are waited for, not fetched twice. With
        ``memory=False`` (background fetch) results go to the disk cache only, so a bulk fetch
        does not push hot chunks out of memory. Raises the first error (DigestMismatch, ...).
        """
        by_key: dict[ChunkKey, Chunk] = {}
        for chunk in chunks:
            if chunk.digest is None:
                raise FormatError("chunk has no digest; refusing to serve unverifiable data")
            by_key.setdefault(_key(chunk), chunk)
        mine, theirs = self._flight.claim(list(by_key))
        out: dict[ChunkKey, bytes] = {}
        limit = self.merge_limit if merge_limit is None else merge_limit
        error: BaseException | None = None
        try:
            self._fetch_claimed([by_key[k] for k in mine], out, memory, limit)
        except BaseException as exc:  # noqa: BLE001 - raised after waiting for the others
            error = exc
        for key, call in theirs.items():
            out[key] = self._flight.wait(call)
            if memory:  # it may have been a background fetch, which skips the memory cache
                self.cache.put(key, out[key])
        if error is not None:
            raise error
        return out

    def _fetch_claimed(
        self, chunks: list[Chunk], out: dict[ChunkKey, bytes], memory: bool, limit: int
    ) -> None:
        """Fetch chunks this thread claimed; every claim is finished, with data or the error."""
        todo: list[Chunk] = []
        for chunk in chunks:
            key = _key(chunk)
            # Fetched by someone else between the caller's cache check and the claim.
            data = self.cache.get(key)
            if data is not None:
                out[key] = data
                self._flight.finish(key, data, None)
            else:
                todo.append(chunk)
        error: BaseException | None = None
        for run in _runs(sorted(todo, key=_blob_order), limit):
            if error is not None:
                for chunk in run:
                    self._flight.finish(_key(chunk), None, error)
                continue
            try:
                self._fetch_run(run, out, memory)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter, then raised
                error = exc
                for chunk in run:
                    key = _key(chunk)
                    if key not in out:
                        self._flight.finish(key, None, exc)
        if error is not None:
            raise error

    def _fetch_run(self, run: list[Chunk], out: dict[ChunkKey, bytes], memory: bool) -> None:
        start = run[0].blob_offset
        stop = max(c.blob_end for c in run)
        raw = memoryview(self._compressed(start, stop - start))
        with self._lock:
            self._requests += 1
            self._bytes_fetched += stop - start
        for chunk in run:
            key = _key(chunk)
            piece = raw[chunk.blob_offset - start : chunk.blob_end - start]
            data = self.decode(piece, chunk)  # raises DigestMismatch: never cached or served
            if memory:
                self.cache.put(key, data)
            if self.disk is not None:
                # Deferred only when the bytes are in the memory cache meanwhile.
                self.disk.put(key, data, defer=memory)
            out[key] = data
            with self._lock:
                self._chunks_fetched += 1
            self._flight.finish(key, data, None)

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
                # No fsync: a blob kept from an earlier run is re-hashed before use
                # (_verified_on_disk), so one torn by a power loss is fetched again; syncing
                # 100s of MB here would only delay the first byte podman save gets.
                with open(tmp, "wb") as out:
                    self.source.download(out)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("blob.downloaded", digest=self.source.digest, size=self.source.size)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, fd)  # see close()
        self._blob_fd = fd
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
            return LayerStats(
                self._chunks_fetched, self._bytes_fetched, self._blob_fd is not None, self._requests
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No new background work (read-ahead, prefetch) for this layer from now on.

        The blob file stays open until the object is collected: a worker thread may still be
        reading it, and closing the number under it could let it read whatever file gets
        that number next.
        """
        self._closed = True


def _key(chunk: Chunk) -> ChunkKey:
    return (chunk.digest, chunk.size)  # type: ignore[return-value]


def _file_offset(chunk: Chunk) -> int:
    return chunk.file_offset


def _blob_order(chunk: Chunk) -> tuple[int, int]:
    return (chunk.blob_offset, chunk.inner_offset)


def _runs(chunks: list[Chunk], limit: int) -> list[list[Chunk]]:
    """Split chunks (blob order) into runs of touching byte ranges of at most *limit* bytes."""
    runs: list[list[Chunk]] = []
    run: list[Chunk] = []
    run_end = 0
    for chunk in chunks:
        if run and chunk.blob_offset <= run_end and (
            max(run_end, chunk.blob_end) - run[0].blob_offset <= limit
        ):
            run.append(chunk)
            run_end = max(run_end, chunk.blob_end)
            continue
        if run:
            runs.append(run)
        run, run_end = [chunk], chunk.blob_end
    if run:
        runs.append(run)
    return runs
