"""Reading an eStargz blob through a ``read_at`` seam: footer -> TOC -> verified chunks.

No I/O of its own: the caller supplies ``read_at(offset, length)`` (HTTP Range, a file,
a cache). Steps follow estargz-format.md §4.4 (tail fetch), §13 (TOC member) and §3.5
step 9 / §6 (chunk reads, always verified).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from store.digest import Digest
from store.errors import FooterError, FormatError, TocError
from store.estargz.footer import FOOTER_SIZE, LEGACY_FOOTER_SIZE, detect_footer
from store.estargz.toc import TOC_NAME, Chunk, Toc, parse_toc_json

__all__ = [
    "ReadAt",
    "TocBlob",
    "open_toc",
    "read_toc_bytes",
    "decode_chunk",
    "inflate_prefix",
    "iter_members",
    "read_exact",
    "DEFAULT_TAIL_GUESS",
    "DEFAULT_MAX_TOC_SIZE",
]

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, length)`` must return exactly *length* bytes of the blob at *offset*."""

DEFAULT_TAIL_GUESS = 256 * 1024
DEFAULT_MAX_TOC_SIZE = 150 << 20  # containers/storage's limit (§13)
# A TOC member inflates to tar header(s) + JSON + padding + 1024-byte EOF; allow slack for
# PAX headers on top of the JSON size limit.
_TOC_TAR_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class TocBlob:
    """The raw, not yet verified TOC of a blob."""

    toc_offset: int  # blob offset of the TOC member
    footer_size: int  # 51, or 47 for legacy stargz
    json: bytes  # the exact payload of the stargz.index.json tar entry


