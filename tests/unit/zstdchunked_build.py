"""Build zstd:chunked blobs to spec, in memory, for tests (estargz-format.md §9 and the layouts
in store/zstdchunked/footer.py). Written from the format description, not from the writers'
code: every tar entry's header bytes go into the current zstd frame, a file's data starts a new
frame and every chunk of it is a frame of its own; the metadata follows in skippable frames.

Variants (what the real writers produce):

- ``podman5``: containers/storage >= 1.55 (Podman 5): TOC with ``tarSplitDigest``, tar-split,
  64-byte footer, ``io.github.containers.zstd-chunked.*`` annotations incl. tarsplit-position.
- ``podman48``: containers/storage 1.48-1.49: tar-split whose digest only the
  ``tarsplit-checksum`` annotation records, 56-byte footer.
- ``podman43``: containers/storage 1.43 (Podman 4.3): no tar-split, 40-byte footer,
  ``io.containers.zstd-chunked.*`` annotations.
- ``stargz``: stargz-snapshotter ``zstdchunked``: eStargz entries (chunkDigest everywhere, no
  endOffset), 40-byte footer, ``toc.digest`` of the JSON and the uncompressed-size annotation.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime

import zstandard

from store.zstdchunked.footer import Layout, Section, encode_footer
from store.zstdchunked.frames import skippable_frame

VARIANTS = ("podman5", "podman48", "podman43", "stargz")
GH = "io.github.containers.zstd-chunked."
OLD = "io.containers.zstd-chunked."
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class Built:
    blob: bytes
    annotations: dict[str, str]
    tar: bytes  # the blob's decompressed stream: the layer tar (DiffID preimage)
    toc_json: bytes
    toc_compressed: bytes
    layout: Layout

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _crc64_table() -> list[int]:
    poly = 0xD800000000000000  # ISO 3309, reflected
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64 = _crc64_table()


def crc64_iso(data: bytes) -> bytes:
    """tar-split's per-file checksum (hash/crc64, ISO table), big-endian as Go's Sum()."""
    crc = 0xFFFFFFFFFFFFFFFF
    table = _CRC64
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return struct.pack(">Q", crc ^ 0xFFFFFFFFFFFFFFFF)


def _rfc3339(mtime: float) -> str:
    ns = round(mtime * 1_000_000_000)
    secs, frac = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def build(
    tar: bytes,
    variant: str = "podman5",
    *,
    chunk_size: int = 64 * 1024,
    level: int = 3,
    mutate_toc=None,
    mutate_tar_split=None,
) -> Built:
    """A zstd:chunked blob of *tar* (whose bytes the blob decompresses to, exactly).

    *mutate_toc(doc)* / *mutate_tar_split(lines)* may change the metadata before it is
    compressed and digested (for tests of re-signed but inconsistent metadata).
    """
    if variant not in VARIANTS:
        raise ValueError(variant)
    cstorage = variant != "stargz"
    comp = zstandard.ZstdCompressor(level=level, write_content_size=False)
    out = bytearray()
    pending = bytearray()  # uncompressed bytes of the frame being built

    def flush() -> None:
        if pending:
            out.extend(comp.compress(bytes(pending)))
            pending.clear()

    entries: list[dict] = []
    split: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8") as archive:
        infos = list(archive)
    prev_end = 0
    for info in infos:
        header = tar[prev_end : info.offset_data]
        pending.extend(header)
        split.append({"type": 2, "payload": base64.b64encode(header).decode(), "position": 0})
        data = tar[info.offset_data : info.offset_data + info.size] if info.isreg() else b""
        entry: dict = {"type": _TYPES[info.type], "name": info.name}
        if info.linkname:
            entry["linkName"] = info.linkname
        if info.mode:
            entry["mode"] = info.mode
        if data:
            entry["size"] = len(data)
        for key, value in (("uid", info.uid), ("gid", info.gid)):
            if value:
                entry[key] = value
        if not cstorage:
            if info.uname:
                entry["userName"] = info.uname
            if info.gname:
                entry["groupName"] = info.gname
        entry["modtime"] = _rfc3339(info.mtime)
        if cstorage:
            entry["accesstime"] = entry["changetime"] = "0001-01-01T00:00:00Z"
        if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            entry["devMajor"], entry["devMinor"] = info.devmajor, info.devminor
        xattrs = {
            k.removeprefix("SCHILY.xattr."): base64.b64encode(
                v.encode("utf-8", "surrogateescape")
            ).decode()
            for k, v in info.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        if xattrs:
            entry["xattrs"] = xattrs
        chunk_entries: list[dict] = []
        if data:
            flush()
            entry["digest"] = sha(data)
            pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
            specs = []
            for i, piece in enumerate(pieces):
                offset = len(out)
                out.extend(comp.compress(piece))
                spec = {"offset": offset, "chunkSize": len(piece), "chunkOffset": i * chunk_size}
                spec["chunkDigest"] = sha(piece)
                if cstorage and not piece.strip(b"\0") and len(piece) >= 1024:
                    spec["chunkType"] = "zeros"
                specs.append(spec)
            entry["offset"] = specs[0]["offset"]
            if cstorage:
                entry["endOffset"] = len(out)
            if len(specs) > 1 or not cstorage:
                entry.update({k: v for k, v in specs[0].items() if k != "chunkOffset"})
                for spec in specs[1:]:
                    chunk_entries.append({"type": "chunk", "name": info.name, **spec})
        entries.append(entry)
        entries.extend(chunk_entries)
        file_line = {"type": 1, "name": info.name, "size": info.size if info.isreg() else 0}
        file_line["payload"] = base64.b64encode(crc64_iso(data)).decode() if data else None
        file_line["position"] = 0
        split.append(file_line)
        prev_end = info.offset_data + (info.size if info.isreg() else 0)
    trailer = tar[prev_end:]
    pending.extend(trailer)
    split.append({"type": 2, "payload": base64.b64encode(trailer).decode(), "position": 0})
    flush()
    for position, line in enumerate(split):
        line["position"] = position

    doc: dict = {"version": 1, "entries": entries}
    split_lines = [json.dumps(line, separators=(",", ":")) for line in split]
    if mutate_tar_split is not None:
        split_lines = mutate_tar_split(split_lines)
    split_raw = ("\n".join(split_lines) + "\n").encode()
    split_compressed = zstandard.ZstdCompressor(level=level).compress(split_raw)
    with_split = variant in ("podman5", "podman48")
    if variant == "podman5":
        doc["tarSplitDigest"] = sha(split_compressed)
    if mutate_toc is not None:
        mutate_toc(doc)
    toc_json = json.dumps(doc, separators=(",", ":")).encode()
    toc_compressed = zstandard.ZstdCompressor(level=level).compress(toc_json)

    toc = Section(len(out) + 8, len(toc_compressed), len(toc_json))
    out.extend(skippable_frame(toc_compressed))
    tar_split = None
    if with_split:
        tar_split = Section(len(out) + 8, len(split_compressed), len(split_raw))
        out.extend(skippable_frame(split_compressed))
    layout = Layout(toc, tar_split)
    head = struct.pack("<4Q", toc.offset, toc.length, toc.uncompressed, 1)
    if variant == "podman5":
        footer = encode_footer(layout)
    elif variant == "podman48":
        footer = head + b"GnUlInUx" + bytes(16)
    else:
        footer = head + b"GnUlInUx"
    out.extend(skippable_frame(footer))

    position = f"{toc.offset}:{toc.length}:{toc.uncompressed}:1"
    prefix = OLD if variant in ("podman43", "stargz") else GH
    annotations = {prefix + "manifest-checksum": sha(toc_compressed),
                   prefix + "manifest-position": position}
    if tar_split is not None:
        annotations[GH + "tarsplit-position"] = (
            f"{tar_split.offset}:{tar_split.length}:{tar_split.uncompressed}"
        )
    if variant == "podman48":
        annotations[GH + "tarsplit-checksum"] = sha(split_compressed)
    if variant == "stargz":
        annotations[TOC_DIGEST] = sha(toc_json)
        annotations[USIZE] = str(len(tar))
    return Built(bytes(out), annotations, tar, toc_json, toc_compressed, layout)
