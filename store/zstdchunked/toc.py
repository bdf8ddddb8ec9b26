"""The zstd:chunked TOC JSON, parsed into the same Toc/TocEntry/Chunk structures as eStargz.

Two writers produce it (estargz-format.md §9): containers/storage (``podman push
--compression-format zstd:chunked``) and stargz-snapshotter (``ctr-remote --zstdchunked``). Their
entries share the eStargz field names; containers/storage adds ``endOffset`` (where a file's last
data frame ends), ``chunkType`` (``zeros`` chunks are still stored as frames), ``accesstime`` /
``changetime`` and nanosecond ``modtime``s, and a top-level ``tarSplitDigest``. Payload bytes start
a new zstd frame at ``offset``; a chunk's compressed bytes run at most to the next data offset
(or to the metadata frames for the last one), exactly as eStargz's gzip members do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from store.digest import is_digest
from store.errors import TocError
from store.estargz.toc import (
    ENTRY_TYPES,
    Chunk,
    ChunkSpec,
    EntryDecoder,
    Toc,
    TocEntry,
    build_toc,
    json_int,
    json_str,
    resolve_blob_ends,
    resolve_chunks,
)

__all__ = ["Region", "ParsedToc", "parse_toc", "parse_time_ns"]

_CHUNK_TYPES = frozenset({"", "zeros"})
# RFC 3339 with optional fraction (Go marshals time.Time as RFC 3339 with nanoseconds).
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)


@dataclass(frozen=True, slots=True)
class Region:
    """The data frames of one file: ``[start, end)`` in the blob, *size* bytes once inflated."""

    start: int
    end: int
    size: int


@dataclass(frozen=True, slots=True)
class ParsedToc:
    toc: Toc
    tar_split_digest: str | None  # digest of the compressed tar-split frame payload
    # Every file's data frames, when every file with data records its endOffset
    # (containers/storage); None for stargz-snapshotter TOCs, which do not.
    regions: tuple[Region, ...] | None


def parse_toc(data: bytes, *, data_end: int) -> ParsedToc:
    """Parse TOC JSON (already digest-checked by the caller).

    *data_end* is where the metadata frames start: every data offset must lie below it, and it
    bounds the last chunk's compressed bytes.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TocError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TocError("TOC JSON is not an object")
    version = doc.get("version")
    if type(version) is not int or version != 1:
        raise TocError(f"unsupported TOC version {version!r}")
    raw_entries = doc.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise TocError("TOC 'entries' is not a list")
    tar_split = doc.get("tarSplitDigest")
    if tar_split is not None and (type(tar_split) is not str or not is_digest(tar_split)):
        raise TocError(f"invalid tarSplitDigest {str(tar_split)[:80]!r}")
    if data_end <= 0:
        raise TocError(f"no room for data before offset {data_end}")
    parser = _Parser(data_end)
    for index, raw in enumerate(raw_entries):
        try:
            parser.add(raw)
        except TocError as exc:
            raise TocError(f"TOC entry {index}: {exc}") from None
    parser.close_file()
    resolve_blob_ends(parser.data_chunks, data_end)
    regions = parser.regions()
    toc = build_toc(parser.entries, toc_offset=data_end)
    return ParsedToc(toc, tar_split or None, regions)


class _Parser:
    def __init__(self, data_end: int) -> None:
        self.data_end = data_end
        self.entries: list[TocEntry] = []
        self.data_chunks: list[Chunk] = []
        self.ends: list[tuple[TocEntry, int]] = []  # (file, endOffset or 0), files with data
        # same entry fields as eStargz; zstd:chunked keeps nanoseconds in modtime
        self.decoder = EntryDecoder(parse_time_ns)
        self.open: TocEntry | None = None
        self.open_end = 0
        self.specs: list[ChunkSpec] = []

    def add(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise TocError("entry is not an object")
        etype = json_str(raw, "type")
        if etype == "chunk":
            # A chunk continues the regular file right before it; its name is not used.
            if self.open is None:
                raise TocError("'chunk' entry does not follow a 'reg' entry")
            self.specs.append(_spec(raw))
            return
        if etype not in ENTRY_TYPES:
            raise TocError(f"unknown entry type {etype!r}")
        self.close_file()
        entry = self.decoder.entry(raw, etype)
        self.entries.append(entry)
        if etype == "reg":
            self.open = entry
            self.open_end = json_int(raw, "endOffset")
            self.specs = [_spec(raw)]

    def close_file(self) -> None:
        entry, specs, end = self.open, self.specs, self.open_end
        if entry is None:
            return
        self.open, self.specs, self.open_end = None, [], 0
        try:
            entry.chunks = resolve_chunks(entry, specs, self.data_end)
            if entry.chunks:
                if end and not entry.chunks[-1].blob_offset < end <= self.data_end:
                    raise TocError(f"endOffset {end} outside its data frames")
                self.ends.append((entry, end))
            elif end:
                raise TocError("empty file has an endOffset")
        except TocError as exc:
            raise TocError(f"{entry.name!r}: {exc}") from None
        self.data_chunks.extend(entry.chunks)

    def regions(self) -> tuple[Region, ...] | None:
        if any(end == 0 for _, end in self.ends):
            return None
        regions = tuple(Region(e.chunks[0].blob_offset, end, e.size) for e, end in self.ends)
        for chunk_end, (entry, end) in zip(_last_blob_ends(self.ends), self.ends, strict=True):
            if end > chunk_end:
                raise TocError(f"{entry.name!r}: endOffset {end} runs into the next data frame")
        return regions


def _spec(raw: dict[str, Any]) -> ChunkSpec:
    if json_str(raw, "chunkType") not in _CHUNK_TYPES:
        raise TocError(f"unknown chunkType {json_str(raw, 'chunkType')[:40]!r}")
    return ChunkSpec.parse(raw)  # same fields as eStargz chunk records


def _last_blob_ends(ends: list[tuple[TocEntry, int]]) -> list[int]:
    return [entry.chunks[-1].blob_end for entry, _ in ends]


# ---------------------------------------------------------------------------- fields


def parse_time_ns(text: str) -> int:
    """RFC 3339 (nanoseconds kept) -> ns since the epoch; absent, zero or invalid -> 0."""
    m = _TIME_RE.match(text) if text else None
    if m is None:
        return 0
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if year <= 1:  # Go's zero time (0001-01-01T00:00:00Z) means "not set"
        return 0
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return 0
    days = _days_from_civil(year, month, day)
    seconds = ((days * 24 + hour) * 60 + minute) * 60 + second
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        seconds -= offset if m.group(9) == "+" else -offset
    fraction = m.group(7) or ""
    return seconds * 1_000_000_000 + int(fraction.ljust(9, "0") or 0)


def _days_from_civil(year: int, month: int, day: int) -> int:
    # Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm).
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