def open_toc(
    read_at: ReadAt,
    blob_size: int,
    toc_digest: str | None,
    *,
    verify: bool = True,
    tail_guess: int = DEFAULT_TAIL_GUESS,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> Toc:
    """Fetch, verify and parse the TOC of a blob.

    *toc_digest* is the ``containerd.io/snapshot/stargz/toc.digest`` annotation. It is
    checked against the JSON bytes before they are parsed (§6.2). Passing ``None`` needs an
    explicit ``verify=False``: only tests and tools may look at an unverified TOC.
    """
    if verify and toc_digest is None:
        raise ValueError("open_toc: toc_digest is required unless verify=False")
    expected = Digest.parse(toc_digest) if toc_digest is not None else None
    blob = read_toc_bytes(read_at, blob_size, tail_guess=tail_guess, max_toc_size=max_toc_size)
    if expected is not None:
        expected.verify(blob.json, what="TOC")
    return parse_toc_json(blob.json, toc_offset=blob.toc_offset)


def read_toc_bytes(
    read_at: ReadAt,
    blob_size: int,
    *,
    tail_guess: int = DEFAULT_TAIL_GUESS,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> TocBlob:
    """Locate and extract the TOC JSON bytes, without verifying them.

    One read of ``min(tail_guess, blob_size)`` tail bytes; a second read only when the TOC
    member starts before that window (§4.4).
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise FooterError(f"blob of {blob_size} bytes is too small for eStargz")
    tail_len = min(max(tail_guess, FOOTER_SIZE), blob_size)
    tail_start = blob_size - tail_len
    tail = read_exact(read_at, tail_start, tail_len)
    toc_offset, footer_size = detect_footer(tail)
    toc_end = blob_size - footer_size
    if toc_offset >= toc_end:
        raise FooterError(f"footer points at {toc_offset}, past the TOC end {toc_end}")
    if toc_end - toc_offset > max_toc_size:
        raise TocError(f"compressed TOC of {toc_end - toc_offset} bytes exceeds {max_toc_size}")
    if toc_offset >= tail_start:
        compressed = tail[toc_offset - tail_start : toc_end - tail_start]
    else:
        head = read_exact(read_at, toc_offset, tail_start - toc_offset)
        compressed = head + tail[: toc_end - tail_start]
    payload = _inflate_toc_member(compressed, max_toc_size + _TOC_TAR_SLACK)
    return TocBlob(toc_offset, footer_size, _toc_json_from_tar(payload, max_toc_size))


def read_exact(read_at: ReadAt, offset: int, length: int) -> bytes:
    """read_at(offset, length), refusing a short answer."""
    data = read_at(offset, length)
    if len(data) != length:
        raise FormatError(f"read_at({offset}, {length}) returned {len(data)} bytes")
    return bytes(data)


def _inflate_toc_member(compressed: bytes, limit: int) -> bytes:
    # Exactly one member (§13): the TOC member is the last one before the footer.
    inflater = zlib.decompressobj(wbits=31)
    try:
        payload = inflater.decompress(compressed, limit)
    except zlib.error as exc:
        raise TocError(f"TOC member is not valid gzip: {exc}") from None
    if inflater.unconsumed_tail:
        raise TocError(f"TOC member inflates to more than {limit} bytes")
    if not inflater.eof:
        raise TocError("TOC member is truncated")
    return payload


def _toc_json_from_tar(payload: bytes, max_toc_size: int) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:", encoding="utf-8") as archive:
            info = archive.next()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise TocError(f"TOC member holds no valid tar header: {exc}") from None
    # §3.1: the raw name must be exactly stargz.index.json (PAX path records allowed).
    if info is None or info.name != TOC_NAME:
        raise TocError(f"TOC entry is {info.name if info else None!r}, not {TOC_NAME!r}")
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise TocError(f"TOC entry has tar type {info.type!r}")
    if info.size > max_toc_size:
        raise TocError(f"TOC of {info.size} bytes exceeds {max_toc_size}")
    data = payload[info.offset_data : info.offset_data + info.size]
    if len(data) != info.size:
        raise TocError("TOC payload is truncated")
    return data


def decode_chunk(raw: bytes, chunk: Chunk) -> bytes:
    """Inflate, cut out and verify one chunk.

    *raw* holds blob bytes starting at ``chunk.blob_offset`` (normally up to
    ``chunk.blob_end``; a shorter prefix works if it covers the chunk). Returns exactly
    ``chunk.size`` bytes whose digest matched; never unverified bytes (§6.3).
    """
    if chunk.digest is None:
        raise FormatError("chunk has no digest; refusing to return unverified data")
    expected = Digest.parse(chunk.digest)
    data = inflate_prefix(raw, chunk.inner_offset + chunk.size)[chunk.inner_offset :]
    what = f"chunk at file offset {chunk.file_offset} (blob offset {chunk.blob_offset})"
    expected.verify(data, what=what)  # raises DigestMismatch
    return data


def inflate_prefix(raw: bytes, length: int) -> bytes:
    """The first *length* bytes of the decompressed stream of gzip members in *raw*.

    Members are crossed as needed (§3.5 step 9: a range may span several members); inflation
    stops once *length* bytes are out, so *raw* may run past the data of interest.
    """
    parts: list[bytes] = []
    have = 0
    data = memoryview(raw).cast("B") if not isinstance(raw, bytes) else raw
    while have < length:
        if not data:
            raise FormatError(f"compressed data ended after {have} of {length} bytes")
        inflater = zlib.decompressobj(wbits=31)
        try:
            piece = inflater.decompress(data, length - have)
        except zlib.error as exc:
            raise FormatError(f"corrupt gzip data: {exc}") from None
        parts.append(piece)
        have += len(piece)
        if have >= length:
            break
        if not inflater.eof:
            raise FormatError(f"gzip member truncated after {have} of {length} bytes")
        data = inflater.unused_data  # the next member starts right here
    return b"".join(parts)


def iter_members(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield ``(start_offset, decompressed_bytes)`` for every gzip member of *blob*.

    A tool/test helper: it inflates whole members into memory.
    """
    pos = 0
    view = memoryview(blob)
    while pos < len(blob):
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = inflater.decompress(view[pos:])
        except zlib.error as exc:
            raise FormatError(f"corrupt gzip member at {pos}: {exc}") from None
        if not inflater.eof:
            raise FormatError(f"gzip member at {pos} is truncated")
        yield pos, out
        pos = len(blob) - len(inflater.unused_data)
