"""The on-disk chunk cache, and RemoteLayer's use of it (merging, coalescing, sharing).

Layers here are real eStargz blobs from our writer, served from memory by a BlobSource that
records its range requests: nothing else is faked.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
import weakref
from pathlib import Path

import pytest

from store.cache import chunks as chunks_mod
from store.cache.chunks import DiskChunkCache
from store.chunkcache import ChunkCache
from store.digest import sha256_of
from store.estargz import build_estargz_bytes
from store.layer import RemoteLayer
from store.prefetch import Prefetcher
from tests.unit.tarbuild import TarBuilder


def entry(data: bytes) -> tuple[str, int]:
    return (sha256_of(data), len(data))


def test_put_get_and_survives_reopen(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20)
    data = b"hello chunk" * 100
    cache.put(entry(data), data)
    assert cache.get(entry(data)) == data
    assert cache.get(entry(b"other")) is None
    again = DiskChunkCache(tmp_path, 1 << 20)
    assert len(again) == 1 and again.size == len(data)
    assert again.get(entry(data)) == data


def test_lru_eviction_by_bytes_and_order_survives_restart(tmp_path: Path) -> None:
    blobs = [bytes([i]) * 1000 for i in range(5)]
    cache = DiskChunkCache(tmp_path, 3500)
    for i, b in enumerate(blobs[:3]):
        cache.put(entry(b), b)
        os.utime(cache._path(entry(b)[0]), (1000 + i, 1000 + i))  # distinct recency on disk
    assert cache.get(entry(blobs[0])) == blobs[0]  # 0 becomes the most recently used
    cache.put(entry(blobs[3]), blobs[3])  # 4000 > 3500: evicts the LRU one, blobs[1]
    assert cache.get(entry(blobs[1])) is None
    assert not cache._path(entry(blobs[1])[0]).exists()
    assert cache.size == 3000 and cache.evictions == 1
    # a restart rebuilds the order from mtimes: 2 is now the oldest
    reopened = DiskChunkCache(tmp_path, 3500)
    reopened.put(entry(blobs[4]), blobs[4])
    assert reopened.get(entry(blobs[2])) is None
    assert {reopened.get(entry(b)) for b in (blobs[0], blobs[3], blobs[4])} == {
        blobs[0], blobs[3], blobs[4]
    }


def test_smaller_cap_at_start_evicts(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 10_000)
    for i in range(5):
        b = bytes([i]) * 1000
        cache.put(entry(b), b)
    assert DiskChunkCache(tmp_path, 2500).size == 2000


def test_corrupt_entry_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20)
    data = b"x" * 4096
    cache.put(entry(data), data)
    path = cache._path(entry(data)[0])
    path.write_bytes(b"y" * 4096)  # same size, wrong bytes
    assert cache.get(entry(data)) is None
    assert not path.exists() and cache.corrupt == 1 and len(cache) == 0
    cache.put(entry(data), data)
    path.write_bytes(data[:100])  # truncated
    assert cache.get(entry(data)) is None and cache.corrupt == 2


def test_torn_writes_are_cleared_at_start(tmp_path: Path) -> None:
    """A crash mid-write leaves only a temporary file, which is never an entry."""
    cache = DiskChunkCache(tmp_path, 1 << 20)
    data = b"z" * 5000
    torn = tmp_path / "tmp" / "deadbeef.tmp"
    torn.write_bytes(data[:10])
    # and an entry renamed into place over a torn file cannot happen; one cut short by hand is
    # caught by the re-hash on read
    reopened = DiskChunkCache(tmp_path, 1 << 20)
    assert not torn.exists()
    assert len(reopened) == 0 and cache.get(entry(data)) is None


def test_writes_are_atomic_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final name only ever appears with complete content (written before the rename)."""
    cache = DiskChunkCache(tmp_path, 1 << 20)
    data = os.urandom(100_000)
    seen: list[tuple[str, int]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((str(dst), Path(src).stat().st_size))
        assert not Path(dst).exists()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    cache.put(entry(data), data)
    assert seen == [(str(cache._path(entry(data)[0])), len(data))]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path / "c", 0)
    cache.put(entry(b"a"), b"a")
    assert cache.get(entry(b"a")) is None and not (tmp_path / "c").exists()


def test_wrong_size_is_not_stored(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20)
    cache.put((sha256_of(b"abc"), 4), b"abc")
    assert len(cache) == 0


# -- write-behind ------------------------------------------------------------------------------


