"""Deterministic converter: tar (plain, gzip or zstd) -> eStargz blob.

Layout per estargz-format.md §2.1/§2.2 (member boundaries), §2.4 (chunking), §3 (TOC),
§3.6 (innerOffset with min_chunk_size), §4.1 (footer), §7 (landmarks). Same input and
options give the same bytes: gzip members carry mtime 0 and OS 255, the TOC JSON is
serialised with a fixed layout and nothing depends on time or parallelism.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO

from store.digest import sha256_of
from store.errors import FormatError, TocError
from store.estargz.footer import encode_footer
from store.estargz.toc import (
    LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_NAME,
    normalize_name,
    parse_toc_json,
)

__all__ = ["BuildResult", "build_estargz", "build_estargz_bytes", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 4 << 20  # §2.4
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SPOOL_IN_MEMORY = 64 << 20
_READ_PIECE = 1 << 20
_EOF_BLOCKS = b"\x00" * 1024
_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
# Names the converter owns: an input copy is dropped and the right one re-emitted (§7).
_RESERVED = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
# PAX records that tarfile regenerates from the header fields when writing.
_REGENERATED_PAX = frozenset(
    {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "hdrcharset"}
)
_XATTR_PREFIX = "SCHILY.xattr."


@dataclass(frozen=True, slots=True)
class BuildResult:
    toc_digest: str  # sha256 of the TOC JSON: the toc.digest annotation (§5.1)
    diff_id: str  # sha256 of the whole decompressed blob (§2.2: not the input's DiffID)
    uncompressed_size: int  # length of that stream (§5.2)
    blob_digest: str
    blob_size: int
    toc_entries: int  # JSON entries incl. chunk entries and the landmark


def build_estargz(
    src: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression_level: int = 9,
    prioritized: Sequence[str] | None = None,
    min_chunk_size: int = 0,
) -> BuildResult:
    """Convert the tar stream *src* into an eStargz blob written to *out*.

    *src* may be a plain, gzip- or zstd-compressed tar (sniffed by magic, §10).
    *prioritized* lists paths to put first, followed by ``.prefetch.landmark``; without it
    ``.no.prefetch.landmark`` comes first (§7). ``chunk_size=0`` means the 4 MiB default.
    Raises FormatError for input it cannot convert faithfully; *out* is then garbage.
    """
    if chunk_size == 0:
        chunk_size = DEFAULT_CHUNK_SIZE
    if chunk_size < 0 or min_chunk_size < 0:
        raise ValueError("chunk_size and min_chunk_size must not be negative")
    if not -1 <= compression_level <= 9:
        raise ValueError(f"gzip compression level {compression_level} not in -1..9")
    with _open_tar(src) as tar_file:
        entries = _read_entries(tar_file)
        order = _order(entries, list(prioritized or ()))
        builder = _Builder(out, tar_file, chunk_size, compression_level, min_chunk_size)
        return builder.run(order)


def build_estargz_bytes(tar: bytes, **options: Any) -> tuple[bytes, BuildResult]:
    """In-memory convenience wrapper around build_estargz."""
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(tar), out, **options)
    return out.getvalue(), result


# ---------------------------------------------------------------------------- input


@dataclass(slots=True)
class _Entry:
    info: tarfile.TarInfo
    path: str  # normalised
    kind: str  # TOC type
    xattrs: dict[str, bytes]
    landmark: bool = False


@contextmanager
def _open_tar(src: BinaryIO) -> Iterator[IO[bytes]]:
    """A seekable file with the decompressed tar: *src* itself or a spooled copy."""
    head = _read_up_to(src, 4)
    if head[:2] != _GZIP_MAGIC and head != _ZSTD_MAGIC and _seekable(src):
        src.seek(-len(head), io.SEEK_CUR)
        yield src
        return
    # tarfile needs random access for reordering; stay in memory for small layers.
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        _decompress_into(io.BufferedReader(_Prefixed(head, src)), head, spool)
        spool.seek(0)
        yield spool


def _decompress_into(raw: BinaryIO, head: bytes, dest: IO[bytes]) -> None:
    try:
        if head[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as inflated:
                shutil.copyfileobj(inflated, dest)
        elif head == _ZSTD_MAGIC:
            import zstandard  # only needed for zstd input

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            try:
                shutil.copyfileobj(reader, dest)
            except zstandard.ZstdError as exc:
                raise FormatError(f"corrupt zstd input: {exc}") from None
        else:
            shutil.copyfileobj(raw, dest)
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError(f"cannot decompress input: {exc}") from None


class _Prefixed(io.RawIOBase):
    """*head* (already consumed for sniffing) followed by the rest of *rest*."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _read_up_to(src: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = src.read(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _read_entries(tar_file: IO[bytes]) -> list[_Entry]:
    """All input entries in order; reserved names dropped, duplicates keep the last (§7)."""
    start = tar_file.tell()
    if not _read_up_to(tar_file, 1):
        return []  # an empty layer; tarfile calls that a ReadError
    tar_file.seek(start)
    try:
        with tarfile.open(
            fileobj=tar_file, mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as archive:
            infos = archive.getmembers()
            end, global_pax = archive.offset, archive.pax_headers
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise FormatError(f"input is not a valid tar: {exc}") from None
    _check_clean_end(tar_file, end)
    if global_pax:
        raise FormatError("unsupported input: PAX global header (§3.4)")
    by_path: dict[str, int] = {}
    entries: list[_Entry | None] = []
    for info in infos:
        entry = _entry_from(info)
        if entry.path in _RESERVED:
            continue
        if entry.path in by_path:
            entries[by_path[entry.path]] = None  # a later entry replaces an earlier one
        by_path[entry.path] = len(entries)
        entries.append(entry)
    return [e for e in entries if e is not None]


def _check_clean_end(tar_file: IO[bytes], offset: int) -> None:
    # tarfile treats a corrupt header after the first member as end of archive; a
    # converter must not silently drop the rest, so only zero blocks (or EOF) may follow.
    tar_file.seek(offset)
    block = _read_up_to(tar_file, 512)
    if block.strip(b"\x00"):
        raise FormatError(f"invalid tar header at input offset {offset}")


def _entry_from(info: tarfile.TarInfo) -> _Entry:
    kind = _TAR_TYPES.get(info.type)
    if kind is None or info.sparse is not None:
        raise FormatError(f"unsupported input tar entry {info.name!r} (type {info.type!r})")
    for text in (info.name, info.linkname, info.uname, info.gname):
        _require_utf8(text, info.name)
    try:
        path = normalize_name(info.name)
        if kind == "hardlink":
            normalize_name(info.linkname)
    except TocError as exc:
        raise FormatError(f"input tar entry: {exc}") from None
    if path == "" and kind != "dir":
        raise FormatError(f"input tar entry {info.name!r} names the root but is a {kind}")
    xattrs: dict[str, bytes] = {}
    for key in sorted(info.pax_headers):
        if key.startswith(_XATTR_PREFIX) and len(key) > len(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX) :]
            _require_utf8(name, info.name)
            # tarfile decodes PAX values with surrogateescape: recover the raw bytes.
            xattrs[name] = info.pax_headers[key].encode("utf-8", "surrogateescape")
    return _Entry(info, path, kind, xattrs)


