"""The kept footer+TOC tails: reused on the next open, never trusted, bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store.cache.tails import TailCache
from store.errors import DigestMismatch
from store.estargz import build_estargz_bytes, open_toc
from tests.unit.tarbuild import TarBuilder
from tests.unit.test_disk_cache import MemoryBlob


def layer(n_files: int = 3) -> tuple[MemoryBlob, str]:
    tb = TarBuilder()
    for i in range(n_files):
        tb.file(f"d/f{i}.txt", f"file {i}\n".encode() * 50)
    blob, res = build_estargz_bytes(tb.build())
    return MemoryBlob(blob), res.toc_digest


def open_through(cache: TailCache, src: MemoryBlob, toc_digest: str):
    return cache.open_with(
        src.digest, src.size, src.read_range,
        lambda read_at: open_toc(read_at, src.size, toc_digest),
    )


def test_second_open_reads_nothing_from_the_registry(tmp_path: Path) -> None:
    src, toc_digest = layer()
    first = open_through(TailCache(tmp_path), src, toc_digest)
    assert len(src.reads) == 1  # footer and TOC in one read
    again = open_through(TailCache(tmp_path), src, toc_digest)  # a new run of the store
    assert len(src.reads) == 1
    assert [e.name for e in again.entries] == [e.name for e in first.entries]


def test_a_toc_bigger_than_the_tail_guess_is_kept_whole(tmp_path: Path) -> None:
    src, toc_digest = layer(n_files=3000)  # a TOC larger than the first tail read
    cache = TailCache(tmp_path)
    cache.open_with(src.digest, src.size, src.read_range,
                    lambda r: open_toc(r, src.size, toc_digest, tail_guess=4096))
    assert len(src.reads) == 2
    cache.open_with(src.digest, src.size, src.read_range,
                    lambda r: open_toc(r, src.size, toc_digest, tail_guess=4096))
    assert len(src.reads) == 2


def test_a_damaged_tail_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    src, toc_digest = layer()
    cache = TailCache(tmp_path)
    open_through(cache, src, toc_digest)
    (kept,) = [p for p in tmp_path.iterdir() if not p.name.endswith(".tmp")]
    raw = bytearray(kept.read_bytes())
    raw[-100] ^= 0xFF  # inside the TOC member or footer
    kept.write_bytes(bytes(raw))
    toc = open_through(cache, src, toc_digest)  # verified: the damage is noticed
    assert len(src.reads) == 2 and len(toc.entries) > 3
    assert kept.read_bytes() != bytes(raw)  # replaced by what the registry sent
    open_through(cache, src, toc_digest)
    assert len(src.reads) == 2


def test_a_wrong_digest_is_still_refused(tmp_path: Path) -> None:
    """The kept bytes only save a request: verification is the format reader's, every time."""
    src, toc_digest = layer()
    cache = TailCache(tmp_path)
    open_through(cache, src, toc_digest)
    with pytest.raises(DigestMismatch):
        open_through(cache, src, "sha256:" + "0" * 64)


def test_tails_beyond_the_cap_are_removed_oldest_first(tmp_path: Path) -> None:
    blobs = [layer(n_files=i + 1) for i in range(3)]
    sizes = []
    cache = TailCache(tmp_path)
    for i, (src, toc_digest) in enumerate(blobs):
        open_through(cache, src, toc_digest)
        kept = cache._path(src.digest)
        os.utime(kept, (1000 + i, 1000 + i))
        sizes.append(kept.stat().st_size)
    small = TailCache(tmp_path, max_bytes=sizes[1] + sizes[2])
    src, toc_digest = layer(n_files=4)
    open_through(small, src, toc_digest)  # a fourth: the oldest ones make room
    left = {p.name for p in tmp_path.iterdir()}
    assert small._path(blobs[0][0].digest).name not in left
    assert small._path(src.digest).name in left
