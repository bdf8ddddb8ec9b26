"""Prefetch at first use of a layer, then background fetch of the rest.

- Prefetch: the chunks before `.prefetch.landmark` (Toc.prefetch_end) are the files the image's
  workload reads first (estargz-format.md §7); they are fetched in one range request as soon as
  the layer is prepared, into memory and the disk cache.
- Background fetch: the remaining chunks, in blob order, in merged requests of a few MiB, with at
  most `concurrency` requests in flight and an optional bandwidth cap, into the disk cache only
  (bulk must not push hot chunks out of memory). It yields to on-demand reads: while any FUSE
  read is fetching, background workers wait.

Both go through RemoteLayer.fetch_chunks, so a chunk being prefetched is never fetched a second
time by an on-demand read: the read waits for it. Failures are logged and end that layer's
prefetch; they never affect on-demand reads, which fetch (and verify) on their own.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import structlog

from store.errors import LayerstoreError

if TYPE_CHECKING:
    from store.estargz import Chunk
    from store.layer import RemoteLayer

log = structlog.get_logger(__name__)

IDLE_WAIT = 0.05  # seconds without on-demand fetches before background work resumes
BACKGROUND_REQUEST = 4 << 20  # compressed bytes per background range request


class ForegroundGate:
    """Counts on-demand fetches in progress; background work waits until there are none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._last_end = 0.0

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def wait_idle(self, stop: threading.Event) -> None:
        with self._cond:
            while not stop.is_set():
                if self._active == 0:
                    quiet = time.monotonic() - self._last_end
                    if quiet >= IDLE_WAIT:
                        return
                    self._cond.wait(IDLE_WAIT - quiet)
                else:
                    self._cond.wait(0.5)


class _Bandwidth:
    """A global pacing clock: after n bytes the next request may start n/rate seconds later."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self._lock = threading.Lock()
        self._next = 0.0

    def pace(self, nbytes: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            stop.wait(start - now)


class Prefetcher:
    def __init__(
        self,
        *,
        prefetch: bool = True,
        background: bool = False,
        concurrency: int = 2,
        bandwidth_mbps: float = 0.0,
        request_bytes: int = BACKGROUND_REQUEST,
    ) -> None:
        self.prefetch = prefetch
        self.background = background
        self.request_bytes = request_bytes
        self.gate = ForegroundGate()
        self._bandwidth = _Bandwidth(bandwidth_mbps * 1e6 / 8)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Layers already scheduled. Weak: a dropped layer's id() is reused by later objects.
        self._seen: weakref.WeakSet[RemoteLayer] = weakref.WeakSet()
        # Prefetch of a layer is one request, run on its own small pool so that a slow
        # background queue never delays the next layer's prefetch.
        self._prefetch_pool = ThreadPoolExecutor(2, thread_name_prefix="prefetch")
        self._background_pool = ThreadPoolExecutor(
            max(1, concurrency), thread_name_prefix="background"
        )
        # Read-ahead for sequential reads is on-demand work: its own pool, never throttled.
        self._readahead_pool = ThreadPoolExecutor(2, thread_name_prefix="readahead")

    @property
    def enabled(self) -> bool:
        return self.prefetch or self.background

    def layer_opened(self, layer: RemoteLayer) -> None:
        """Called once a layer is prepared (its first use); schedules its prefetch."""
        if not self.enabled or self._stop.is_set():
            return
        with self._lock:
            if layer in self._seen:
                return
            self._seen.add(layer)
        with contextlib.suppress(RuntimeError):  # pool shut down: the store is stopping
            self._prefetch_pool.submit(self._start, layer)

    def readahead(self, job: Callable[[], object]) -> None:
        """Run *job* on the read-ahead pool. Raises RuntimeError once the store is stopping
        (the caller releases what the job would have finished)."""
        self._readahead_pool.submit(job)

    def close(self) -> None:
        self._stop.set()
        # Queued read-ahead jobs run to the end: each finishes chunk claims a reader may be
        # waiting on, and there are at most a few per reader.
        self._readahead_pool.shutdown(wait=True)
        self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self._background_pool.shutdown(wait=True, cancel_futures=True)

    # -- work --------------------------------------------------------------------------------

    def _start(self, layer: RemoteLayer) -> None:
        if layer.closed:  # dropped (released by Podman) before its turn came
            return
        chunks = list(layer.data_chunks())
        end = layer.toc.prefetch_end
        head = [c for c in chunks if end is not None and c.blob_offset < end]
        if self.prefetch and head:
            self._prefetch(layer, head)
        if self.background:
            rest = chunks if not self.prefetch else chunks[len(head) :]
            self._schedule_background(layer, rest)

    def _prefetch(self, layer: RemoteLayer, head: list[Chunk]) -> None:
        started = time.monotonic()
        todo = layer.missing_chunks(head)
        if todo:
            span = max(c.blob_end for c in todo) - todo[0].blob_offset
            try:
                # One request for the whole region, however large: it is what the workload
                # reads first, and the writer put it there for exactly this.
                layer.fetch_chunks(todo, merge_limit=span)
            except (LayerstoreError, OSError) as exc:
                log.warning("prefetch.failed", blob=layer.source.digest, error=str(exc))
                return
        log.info(
            "prefetch.done",
            blob=layer.source.digest,
            chunks=len(todo),
            cached=len(head) - len(todo),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _schedule_background(self, layer: RemoteLayer, rest: list[Chunk]) -> None:
        if layer.disk is None:
            # Without a disk cache the bulk would only churn the memory cache.
            log.info("background.skipped", blob=layer.source.digest, reason="no disk cache")
            return
        groups: list[list[Chunk]] = []
        group: list[Chunk] = []
        for chunk in layer.missing_chunks(rest):
            if group and chunk.blob_end - group[0].blob_offset > self.request_bytes:
                groups.append(group)
                group = []
            group.append(chunk)
        if group:
            groups.append(group)
        job = _BackgroundJob(layer, len(groups), time.monotonic())
        if not groups:
            job.finish()
            return
        for g in groups:
            try:
                self._background_pool.submit(self._background_group, job, g)
            except RuntimeError:  # shutting down
                return

    def _background_group(self, job: _BackgroundJob, group: list[Chunk]) -> None:
        if self._stop.is_set() or job.failed or job.layer.closed:
            return
        self.gate.wait_idle(self._stop)
        if self._stop.is_set() or job.layer.closed:
            return
        todo = job.layer.missing_chunks(group)
        if todo:
            span = max(c.blob_end for c in todo) - todo[0].blob_offset
            self._bandwidth.pace(span, self._stop)
            try:
                job.layer.fetch_chunks(todo, memory=False, merge_limit=span)
            except (LayerstoreError, OSError) as exc:
                job.failed = True
                log.warning("background.failed", blob=job.layer.source.digest, error=str(exc))
                return
            job.add(len(todo), span)
        job.group_done()


class _BackgroundJob:
    def __init__(self, layer: RemoteLayer, groups: int, started: float) -> None:
        self.layer = layer
        self.remaining = groups
        self.started = started
        self.failed = False
        self.chunks = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, chunks: int, nbytes: int) -> None:
        with self._lock:
            self.chunks += chunks
            self.bytes += nbytes

    def group_done(self) -> None:
        with self._lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.finish()

    def finish(self) -> None:
        log.info(
            "background.done",
            blob=self.layer.source.digest,
            chunks=self.chunks,
            bytes=self.bytes,
            ms=round((time.monotonic() - self.started) * 1000, 1),
        )