def _require_utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # The TOC is JSON: a non-UTF-8 name could not be recorded faithfully.
        raise FormatError(f"non-UTF-8 name or field in input entry {where!r}") from None


def _order(entries: list[_Entry], prioritized: list[str]) -> list[_Entry]:
    """§7 layout: [no-prefetch landmark, all] or [prioritized (+deps), landmark, rest]."""
    if not prioritized:
        return [_landmark_entry(NO_PREFETCH_LANDMARK), *entries]
    by_path = {e.path: e for e in entries}
    placed: set[str] = set()
    first: list[_Entry] = []

    def place(path: str) -> None:
        if path in placed:
            return
        placed.add(path)  # before recursing: a hardlink cycle must not loop
        entry = by_path[path]
        parts = path.split("/") if path else []
        for depth in range(len(parts)):  # parent directories first, root included
            parent = "/".join(parts[:depth])
            if parent in by_path and parent not in placed:
                placed.add(parent)
                first.append(by_path[parent])
        if entry.kind == "hardlink":
            target = normalize_name(entry.info.linkname)
            if target not in by_path:
                raise FormatError(f"hardlink {entry.info.name!r} to missing {target!r}")
            place(target)
        first.append(entry)

    for raw_path in prioritized:
        try:
            path = normalize_name(raw_path)
        except TocError as exc:
            raise FormatError(f"prioritized path: {exc}") from None
        if path not in by_path:
            raise FormatError(f"prioritized file {raw_path!r} is not in the layer")
        place(path)
    rest = [e for e in entries if e.path not in placed]
    return [*first, _landmark_entry(PREFETCH_LANDMARK), *rest]


def _landmark_entry(name: str) -> _Entry:
    # §7: size 1, payload 0x0F, no mode/uid/mtime in the header.
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENT)
    info.mode = 0
    info.mtime = 0
    return _Entry(info, name, "reg", {}, landmark=True)


# ---------------------------------------------------------------------------- output


