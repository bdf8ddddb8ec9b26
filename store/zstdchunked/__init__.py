"""zstd:chunked layers: containers/storage's format (Podman's `--compression-format
zstd:chunked`) and stargz-snapshotter's zstd eStargz (`ctr-remote --zstdchunked`).

Pure code like store.estargz: no network, no FUSE, no logging; I/O goes through a
``read_at(offset, length)`` seam. The TOC becomes the same store.estargz Toc/TocEntry/Chunk
structures, so the overlay view and the FUSE front serve both formats unchanged; chunks are
decoded with :func:`decode_chunk` instead of the gzip one. Reference: estargz-format.md §9.
"""

from __future__ import annotations

from store.zstdchunked.footer import (
    Layout,
    Section,
    encode_footer,
    parse_footer,
    parse_manifest_position,
    parse_tarsplit_position,
)
from store.zstdchunked.frames import frame_end, skippable_frame
from store.zstdchunked.reader import (
    ChunkedToc,
    ReadAt,
    TocDigests,
    decode_chunk,
    open_toc,
    tar_size_from_tar_split,
    uncompressed_size,
)
from store.zstdchunked.toc import ParsedToc, Region, parse_time_ns, parse_toc

__all__ = [
    "Layout",
    "Section",
    "encode_footer",
    "parse_footer",
    "parse_manifest_position",
    "parse_tarsplit_position",
    "frame_end",
    "skippable_frame",
    "ChunkedToc",
    "ReadAt",
    "TocDigests",
    "decode_chunk",
    "open_toc",
    "tar_size_from_tar_split",
    "uncompressed_size",
    "ParsedToc",
    "Region",
    "parse_time_ns",
    "parse_toc",
]