def files_in(root: Path) -> list[Path]:
    return [p for p in (root / "sha256").rglob("*") if p.is_file()] if root.exists() else []


def test_write_behind_queues_until_flush_and_serves_from_the_queue(tmp_path: Path) -> None:
    """With a long quiet period nothing reaches the disk until flush(); the queued bytes are
    answered meanwhile, and a reopened cache sees them once written."""
    cache = DiskChunkCache(tmp_path, 1 << 20, write_behind_bytes=1 << 20, quiet=3600)
    chunks = [bytes([i]) * 10_000 for i in range(3)]
    for c in chunks:
        cache.put(entry(c), c)
    assert files_in(tmp_path) == []
    assert cache.pending == 30_000 and len(cache) == 0
    assert all(cache.contains(entry(c)) and cache.get(entry(c)) == c for c in chunks)
    assert cache.flush(timeout=30)
    assert cache.pending == 0 and len(files_in(tmp_path)) == 3
    reopened = DiskChunkCache(tmp_path, 1 << 20)
    assert all(reopened.get(entry(c)) == c for c in chunks)
    cache.close()


def assert_written_by_the_writer(cache: DiskChunkCache, root: Path, data: bytes) -> None:
    """Queue *data*, and see the writer thread (not a flush) put it on disk."""
    cache.put(entry(data), data)
    deadline = time.monotonic() + 30  # a bound for a stuck writer, not a speed check
    while cache.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.pending == 0 and [p.read_bytes() for p in files_in(root)] == [data]
    cache.close()


def test_write_behind_writes_once_puts_pause(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20, write_behind_bytes=1 << 20, quiet=0.05)
    assert_written_by_the_writer(cache, tmp_path, b"q" * 5000)