class _Sink:
    """Counts and hashes every blob byte written to *out*."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.hash.update(data)
            self.size += len(data)


class _MemberWriter:
    """The decompressed tar stream, cut into gzip members on request (§2.2)."""

    def __init__(self, sink: _Sink, level: int) -> None:
        self.sink = sink
        self.level = level
        # §2.3: XFL is informative only; mirror gzip's convention.
        xfl = {9: 2, 1: 4}.get(level, 0)
        self.header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl]) + b"\xff"
        self.diff = hashlib.sha256()
        self.total = 0  # uncompressed bytes of the whole stream
        self.start = 0  # blob offset of the open member
        self.usize = 0  # uncompressed bytes written to the open member
        self._crc = 0
        self._z: Any = None

    @property
    def is_open(self) -> bool:
        return self._z is not None

    @property
    def compressed(self) -> int:
        """Compressed bytes the open member holds so far (zlib buffers, so it lags)."""
        return self.sink.size - self.start

    def new_member(self) -> None:
        self.close()
        self.start = self.sink.size
        self.usize = 0
        self._crc = 0
        self._z = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.sink.write(self.header)

    def write(self, data: bytes) -> None:
        if self._z is None:
            self.new_member()
        self.sink.write(self._z.compress(data))
        self._crc = zlib.crc32(data, self._crc)
        self.usize += len(data)
        self.diff.update(data)
        self.total += len(data)

    def close(self) -> None:
        if self._z is None:
            return
        self.sink.write(self._z.flush())
        self.sink.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self.usize & 0xFFFFFFFF))
        self._z = None


class _Builder:
    def __init__(
        self,
        out: BinaryIO,
        tar_file: IO[bytes],
        chunk_size: int,
        level: int,
        min_chunk_size: int,
    ) -> None:
        self.sink = _Sink(out)
        self.members = _MemberWriter(self.sink, level)
        self.tar_file = tar_file
        self.chunk_size = chunk_size
        self.min_chunk_size = min_chunk_size
        self.toc: list[dict[str, Any]] = []
        self.user_names: dict[int, str] = {}
        self.group_names: dict[int, str] = {}

    def run(self, order: list[_Entry]) -> BuildResult:
        for entry in order:
            self.write_entry(entry)
        toc_json = json.dumps({"version": 1, "entries": self.toc}, indent="\t", ensure_ascii=False)
        toc_bytes = toc_json.encode("utf-8")
        # §2.1 rule 3: the TOC tar header starts a member, which also ends the tar (§2.2).
        self.members.new_member()
        toc_offset = self.members.start
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(toc_bytes)
        info.mode = 0
        self.members.write(_header(info, TOC_NAME))
        self.members.write(toc_bytes + _padding(len(toc_bytes)) + _EOF_BLOCKS)
        self.members.close()
        self.sink.write(encode_footer(toc_offset))
        try:
            # Never hand out a blob our own reader would refuse.
            parse_toc_json(toc_bytes, toc_offset=toc_offset)
        except TocError as exc:
            raise FormatError(f"input cannot be represented as eStargz: {exc}") from None
        return BuildResult(
            toc_digest=sha256_of(toc_bytes),
            diff_id="sha256:" + self.members.diff.hexdigest(),
            uncompressed_size=self.members.total,
            blob_digest="sha256:" + self.sink.hash.hexdigest(),
            blob_size=self.sink.size,
            toc_entries=len(self.toc),
        )

    def write_entry(self, entry: _Entry) -> None:
        src = entry.info
        info = tarfile.TarInfo(src.name)
        info.type = tarfile.REGTYPE if entry.kind == "reg" else src.type
        info.size = src.size if entry.kind == "reg" else 0
        info.mode, info.uid, info.gid = src.mode, src.uid, src.gid
        info.uname, info.gname, info.mtime = src.uname, src.gname, src.mtime
        info.linkname = src.linkname
        info.devmajor, info.devminor = src.devmajor, src.devminor
        info.pax_headers = {k: v for k, v in src.pax_headers.items() if k not in _REGENERATED_PAX}
        # PAX/GNU long-name records go right before the header, in the same member (§2.2).
        self.members.write(_header(info, src.name))
        chunks: list[_ChunkOut] = []
        digest = None
        if entry.kind == "reg":
            digest, chunks = self.write_payload(entry)
        rec = self.toc_record(entry, info, digest, chunks[0] if chunks else None)
        self.toc.append(rec)
        for chunk in chunks[1:]:
            self.toc.append(chunk.record(rec["name"]))

    def toc_record(
        self, entry: _Entry, info: tarfile.TarInfo, digest: str | None, first: _ChunkOut | None
    ) -> dict[str, Any]:
        # Key order and omitempty follow the reference writer (§3.2).
        name = info.name + "/" if entry.kind == "dir" and not info.name.endswith("/") else info.name
        rec: dict[str, Any] = {"name": name, "type": entry.kind}
        if info.size:
            rec["size"] = info.size
        modtime = _format_modtime(info.mtime)
        if modtime:
            rec["modtime"] = modtime
        if entry.kind in ("symlink", "hardlink"):
            rec["linkName"] = info.linkname
        if info.mode & 0o7777:
            rec["mode"] = info.mode & 0o7777
        if info.uid:
            rec["uid"] = info.uid
        if info.gid:
            rec["gid"] = info.gid
        # userName/groupName only when they change for an id (§3.3).
        if info.uname and self.user_names.get(info.uid) != info.uname:
            rec["userName"] = self.user_names[info.uid] = info.uname
        if info.gname and self.group_names.get(info.gid) != info.gname:
            rec["groupName"] = self.group_names[info.gid] = info.gname
        if first is not None:
            rec["offset"] = first.offset
            if first.inner_offset:
                rec["innerOffset"] = first.inner_offset
        if entry.kind in ("char", "block"):
            if info.devmajor:
                rec["devMajor"] = info.devmajor
            if info.devminor:
                rec["devMinor"] = info.devminor
        if entry.xattrs:
            rec["xattrs"] = {k: _b64(v) for k, v in sorted(entry.xattrs.items())}
        if digest is not None:
            rec["digest"] = digest  # also for empty files (§3.3)
        if first is not None:
            if first.full:
                rec["chunkSize"] = first.size
            rec["chunkDigest"] = first.digest
        return rec

    def write_payload(self, entry: _Entry) -> tuple[str, list[_ChunkOut]]:
        size = entry.info.size
        file_hash = hashlib.sha256()
        chunks: list[_ChunkOut] = []
        if not entry.landmark:
            self.tar_file.seek(entry.info.offset_data)
        for chunk_start in range(0, size, self.chunk_size):
            length = min(self.chunk_size, size - chunk_start)
            offset, inner = self.start_chunk(entry.landmark)
            chunk_hash = hashlib.sha256()
            for piece in self.payload_pieces(entry, length):
                file_hash.update(piece)
                chunk_hash.update(piece)
                self.members.write(piece)
            digest = "sha256:" + chunk_hash.hexdigest()
            full = length == self.chunk_size
            chunks.append(_ChunkOut(chunk_start, length, full, offset, inner, digest))
        self.members.write(_padding(size))
        return "sha256:" + file_hash.hexdigest(), chunks

    def start_chunk(self, landmark: bool) -> tuple[int, int]:
        """Start a member for the next chunk, or share the open one (§3.6)."""
        members = self.members
        share = (
            self.min_chunk_size > 0
            and not landmark  # §7: landmark payloads always start a member
            and members.is_open
            and members.compressed < self.min_chunk_size
        )
        if share:
            return members.start, members.usize
        members.new_member()
        return members.start, 0

    def payload_pieces(self, entry: _Entry, length: int) -> Iterator[bytes]:
        if entry.landmark:
            yield LANDMARK_CONTENT
            return
        remaining = length
        while remaining:
            piece = self.tar_file.read(min(remaining, _READ_PIECE))
            if not piece:
                raise FormatError(f"input ends inside {entry.info.name!r}")
            remaining -= len(piece)
            yield piece


@dataclass(frozen=True, slots=True)
class _ChunkOut:
    file_offset: int
    size: int
    full: bool  # exactly chunk_size bytes: chunkSize is recorded (§3.3)
    offset: int
    inner_offset: int
    digest: str

    def record(self, name: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"name": name, "type": "chunk", "offset": self.offset}
        if self.inner_offset:
            rec["innerOffset"] = self.inner_offset
        rec["chunkOffset"] = self.file_offset
        if self.full:
            rec["chunkSize"] = self.size
        rec["chunkDigest"] = self.digest
        return rec


def _header(info: tarfile.TarInfo, name: str) -> bytes:
    try:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError as exc:  # e.g. device numbers too large for the header
        raise FormatError(f"cannot write tar header for {name!r}: {exc}") from None


def _padding(size: int) -> bytes:
    return b"\x00" * (-size % 512)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _format_modtime(mtime: float) -> str | None:
    """UTC RFC 3339 with second precision; None for 0/epoch (§3.3 modtime)."""
    seconds = int(mtime // 1)
    if seconds == 0:
        return None
    if mtime - seconds >= 0.5:  # round half up, like Go's Time.Round(time.Second)
        seconds += 1
    try:
        when = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
        f"T{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"
    )
