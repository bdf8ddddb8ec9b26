"""zstd frames as zstd:chunked uses them (RFC 8878 §3.1): walking, skippable frames, bounded
decompression.

A zstd:chunked blob is a sequence of ordinary zstd frames (tar headers, file payloads) followed
by skippable frames that carry the TOC, the tar-split and the footer. Walking frame and block
headers finds exact frame boundaries without decompressing; decompression here is always bounded
by the number of bytes the caller needs, so a hostile blob cannot make it allocate without limit.
"""

from __future__ import annotations

import struct

import zstandard

from store.errors import FormatError

__all__ = [
    "ZSTD_MAGIC",
    "SKIPPABLE_MAGIC",
    "SKIPPABLE_HEADER_SIZE",
    "skippable_frame",
    "is_skippable_magic",
    "frame_end",
    "decompress_prefix",
    "decompress_exact",
    "decompressed_length",
]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# The skippable magic c/storage and stargz write (0x184D2A50); RFC 8878 allows ...50 to ...5F.
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER_SIZE = 8  # magic + u32le payload length
_MAX_BLOCK = 128 << 10  # Block_Maximum_Size
_READ_PIECE = 1 << 20


def skippable_frame(payload: bytes) -> bytes:
    """*payload* wrapped in a skippable frame (what the writers put around TOC and footer)."""
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def is_skippable_magic(data: bytes | memoryview) -> bool:
    if len(data) < 4:
        return False
    value = struct.unpack_from("<I", data)[0]
    return value & 0xFFFFFFF0 == 0x184D2A50


def frame_end(data: bytes | memoryview, pos: int) -> int:
    """Offset just past the frame (ordinary or skippable) that starts at *pos* in *data*.

    Only headers are read: the frame header, every 3-byte block header and the optional
    checksum. Raises FormatError for anything that is not a complete frame.
    """
    view = memoryview(data)
    size = len(view)
    if pos + 4 > size:
        raise FormatError(f"truncated zstd frame at {pos}")
    if is_skippable_magic(view[pos : pos + 4]):
        if pos + SKIPPABLE_HEADER_SIZE > size:
            raise FormatError(f"truncated skippable frame header at {pos}")
        length = struct.unpack_from("<I", view, pos + 4)[0]
        end = pos + SKIPPABLE_HEADER_SIZE + length
        if end > size:
            raise FormatError(f"skippable frame at {pos} runs past the data")
        return end
    if view[pos : pos + 4] != ZSTD_MAGIC:
        raise FormatError(f"no zstd frame at {pos}")
    p = pos + 4
    if p >= size:
        raise FormatError(f"truncated zstd frame header at {pos}")
    fhd = view[p]
    p += 1
    if fhd & 0x08:
        raise FormatError(f"zstd frame at {pos}: reserved header bit set")
    single_segment = bool(fhd & 0x20)
    checksum = bool(fhd & 0x04)
    dict_id_size = (0, 1, 2, 4)[fhd & 0x03]
    fcs_flag = fhd >> 6
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    p += (0 if single_segment else 1) + dict_id_size + fcs_size
    while True:
        if p + 3 > size:
            raise FormatError(f"zstd frame at {pos}: truncated block header at {p}")
        header = view[p] | (view[p + 1] << 8) | (view[p + 2] << 16)
        p += 3
        last = header & 1
        block_type = (header >> 1) & 3
        block_size = header >> 3
        if block_type == 3:
            raise FormatError(f"zstd frame at {pos}: reserved block type at {p - 3}")
        if block_size > _MAX_BLOCK:
            raise FormatError(f"zstd frame at {pos}: block of {block_size} bytes at {p - 3}")
        p += 1 if block_type == 1 else block_size  # RLE blocks hold one byte
        if p > size:
            raise FormatError(f"zstd frame at {pos}: block runs past the data")
        if last:
            break
    if checksum:
        p += 4
        if p > size:
            raise FormatError(f"zstd frame at {pos}: truncated checksum")
    return p


def decompress_prefix(raw: bytes | memoryview, length: int) -> bytes:
    """The first *length* bytes of the decompressed stream of the frames in *raw*.

    Frames are crossed as needed; decompression stops once *length* bytes are out, so *raw*
    may run past the data of interest (a following header frame, say).
    """
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    data = _read(reader, length)
    if len(data) < length:
        raise FormatError(f"zstd data ended after {len(data)} of {length} bytes")
    return data


def decompress_exact(raw: bytes | memoryview, length: int, what: str) -> bytes:
    """Decompress frames that must hold exactly *length* bytes (the TOC, the tar-split)."""
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    data = _read(reader, length)
    if len(data) != length:
        raise FormatError(f"{what} decompresses to {len(data)} bytes, {length} declared")
    if _read(reader, 1):
        raise FormatError(f"{what} decompresses to more than the {length} bytes declared")
    return data


def _read(reader: zstandard.ZstdDecompressionReader, length: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    try:
        while have < length:
            piece = reader.read(length - have)
            if not piece:
                break
            parts.append(piece)
            have += len(piece)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd data: {exc}") from None
    return b"".join(parts)


def decompressed_length(raw: bytes | memoryview, *, limit: int) -> int:
    """Total decompressed size of the complete frames filling *raw* exactly.

    The frames are walked first (so a truncated or trailing partial frame is an error, not a
    short count), then decompressed piecewise and counted, never holding more than one piece.
    More than *limit* bytes is an error.
    """
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        pos = frame_end(view, pos)
    reader = zstandard.ZstdDecompressor().stream_reader(view, read_across_frames=True)
    total = 0
    try:
        while piece := reader.read(_READ_PIECE):
            total += len(piece)
            if total > limit:
                raise FormatError(f"zstd data decompresses to more than {limit} bytes")
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd data: {exc}") from None
    return total