def test_write_behind_does_not_wait_forever_for_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that never pause long enough (quiet never reached) still get their chunks
    written once the oldest has waited WRITE_BEHIND_MAX_AGE."""
    monkeypatch.setattr(chunks_mod, "WRITE_BEHIND_MAX_AGE", 0.05)
    cache = DiskChunkCache(tmp_path, 1 << 20, write_behind_bytes=1 << 20, quiet=3600)
    assert_written_by_the_writer(cache, tmp_path, b"t" * 5000)


def test_write_behind_queue_is_bounded(tmp_path: Path) -> None:
    """Past the budget a put writes at once; at three quarters the writer starts even while
    puts keep coming, so the queue never holds more than the budget."""
    cache = DiskChunkCache(tmp_path, 1 << 20, write_behind_bytes=10_000, quiet=3600)
    chunks = [bytes([i]) * 4000 for i in range(4)]
    for c in chunks:
        cache.put(entry(c), c)
        assert cache.pending <= 10_000
    deadline = time.monotonic() + 30
    while cache.pending > 7_500 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.pending <= 7_500
    assert len(files_in(tmp_path)) + cache.pending // 4000 == 4
    cache.close()
    assert len(files_in(tmp_path)) == 4


def test_undeferred_puts_and_puts_after_close_write_at_once(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20, write_behind_bytes=1 << 20, quiet=3600)
    bulk = b"b" * 3000
    cache.put(entry(bulk), bulk, defer=False)
    assert len(files_in(tmp_path)) == 1 and cache.pending == 0
    queued = b"c" * 3000
    cache.put(entry(queued), queued)
    assert cache.pending == 3000
    cache.close()  # writes the queue
    assert len(files_in(tmp_path)) == 2 and cache.pending == 0
    late = b"d" * 3000
    cache.put(entry(late), late)
    assert len(files_in(tmp_path)) == 3


def test_close_writes_the_queue_while_puts_go_on(tmp_path: Path) -> None:
    """Puts arriving during close() are written at once instead of refilling the queue, so
    close() ends with everything on disk even under a steady stream of reads."""
    cache = DiskChunkCache(tmp_path, 256 << 20, write_behind_bytes=1 << 20, quiet=0.01)
    stop = threading.Event()
    put: list[bytes] = []

    def putter() -> None:
        while not stop.is_set():
            data = os.urandom(16) * 1024
            cache.put(entry(data), data)
            put.append(data)

    threads = [threading.Thread(target=putter) for _ in range(3)]
    for t in threads:
        t.start()
    while len(put) < 50:
        time.sleep(0.01)
    assert cache.close(timeout=120) is True
    stop.set()
    for t in threads:
        t.join()
    assert cache.pending == 0
    assert {p.name for p in files_in(tmp_path)} == {sha256_of(d).split(":")[1] for d in put}


def test_one_chunk_is_written_once_by_concurrent_puts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = DiskChunkCache(tmp_path, 1 << 20)
    data = b"x" * 4096
    renames: list[str] = []
    real_replace = os.replace
    started = threading.Event()

    def slow_replace(src: str, dst: str) -> None:
        renames.append(str(dst))
        started.set()
        time.sleep(0.2)  # the other put arrives while this write is under way
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    first = threading.Thread(target=cache.put, args=(entry(data), data))
    first.start()
    started.wait(30)
    cache.put(entry(data), data)  # while the first is writing: nothing to do
    first.join()
    assert len(renames) == 1 and cache.get(entry(data)) == data


def test_prefetcher_does_not_keep_dropped_layers(tmp_path: Path) -> None:
    """Layers are remembered weakly: a dropped layer is freed, and a new layer that gets its
    id() (CPython reuses addresses) is not mistaken for it."""
    pre = Prefetcher(prefetch=True)
    submitted: list[object] = []
    pre._prefetch_pool.submit = lambda fn, layer: submitted.append(layer)  # type: ignore
    try:
        data = os.urandom(1000)
        src, toc = make_layer(tmp_path, {"a": data})
        layer = open_layer(src, toc, tmp_path, None)
        pre.layer_opened(layer)
        pre.layer_opened(layer)  # once per layer
        assert submitted == [layer]
        ref = weakref.ref(layer)
        submitted.clear()
        del layer
        gc.collect()
        assert ref() is None and len(pre._seen) == 0
    finally:
        pre.close()


def test_layer_defers_only_what_it_keeps_in_memory(tmp_path: Path) -> None:
    """On-demand reads queue their chunks; background fetches (memory=False) write them now,
    since nothing else holds those bytes."""
    data = os.urandom(200_000)
    src, toc = make_layer(tmp_path, {"a.bin": data})
    disk = DiskChunkCache(tmp_path / "cache", 64 << 20, write_behind_bytes=64 << 20, quiet=3600)
    layer = open_layer(src, toc, tmp_path, disk)
    assert read_all(layer, "a.bin") == data
    assert files_in(tmp_path / "cache") == [] and disk.pending == len(data)
    disk.flush(timeout=30)
    assert len(files_in(tmp_path / "cache")) == 4  # 200 kB in 64 KiB chunks
    before = len(src.reads)
    assert read_all(open_layer(src, toc, tmp_path, disk), "a.bin") == data
    assert len(src.reads) == before + 1  # footer+TOC only: the chunks came from disk
    other = os.urandom(100_000)
    src2, toc2 = make_layer(tmp_path, {"b.bin": other})
    layer2 = open_layer(src2, toc2, tmp_path, disk)
    bulk = list(layer2.data_chunks())  # b.bin's two chunks and the landmark's
    layer2.fetch_chunks(bulk, memory=False)
    assert disk.pending == 0 and len(files_in(tmp_path / "cache")) == 4 + len(bulk)
    disk.close()


# -- RemoteLayer with caches -----------------------------------------------------------------


class MemoryBlob:
    """A blob held in memory that counts range requests (optionally slow, to force overlap)."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        self.data = data
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.size = len(data)
        self.delay = delay
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def read_range(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.reads.append((offset, length))
        if self.delay:
            time.sleep(self.delay)
        return self.data[offset : offset + length]

    def download(self, dest) -> int:  # pragma: no cover - not used here
        dest.write(self.data)
        return self.size


def make_layer(tmp_path: Path, files: dict[str, bytes], **kw) -> tuple[MemoryBlob, str]:
    tb = TarBuilder()
    for name, data in files.items():
        tb.file(name, data)
    blob, res = build_estargz_bytes(tb.build(), chunk_size=64 * 1024, **kw)
    return MemoryBlob(blob), res.toc_digest


def open_layer(src: MemoryBlob, toc: str, tmp: Path, disk: DiskChunkCache | None, **kw):
    return RemoteLayer.open(src, toc, ChunkCache(64 << 20), tmp / "blobs", disk=disk, **kw)


def read_all(layer: RemoteLayer, name: str) -> bytes:
    node = layer.toc.lookup(name)
    entry_ = layer.toc.node(node).entry
    out = b""
    while len(out) < entry_.size:
        out += layer.read_file(entry_, len(out), 128 * 1024)
    return out


def test_adjacent_chunks_are_merged_into_one_request(tmp_path: Path) -> None:
    big = hashlib.shake_256(b"merge").digest(1 << 20)  # 16 chunks of 64 KiB
    src, toc = make_layer(tmp_path, {"big": big})
    layer = open_layer(src, toc, tmp_path, None)
    before = len(src.reads)
    node = layer.toc.node(layer.toc.lookup("big"))
    assert layer.read_file(node.entry, 0, len(big)) == big
    # one range request for all 16 chunks (the TOC reads came before)
    assert len(src.reads) - before == 1
    assert layer.stats().chunks_fetched == 16


def test_read_ahead_within_a_file_stays_under_the_merge_limit(tmp_path: Path) -> None:
    big = hashlib.shake_256(b"ra").digest(1 << 20)
    src, toc = make_layer(tmp_path, {"big": big})
    layer = open_layer(src, toc, tmp_path, None, merge_limit=300 * 1024)
    before = len(src.reads)
    assert read_all(layer, "big") == big
    reads = src.reads[before:]
    assert all(n <= 300 * 1024 for _, n in reads)
    assert len(reads) < 16  # several chunks per request, not one each


def test_sequential_read_with_read_ahead_fetches_each_chunk_once(tmp_path: Path) -> None:
    # Every kernel-sized read of a sequential reader asks for read-ahead; the windows are
    # claimed when queued, so neither a later call nor the reader fetches them again.
    from concurrent.futures import ThreadPoolExecutor

    big = hashlib.shake_256(b"once").digest(2 << 20)  # 32 chunks of 64 KiB
    src, toc = make_layer(tmp_path, {"big": big})
    pool = ThreadPoolExecutor(2)
    try:
        layer = open_layer(src, toc, tmp_path, None, merge_limit=128 * 1024,
                           readahead=pool.submit)
        src.delay = 0.01  # slow enough that reads overtake queued windows
        before = len(src.reads)
        node = layer.toc.node(layer.toc.lookup("big"))
        out = bytearray()
        while len(out) < len(big):
            got = layer.read_cached(node.entry, len(out), 16 * 1024)
            if got is None:
                got = layer.read_file(node.entry, len(out), 16 * 1024)
            out += got
    finally:
        pool.shutdown(wait=True)
    assert bytes(out) == big
    assert layer.stats().chunks_fetched == 32
    fetched = sum(n for _, n in src.reads[before:])
    assert fetched == layer.stats().bytes_fetched <= src.size


def test_identical_concurrent_reads_are_coalesced(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"co").digest(60_000)  # one chunk
    src, toc = make_layer(tmp_path, {"f": data})
    layer = open_layer(src, toc, tmp_path, None)
    src.delay = 0.2
    before = len(src.reads)
    node = layer.toc.node(layer.toc.lookup("f"))
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(layer.read_file(node.entry, 0, 60_000)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 8
    assert len(src.reads) - before == 1


def test_disk_cache_is_shared_across_layers_and_restarts(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"shared").digest(200_000)
    src1, toc1 = make_layer(tmp_path, {"a/same.bin": data, "x": b"1"})
    src2, toc2 = make_layer(tmp_path, {"b/copy.bin": data, "y": b"2"})
    disk = DiskChunkCache(tmp_path / "cache", 64 << 20)
    assert read_all(open_layer(src1, toc1, tmp_path, disk), "a/same.bin") == data
    # another layer with the same file content: served from disk, no chunk request
    layer2 = open_layer(src2, toc2, tmp_path, disk)
    before = len(src2.reads)
    assert read_all(layer2, "b/copy.bin") == data
    assert src2.reads[before:] == []
    # a new process (fresh memory cache, reopened disk cache) needs no request either
    disk_again = DiskChunkCache(tmp_path / "cache", 64 << 20)
    layer3 = open_layer(src1, toc1, tmp_path, disk_again)
    before = len(src1.reads)
    assert read_all(layer3, "a/same.bin") == data
    assert src1.reads[before:] == []


def test_corrupt_disk_entry_is_refetched_not_served(tmp_path: Path) -> None:
    data = hashlib.shake_256(b"bad").digest(50_000)
    src, toc = make_layer(tmp_path, {"f": data})
    disk = DiskChunkCache(tmp_path / "cache", 64 << 20)
    assert read_all(open_layer(src, toc, tmp_path, disk), "f") == data
    (path,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    path.write_bytes(b"\0" * len(data))
    layer = open_layer(src, toc, tmp_path, DiskChunkCache(tmp_path / "cache", 64 << 20))
    before = len(src.reads)
    assert read_all(layer, "f") == data
    assert len(src.reads) - before == 1
    assert path.read_bytes() == data  # rewritten with the verified bytes
