"""Reading a zstd:chunked blob through a ``read_at`` seam: layout -> verified TOC -> chunks.

No I/O of its own: the caller supplies ``read_at(offset, length)``. The TOC is trusted only
after its bytes hash to a digest from the image manifest (``manifest-checksum``: the compressed
TOC; ``toc.digest``: the TOC JSON), checked before anything is decompressed or parsed. The
tar-split is trusted only through a digest the verified TOC (or the manifest) records. Chunks are
returned only after their digest matched.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from store.digest import Digest
from store.errors import DigestMismatch, FooterError, FormatError, TocError
from store.estargz.reader import ReadAt, read_exact
from store.estargz.toc import Chunk, Toc
from store.zstdchunked.footer import (
    MAX_FOOTER_FRAME,
    Layout,
    Section,
    parse_footer,
)
from store.zstdchunked.frames import (
    SKIPPABLE_HEADER_SIZE,
    decompress_exact,
    decompress_prefix,
    decompressed_length,
    is_skippable_magic,
)
from store.zstdchunked.toc import Region, parse_toc

__all__ = [
    "ReadAt",
    "TocDigests",
    "ChunkedToc",
    "open_toc",
    "decode_chunk",
    "uncompressed_size",
    "tar_size_from_tar_split",
    "DEFAULT_TAIL_GUESS",
    "DEFAULT_MAX_TOC_SIZE",
    "DEFAULT_MAX_TAR_SPLIT_SIZE",
]

DEFAULT_TAIL_GUESS = 256 * 1024
DEFAULT_MAX_TOC_SIZE = 150 << 20  # containers/storage's limit, compressed and uncompressed
DEFAULT_MAX_TAR_SPLIT_SIZE = 1 << 30
# Size scan (layers without tar-split): gaps between data frames closer than this are fetched
# in one request, data and all; one request spans at most _SCAN_REQUEST bytes.
_SCAN_MERGE = 256 * 1024
_SCAN_REQUEST = 8 << 20
_MAX_GAP_INFLATED = 1 << 30  # tar headers and padding between two files: far less in practice
_TAR_SPLIT_FILE = 1  # tar-split storage.FileType
_TAR_SPLIT_SEGMENT = 2  # tar-split storage.SegmentType


@dataclass(frozen=True, slots=True)
class TocDigests:
    """What the TOC must hash to; every digest given is checked, at least one is required.

    ``recorded`` is for a store restart, where only the digest Podman was told is known: it
    must name either the compressed TOC or its JSON (both bind the TOC's content).
    """

    manifest_checksum: str | None = None  # sha256 of the compressed TOC bytes
    toc_json: str | None = None  # sha256 of the TOC JSON (stargz toc.digest)
    recorded: str | None = None
    tar_split: str | None = None  # legacy tarsplit-checksum annotation (c/storage 1.48-1.53)

    def __post_init__(self) -> None:
        if not (self.manifest_checksum or self.toc_json or self.recorded):
            raise ValueError("TocDigests: a TOC digest is required")


@dataclass(frozen=True, slots=True)
class ChunkedToc:
    """A verified zstd:chunked TOC and what is known about the layer's tar."""

    toc: Toc
    layout: Layout
    data_end: int  # data frames lie in [0, data_end)
    tar_split_size: int | None  # exact tar size from a verified tar-split, if the blob has one
    regions: tuple[Region, ...] | None  # files' data frames, for the size scan


def open_toc(
    read_at: ReadAt,
    blob_size: int,
    digests: TocDigests,
    *,
    layout: Layout | None = None,
    tail_guess: int = DEFAULT_TAIL_GUESS,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    max_tar_split_size: int = DEFAULT_MAX_TAR_SPLIT_SIZE,
) -> ChunkedToc:
    """Fetch, verify and parse the TOC (and the tar-split, if any) of a zstd:chunked blob.

    *layout* comes from the manifest-position / tarsplit-position annotations; without it the
    footer is read. Either way the metadata frames are fetched in one request when the tail
    guess covers them (with annotations, exactly the bytes from the first metadata frame on).
    """
    if layout is not None:
        _check_layout(layout, blob_size, max_toc_size, max_tar_split_size)
        tail_start = layout.start()
        tail = read_exact(read_at, tail_start, blob_size - tail_start)
    else:
        tail_len = min(max(tail_guess, MAX_FOOTER_FRAME), blob_size)
        tail_start = blob_size - tail_len
        tail = read_exact(read_at, tail_start, tail_len)
        layout = parse_footer(tail, blob_size)
        _check_layout(layout, blob_size, max_toc_size, max_tar_split_size)
        start = layout.start()
        if start < tail_start:
            tail = read_exact(read_at, start, tail_start - start) + tail
            tail_start = start

    def section(sec: Section, what: str) -> bytes:
        frame = tail[sec.frame_start - tail_start : sec.end - tail_start]
        if not is_skippable_magic(frame) or int.from_bytes(frame[4:8], "little") != sec.length:
            raise FooterError(f"{what} at {sec.offset} is not in a skippable frame of its size")
        return frame[SKIPPABLE_HEADER_SIZE:]

    compressed = section(layout.toc, "TOC")
    # Verify before decompressing or parsing anything (the digests come from the manifest).
    if digests.manifest_checksum:
        Digest.parse(digests.manifest_checksum).verify(compressed, what="zstd:chunked TOC")
    recorded_pending = digests.recorded is not None and not _matches(digests.recorded, compressed)
    data = decompress_exact(compressed, layout.toc.uncompressed, "TOC")
    if digests.toc_json:
        Digest.parse(digests.toc_json).verify(data, what="zstd:chunked TOC JSON")
    if recorded_pending:
        assert digests.recorded is not None
        Digest.parse(digests.recorded).verify(data, what="zstd:chunked TOC (recorded digest)")
    data_end = layout.start()
    parsed = parse_toc(data, data_end=data_end)

    tar_split_size = None
    split_digest = parsed.tar_split_digest or digests.tar_split
    # Without a digest the tar-split cannot be trusted, without a position (a 56-byte footer
    # and no annotation) it cannot be found: then the size comes from uncompressed_size's scan.
    if split_digest is not None and layout.tar_split is not None:
        raw = section(layout.tar_split, "tar-split")
        Digest.parse(split_digest).verify(raw, what="zstd:chunked tar-split")
        inflated = decompress_exact(raw, layout.tar_split.uncompressed, "tar-split")
        tar_split_size = tar_size_from_tar_split(inflated, parsed.toc)
    return ChunkedToc(parsed.toc, layout, data_end, tar_split_size, parsed.regions)


def _check_layout(layout: Layout, blob_size: int, max_toc: int, max_tar_split: int) -> None:
    toc, ts = layout.toc, layout.tar_split
    if toc.end > blob_size or (ts is not None and ts.end > blob_size):
        raise FooterError(f"metadata sections {layout} run past the blob ({blob_size} bytes)")
    # The metadata frames are the blob's tail: TOC, tar-split, footer, nothing in between.
    # Bounding the tail bounds what one lookup may read, whatever the annotations say.
    most = max_toc + (max_tar_split if ts is not None else 0) + 2 * 8 + MAX_FOOTER_FRAME
    if blob_size - layout.start() > most:
        raise TocError(f"metadata tail of {blob_size - layout.start()} bytes exceeds {most}")
    if ts is not None and toc.frame_start < ts.end and ts.frame_start < toc.end:
        raise FooterError(f"TOC and tar-split overlap: {layout}")
    if max(toc.length, toc.uncompressed) > max_toc:
        raise TocError(f"TOC of {toc.length}/{toc.uncompressed} bytes exceeds {max_toc}")
    if ts is not None and max(ts.length, ts.uncompressed) > max_tar_split:
        raise TocError(f"tar-split of {ts.length}/{ts.uncompressed} bytes exceeds {max_tar_split}")


def _matches(digest: str, data: bytes) -> bool:
    try:
        Digest.parse(digest).verify(data)
    except DigestMismatch:
        return False
    return True


# ---------------------------------------------------------------------------- chunks


def decode_chunk(raw: bytes | memoryview, chunk: Chunk) -> bytes:
    """Decompress, cut out and verify one chunk.

    *raw* holds blob bytes starting at ``chunk.blob_offset`` (up to ``chunk.blob_end``, or a
    shorter prefix covering the chunk's frames). Returns exactly ``chunk.size`` bytes whose
    digest matched; never unverified bytes.
    """
    if chunk.digest is None:
        raise FormatError("chunk has no digest; refusing to return unverified data")
    expected = Digest.parse(chunk.digest)
    data = decompress_prefix(raw, chunk.inner_offset + chunk.size)[chunk.inner_offset :]
    what = f"chunk at file offset {chunk.file_offset} (blob offset {chunk.blob_offset})"
    expected.verify(data, what=what)
    return data


# ---------------------------------------------------------------------------- tar size


def tar_size_from_tar_split(data: bytes, toc: Toc | None = None) -> int:
    """The exact tar length a tar-split stream describes: every raw segment (headers,
    padding, end-of-archive blocks) plus every file's size.

    With *toc*, the file entries must match the TOC's entries in number and total size, so a
    tar-split that describes a different tar is refused.
    """
    total = 0
    files = 0
    file_bytes = 0
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise TocError(f"tar-split line {number}: not JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise TocError(f"tar-split line {number}: not an object")
        kind = entry.get("type")
        if kind == _TAR_SPLIT_SEGMENT:
            payload = entry.get("payload") or ""
            if type(payload) is not str:
                raise TocError(f"tar-split line {number}: payload is not a string")
            try:
                total += len(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError):
                raise TocError(f"tar-split line {number}: payload is not base64") from None
        elif kind == _TAR_SPLIT_FILE:
            size = entry.get("size", 0)
            if type(size) is not int or size < 0:
                raise TocError(f"tar-split line {number}: bad size {size!r:.40}")
            total += size
            files += 1
            file_bytes += size
        else:
            raise TocError(f"tar-split line {number}: unknown entry type {kind!r:.40}")
    if toc is not None:
        toc_bytes = sum(e.size for e in toc.entries if e.type == "reg")
        if files != len(toc.entries) or file_bytes != toc_bytes:
            raise TocError(
                f"tar-split describes {files} entries / {file_bytes} file bytes, "
                f"the TOC {len(toc.entries)} / {toc_bytes}"
            )
    return total


def uncompressed_size(
    ct: ChunkedToc,
    read_at: ReadAt,
    *,
    merge: int = _SCAN_MERGE,
    request_limit: int = _SCAN_REQUEST,
) -> int:
    """The exact length of the layer's tar (its DiffID's preimage).

    From the verified tar-split when the blob has one (no I/O). Otherwise (Podman 4.x wrote no
    tar-split) by inflating only the frames *between* the files' data frames -- the tar headers,
    padding and end-of-archive blocks -- and adding the files' sizes from the TOC: the data
    frames are never fetched unless a small file sits between two gaps of one request.
    """
    if ct.tar_split_size is not None:
        return ct.tar_split_size
    if ct.regions is None:
        raise FormatError("no tar-split and no endOffset in the TOC: the tar size is unknown")
    gaps: list[tuple[int, int]] = []
    pos = 0
    total = 0
    for region in sorted(ct.regions, key=lambda r: r.start):
        if region.start < pos:
            raise FormatError(f"data frames overlap at {region.start}")
        if region.start > pos:
            gaps.append((pos, region.start))
        pos = region.end
        total += region.size
    if pos > ct.data_end:
        raise FormatError(f"data frames run past the metadata at {ct.data_end}")
    if pos < ct.data_end:
        gaps.append((pos, ct.data_end))
    for request in _group(gaps, merge, request_limit):
        start, stop = request[0][0], request[-1][1]
        raw = memoryview(read_exact(read_at, start, stop - start))
        for lo, hi in request:
            total += decompressed_length(raw[lo - start : hi - start], limit=_MAX_GAP_INFLATED)
    return total


def _group(
    gaps: list[tuple[int, int]], merge: int, limit: int
) -> list[list[tuple[int, int]]]:
    groups: list[list[tuple[int, int]]] = []
    for gap in gaps:
        if groups:
            last = groups[-1]
            if gap[0] - last[-1][1] <= merge and gap[1] - last[0][0] <= limit:
                last.append(gap)
                continue
        groups.append([gap])
    return groups

