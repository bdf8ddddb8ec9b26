"""A small DSL to build tar archives in memory (with tarfile) and to summarise them.

    tar = (
        TarBuilder(prefix="./")
        .dir("etc/")
        .file("etc/passwd", b"root:x:0:0", mode=0o644, uid=0, uname="root")
        .symlink("bin/sh", "busybox")
        .hardlink("bin/ls", "bin/busybox")
        .char("dev/null", 1, 3)
        .file("usr/bin/ping", b"...", xattrs={"security.capability": b"\\x01\\x00"})
        .build()
    )

Every method returns the builder; *prefix* is prepended to entry names and hardlink
targets (the reference suite runs each case with "", "./" and "/").
"""

from __future__ import annotations

import gzip
import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import zstandard

DEFAULT_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
RESERVED = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


class TarBuilder:
    def __init__(self, *, format: int = tarfile.PAX_FORMAT, prefix: str = "") -> None:
        self.format = format
        self.prefix = prefix
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    # -- entry kinds -------------------------------------------------------------------

    def file(self, name: str, data: bytes = b"", *, mode: int = 0o644, **meta: Any) -> TarBuilder:
        info = self._info(name, tarfile.REGTYPE, mode, meta)
        info.size = len(data)
        return self._add(info, data)

    def dir(self, name: str, *, mode: int = 0o755, **meta: Any) -> TarBuilder:
        return self._add(self._info(name, tarfile.DIRTYPE, mode, meta))

    def symlink(self, name: str, target: str, *, mode: int = 0o777, **meta: Any) -> TarBuilder:
        info = self._info(name, tarfile.SYMTYPE, mode, meta)
        info.linkname = target  # verbatim: symlink targets are not prefixed
        return self._add(info)

    def hardlink(self, name: str, target: str, *, mode: int = 0o644, **meta: Any) -> TarBuilder:
        info = self._info(name, tarfile.LNKTYPE, mode, meta)
        info.linkname = self.prefix + target
        return self._add(info)

    def char(
        self, name: str, major: int, minor: int, *, mode: int = 0o666, **meta: Any
    ) -> TarBuilder:
        return self._device(name, tarfile.CHRTYPE, major, minor, mode, meta)

    def block(
        self, name: str, major: int, minor: int, *, mode: int = 0o660, **meta: Any
    ) -> TarBuilder:
        return self._device(name, tarfile.BLKTYPE, major, minor, mode, meta)

    def fifo(self, name: str, *, mode: int = 0o644, **meta: Any) -> TarBuilder:
        return self._add(self._info(name, tarfile.FIFOTYPE, mode, meta))

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> TarBuilder:
        """Add a hand-made TarInfo as is (no prefix, no defaults)."""
        return self._add(info, data)

    # -- output --------------------------------------------------------------------------

    def build(self, *, pax_global: dict[str, str] | None = None) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(
            fileobj=buf,
            mode="w",
            format=self.format,
            encoding="utf-8",
            errors="surrogateescape",
            pax_headers=pax_global,
        ) as archive:
            for info, data in self._entries:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def build_gzip(self) -> bytes:
        return gzip.compress(self.build(), mtime=0)

    def build_zstd(self) -> bytes:
        return zstandard.ZstdCompressor().compress(self.build())

    # -- internals -----------------------------------------------------------------------

    def _device(
        self, name: str, kind: bytes, major: int, minor: int, mode: int, meta: dict[str, Any]
    ) -> TarBuilder:
        info = self._info(name, kind, mode, meta)
        info.devmajor, info.devminor = major, minor
        return self._add(info)

    def _info(self, name: str, kind: bytes, mode: int, meta: dict[str, Any]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.prefix + name)
        info.type = kind
        info.mode = mode
        info.mtime = meta.pop("mtime", DEFAULT_MTIME)
        info.uid = meta.pop("uid", 0)
        info.gid = meta.pop("gid", 0)
        info.uname = meta.pop("uname", "")
        info.gname = meta.pop("gname", "")
        pax: dict[str, str] = dict(meta.pop("pax", {}))
        for key, value in meta.pop("xattrs", {}).items():
            # tarfile writes PAX values from str; surrogateescape keeps arbitrary bytes.
            pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        if meta:
            raise TypeError(f"unknown entry options {sorted(meta)}")
        return info

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> TarBuilder:
        self._entries.append((info, data))
        return self


@dataclass(frozen=True)
class Member:
    """What a tar reader sees of one entry, for comparing archives."""

    name: str
    type: bytes
    size: int
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]
    data: bytes


def members(tar: bytes, *, skip_reserved: bool = False) -> list[Member]:
    """Summaries of every entry of an (optionally gzip-compressed) tar, in order."""
    if tar[:2] == b"\x1f\x8b":
        tar = gzip.decompress(tar)
    out: list[Member] = []
    with tarfile.open(
        fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for info in archive:
            if skip_reserved and posixpath.normpath("/" + info.name).lstrip("/") in RESERVED:
                continue
            data = b""
            if info.isreg():
                extracted = archive.extractfile(info)
                assert extracted is not None
                data = extracted.read()
            is_dev = info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE)
            xattrs = tuple(
                sorted(
                    (k.removeprefix("SCHILY.xattr."), v.encode("utf-8", "surrogateescape"))
                    for k, v in info.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            out.append(
                Member(
                    name=info.name,
                    type=tarfile.REGTYPE if info.type == tarfile.AREGTYPE else info.type,
                    size=info.size if info.isreg() else 0,
                    mode=info.mode & 0o7777,
                    uid=info.uid,
                    gid=info.gid,
                    uname=info.uname,
                    gname=info.gname,
                    mtime=int(info.mtime),
                    linkname=info.linkname,
                    devmajor=info.devmajor if is_dev else 0,
                    devminor=info.devminor if is_dev else 0,
                    xattrs=xattrs,
                    data=data,
                )
            )
    return out
