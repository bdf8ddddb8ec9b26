"""The eStargz layer format: footer, TOC, verified chunk decoding and a tar converter.

Pure code: no network, no FUSE, no logging. Errors are the typed ones of store.errors.
Reference: shared/reference/estargz-format.md.
"""

from __future__ import annotations

from store.estargz.footer import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    detect_footer,
    encode_footer,
    parse_footer,
)
from store.estargz.reader import (
    DEFAULT_MAX_TOC_SIZE,
    DEFAULT_TAIL_GUESS,
    ReadAt,
    TocBlob,
    decode_chunk,
    inflate_prefix,
    iter_members,
    open_toc,
    read_toc_bytes,
)
from store.estargz.toc import (
    ENTRY_TYPES,
    LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    ROOT_ID,
    TOC_NAME,
    Chunk,
    Node,
    Toc,
    TocEntry,
    normalize_name,
    parse_toc_json,
)
from store.estargz.writer import (
    DEFAULT_CHUNK_SIZE,
    BuildResult,
    build_estargz,
    build_estargz_bytes,
)

__all__ = [
    # footer
    "FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "encode_footer",
    "parse_footer",
    "detect_footer",
    # toc
    "Chunk",
    "TocEntry",
    "Node",
    "Toc",
    "parse_toc_json",
    "normalize_name",
    "ROOT_ID",
    "TOC_NAME",
    "PREFETCH_LANDMARK",
    "NO_PREFETCH_LANDMARK",
    "LANDMARK_CONTENT",
    "ENTRY_TYPES",
    # reader
    "ReadAt",
    "TocBlob",
    "open_toc",
    "read_toc_bytes",
    "decode_chunk",
    "inflate_prefix",
    "iter_members",
    "DEFAULT_TAIL_GUESS",
    "DEFAULT_MAX_TOC_SIZE",
    # writer
    "BuildResult",
    "build_estargz",
    "build_estargz_bytes",
    "DEFAULT_CHUNK_SIZE",
]
