"""Where the TOC and the tar-split sit in a zstd:chunked blob: annotations and footers.

Both are described twice: by layer annotations (what containers/storage reads) and by a footer
in the blob's last skippable frame (what makes the blob self-describing). Known layouts, all
little-endian u64 fields inside a skippable frame at the very end of the blob
(estargz-format.md §9, containers/storage pkg/chunked history):

- 40 bytes: tocOffset, tocLength, tocUncompressedLength, type=1, magic ``GnUlInUx``.
  Podman 4.3 (c/storage 1.43) and stargz-snapshotter's ``zstdchunked`` write this one.
- 56 bytes: the same four fields, the magic at byte 32, then 16 zero bytes
  (c/storage 1.48-1.49; a tar-split exists but only the annotation says where).
- 64 bytes: the four fields, tarSplitOffset, tarSplitLength, tarSplitUncompressedLength,
  magic ``GNUlInUx`` (c/storage >= 1.50, Podman 5).

Offsets point at the section's payload, 8 bytes after its skippable frame header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from store.errors import FooterError
from store.zstdchunked.frames import SKIPPABLE_HEADER_SIZE, is_skippable_magic

__all__ = [
    "Section",
    "Layout",
    "MANIFEST_TYPE_CRFS",
    "FOOTER_SIZES",
    "MAX_FOOTER_FRAME",
    "parse_manifest_position",
    "parse_tarsplit_position",
    "parse_footer",
    "encode_footer",
]

MANIFEST_TYPE_CRFS = 1
MAGIC_V1 = b"GnUlInUx"  # 40- and 56-byte footers
MAGIC_V2 = b"GNUlInUx"  # 64-byte footer
FOOTER_SIZES = (64, 56, 40)
MAX_FOOTER_FRAME = SKIPPABLE_HEADER_SIZE + max(FOOTER_SIZES)
_MAX_U63 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Section:
    """One skippable-frame section: its payload's blob offset and sizes."""

    offset: int  # blob offset of the payload (frame start + 8)
    length: int  # compressed payload bytes
    uncompressed: int  # declared size once decompressed

    @property
    def frame_start(self) -> int:
        return self.offset - SKIPPABLE_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Layout:
    toc: Section
    tar_split: Section | None = None

    def start(self) -> int:
        """Where the metadata frames begin, i.e. where the data frames must have ended."""
        starts = [self.toc.frame_start]
        if self.tar_split is not None:
            starts.append(self.tar_split.frame_start)
        return min(starts)


def parse_manifest_position(text: str) -> Section:
    """``<offset>:<length>:<uncompressed length>:<type>`` (the manifest-position annotation)."""
    values = _numbers(text, 4, "manifest-position")
    if values[3] != MANIFEST_TYPE_CRFS:
        raise FooterError(f"manifest-position: unsupported manifest type {values[3]}")
    return _section(*values[:3], what="manifest-position")


def parse_tarsplit_position(text: str) -> Section:
    """``<offset>:<length>:<uncompressed length>`` (the tarsplit-position annotation)."""
    return _section(*_numbers(text, 3, "tarsplit-position"), what="tarsplit-position")


def parse_footer(tail: bytes, blob_size: int) -> Layout:
    """The layout recorded in the footer frame that ends *tail* (the blob's last bytes).

    Raises FooterError if no known footer is there or its numbers do not fit the blob.
    """
    problems: list[str] = []
    for size in FOOTER_SIZES:
        frame = SKIPPABLE_HEADER_SIZE + size
        if len(tail) < frame or blob_size < frame:
            continue
        head = tail[-frame:]
        if not is_skippable_magic(head) or struct.unpack_from("<I", head, 4)[0] != size:
            problems.append(f"no {size}-byte footer frame")
            continue
        try:
            return _decode(head[SKIPPABLE_HEADER_SIZE:], blob_size - frame)
        except FooterError as exc:
            problems.append(str(exc))
    raise FooterError("no zstd:chunked footer: " + "; ".join(problems or ["blob too small"]))


def encode_footer(layout: Layout) -> bytes:
    """The 64-byte footer (without its skippable frame header) for *layout* (tests, tools)."""
    ts = layout.tar_split or Section(0, 0, 0)
    toc = layout.toc
    return struct.pack(
        "<7Q", toc.offset, toc.length, toc.uncompressed, MANIFEST_TYPE_CRFS,
        ts.offset, ts.length, ts.uncompressed,
    ) + MAGIC_V2


def _decode(payload: bytes, footer_start: int) -> Layout:
    size = len(payload)
    offset, length, uncompressed, mtype = struct.unpack_from("<4Q", payload)
    tar_split: Section | None = None
    if size == 64:
        if payload[56:] != MAGIC_V2:
            raise FooterError("64-byte footer: magic 'GNUlInUx' missing")
        ts_offset, ts_length, ts_uncompressed = struct.unpack_from("<3Q", payload, 32)
        if ts_offset:
            tar_split = _section(ts_offset, ts_length, ts_uncompressed, what="footer tar-split")
    elif size == 56:
        if payload[32:40] != MAGIC_V1 or payload[40:] != bytes(16):
            raise FooterError("56-byte footer: magic 'GnUlInUx' missing")
    elif payload[32:] != MAGIC_V1:
        raise FooterError("40-byte footer: magic 'GnUlInUx' missing")
    if mtype != MANIFEST_TYPE_CRFS:
        raise FooterError(f"{size}-byte footer: unsupported manifest type {mtype}")
    layout = Layout(_section(offset, length, uncompressed, what="footer TOC"), tar_split)
    for section in (layout.toc, layout.tar_split):
        if section is not None and section.end > footer_start:
            raise FooterError(f"{size}-byte footer: section {section} overlaps the footer")
    return layout


def _numbers(text: str, count: int, what: str) -> list[int]:
    parts = text.split(":")
    # isdigit alone would accept non-ASCII digits; the values are plain decimal.
    if len(parts) != count or not all(p.isascii() and p.isdigit() for p in parts):
        raise FooterError(f"{what}: expected {count} decimal numbers, got {text[:80]!r}")
    return [int(p) for p in parts]


def _section(offset: int, length: int, uncompressed: int, *, what: str) -> Section:
    if not SKIPPABLE_HEADER_SIZE <= offset <= _MAX_U63 or not 0 < length <= _MAX_U63:
        raise FooterError(f"{what}: offset {offset} / length {length} out of range")
    if not 0 <= uncompressed <= _MAX_U63:
        raise FooterError(f"{what}: uncompressed length {uncompressed} out of range")
    return Section(offset, length, uncompressed)
