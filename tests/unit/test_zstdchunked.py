"""store.zstdchunked: layouts, verified TOC, chunks, exact tar size, and the Resolver facts.

Blobs are built to spec by tests/unit/zstdchunked_build.py in every layout the real writers
produce (Podman 5, c/storage 1.48, Podman 4.3, stargz-snapshotter); blobs made by the real
`podman push --compression-format zstd:chunked` and `ctr-remote --zstdchunked` are checked in
tests/fuse/test_zstdchunked_mount.py. Every check runs both ways: good bytes verify, a flipped
byte (or a re-signed but wrong TOC) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
import zstandard

from store import oci, zstdchunked
from store.als import COMPRESSION_ZSTD, KeyKind, LayerRecord
from store.chunkcache import ChunkCache
from store.errors import (
    DigestMismatch,
    FooterError,
    FormatError,
    NotFound,
    NotLazyLayer,
    TocError,
)
from store.estargz.toc import Toc
from store.layer import RemoteLayer
from store.resolver import _find_layer, _lazy_facts
from store.zstdchunked.frames import decompressed_length, frame_end, skippable_frame
from tests.unit.tarbuild import TarBuilder, members
from tests.unit.zstdchunked_build import GH, OLD, TOC_DIGEST, USIZE, VARIANTS, Built, build

BIG = hashlib.shake_256(b"zstd:chunked big").digest(300 * 1024)
HOLEY = b"head" + bytes(200 * 1024) + b"tail"


def sample_tar(*, landmark: bool = False) -> bytes:
    tb = TarBuilder()
    if landmark:
        tb.file(".no.prefetch.landmark", b"\x0f")
    (
        tb.dir("etc")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", uid=0, uname="root")
        .file("etc/empty", b"")
        .dir("data", mode=0o1777)
        .file("data/big.bin", BIG)
        .file("data/holey.bin", HOLEY)
        .file("data/suid", b"#!/bin/sh\n", mode=0o4755)
        .file("data/owned", b"mine", uid=1000, gid=1000)
        .file("data/xattr", b"x", xattrs={"user.note": b"\xff\xfe bytes"})
        .symlink("data/link", "../etc/passwd")
        .hardlink("data/hard", "data/owned")
        .fifo("data/fifo")
        .char("dev/null", 1, 3)
        .file("opt/a.txt", b"first version")
        .file("opt/a.txt", b"replaced later in the tar")  # later entries win
    )
    for i in range(40):
        tb.file(f"data/small/f{i:02d}.txt", f"small file {i}\n".encode() * (i + 1))
    return tb.build()


def tar_of(variant: str) -> bytes:
    return sample_tar(landmark=variant == "stargz")


@pytest.fixture(scope="module", params=VARIANTS)
def built(request: pytest.FixtureRequest) -> Built:
    return build(tar_of(request.param), request.param, chunk_size=64 * 1024)


def reader(blob: bytes):
    return lambda offset, length: blob[offset : offset + length]


def digests_of(b: Built) -> zstdchunked.TocDigests:
    ann = b.annotations
    return zstdchunked.TocDigests(
        manifest_checksum=ann.get(GH + "manifest-checksum") or ann.get(OLD + "manifest-checksum"),
        toc_json=ann.get(TOC_DIGEST),
        tar_split=ann.get(GH + "tarsplit-checksum"),
    )


def layout_of(b: Built) -> zstdchunked.Layout:
    ann = b.annotations
    pos = ann.get(GH + "manifest-position") or ann[OLD + "manifest-position"]
    ts = ann.get(GH + "tarsplit-position")
    return zstdchunked.Layout(
        zstdchunked.parse_manifest_position(pos),
        zstdchunked.parse_tarsplit_position(ts) if ts else None,
    )


def file_bytes(toc: Toc, blob: bytes, name: str) -> bytes:
    entry = toc.node(toc.lookup(name)).entry
    return b"".join(
        zstdchunked.decode_chunk(memoryview(blob)[c.blob_offset : c.blob_end], c)
        for c in entry.chunks
    )


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


# -- the built blobs are what they claim ------------------------------------------------------


def test_blob_decompresses_to_the_tar(built: Built) -> None:
    out = zstandard.ZstdDecompressor().stream_reader(built.blob, read_across_frames=True)
    data = b"".join(iter(lambda: out.read(1 << 20), b""))
    assert data == built.tar  # skippable metadata frames add nothing to the DiffID


# -- TOC: located, verified, parsed -----------------------------------------------------------


@pytest.mark.parametrize("source", ["annotations", "footer"])
def test_toc_tree_matches_the_tar(built: Built, source: str) -> None:
    layout = layout_of(built) if source == "annotations" else None
    ct = zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built), layout=layout)
    assert ct.layout.toc == built.layout.toc
    if source == "annotations" or built.blob.endswith(b"GNUlInUx"):  # 56 bytes: no tar-split
        assert ct.layout.tar_split == built.layout.tar_split
    toc = ct.toc
    for m in members(built.tar):
        node = toc.lookup(m.name)
        assert node is not None, m.name
        entry = toc.node(node).entry
        kind = {b"0": "reg", b"5": "dir", b"2": "symlink", b"1": "hardlink", b"6": "fifo",
                b"3": "char"}[m.type]
        if kind == "hardlink":
            assert toc.node(node) is toc.node(toc.lookup(m.linkname))
            continue
        assert (entry.type, entry.mode, entry.uid, entry.gid) == (kind, m.mode, m.uid, m.gid)
        assert entry.mtime_ns == m.mtime * 1_000_000_000
        assert dict(entry.xattrs) == dict(m.xattrs)
        if kind == "symlink":
            assert entry.link_name == m.linkname
        if kind == "char":
            assert (entry.dev_major, entry.dev_minor) == (m.devmajor, m.devminor)
    assert toc.node(toc.lookup("data/owned")).nlink == 2
    assert toc.fully_verifiable


def test_every_file_reads_back_verified(built: Built) -> None:
    ct = zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built))
    for m in members(built.tar):
        if m.type == b"0" and m.name != "opt/a.txt":
            assert file_bytes(ct.toc, built.blob, m.name) == m.data, m.name
    assert file_bytes(ct.toc, built.blob, "opt/a.txt") == b"replaced later in the tar"
    big = ct.toc.node(ct.toc.lookup("data/big.bin")).entry
    assert len(big.chunks) == 5  # 300 KiB in 64 KiB frames
    assert all(c.blob_end > c.blob_offset for c in big.chunks)


def tree_of(toc: Toc) -> dict[str, tuple]:
    out: dict[str, tuple] = {}

    def visit(node_id: int, path: str) -> None:
        for name, child in toc.children(node_id).items():
            node = toc.node(child)
            e = node.entry
            p = f"{path}/{name}"
            if name not in (".prefetch.landmark", ".no.prefetch.landmark"):
                out[p] = (e.type, e.size, e.mode, e.uid, e.gid, e.mtime_ns, e.link_name,
                          e.dev_major, e.dev_minor, dict(e.xattrs), node.nlink)
            visit(child, p)

    visit(0, "")
    return out


def test_same_tree_as_the_estargz_parser(built: Built) -> None:
    """The zstd:chunked TOC becomes exactly the tree the eStargz reader builds for the same tar
    (so diff/ looks the same whatever the format)."""
    from store.estargz import build_estargz_bytes, open_toc

    blob, res = build_estargz_bytes(sample_tar(), chunk_size=64 * 1024)
    esgz = open_toc(reader(blob), len(blob), res.toc_digest)
    ct = zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built))
    assert tree_of(ct.toc) == tree_of(esgz)


def test_landmark_of_stargz_zstd_is_recognised() -> None:
    b = build(tar_of("stargz"), "stargz")
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    assert ct.toc.landmark == "no-prefetch"
    assert ct.regions is None  # stargz writes no endOffset


def test_flipped_toc_byte_is_refused(built: Built) -> None:
    toc = built.layout.toc
    for pos in (toc.offset, toc.offset + toc.length // 2, toc.end - 1):
        bad = flip(built.blob, pos)
        with pytest.raises(FormatError):
            zstdchunked.open_toc(reader(bad), len(bad), digests_of(built))
    if digests_of(built).manifest_checksum:
        bad = flip(built.blob, toc.offset + 3)
        with pytest.raises(DigestMismatch):  # checked before decompressing
            zstdchunked.open_toc(reader(bad), len(bad), digests_of(built))


def test_resigned_toc_with_a_wrong_json_digest_is_refused() -> None:
    b = build(tar_of("stargz"), "stargz")
    wrong = zstdchunked.TocDigests(toc_json="sha256:" + "0" * 64)
    with pytest.raises(DigestMismatch):
        zstdchunked.open_toc(reader(b.blob), len(b.blob), wrong)


def test_recorded_digest_names_either_form() -> None:
    for variant in ("podman5", "stargz"):
        b = build(tar_of(variant), variant)
        for digest in (zstdchunked.TocDigests(recorded="sha256:" + hashlib.sha256(
                b.toc_compressed).hexdigest()),
                       zstdchunked.TocDigests(recorded="sha256:" + hashlib.sha256(
                b.toc_json).hexdigest())):
            ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digest)
            assert ct.toc.lookup("data/big.bin") is not None
        with pytest.raises(DigestMismatch):
            zstdchunked.open_toc(
                reader(b.blob), len(b.blob), zstdchunked.TocDigests(recorded="sha256:" + "1" * 64)
            )
    with pytest.raises(ValueError):
        zstdchunked.TocDigests()


# -- chunks ------------------------------------------------------------------------------------


def test_flipped_data_byte_never_returns_bytes(built: Built) -> None:
    ct = zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built))
    for name in ("etc/passwd", "data/big.bin", "data/holey.bin"):
        entry = ct.toc.node(ct.toc.lookup(name)).entry
        for chunk in entry.chunks:
            good = bytes(built.blob[chunk.blob_offset : chunk.blob_end])
            expected = zstdchunked.decode_chunk(good, chunk)
            assert len(expected) == chunk.size
            own_frame = frame_end(good, 0)  # the rest of the range is a tar-header frame
            for pos in range(0, own_frame, max(1, own_frame // 50)):
                # refused (FormatError) is the only acceptable alternative to the right bytes
                with contextlib.suppress(FormatError):
                    assert zstdchunked.decode_chunk(flip(good, pos), chunk) == expected
            with pytest.raises(FormatError):  # a flipped content byte is always caught
                zstdchunked.decode_chunk(flip(good, own_frame // 2), chunk)


def test_resigned_toc_with_wrong_chunk_digest_is_refused() -> None:
    def corrupt(doc: dict) -> None:
        for e in doc["entries"]:
            if e["name"] == "etc/passwd":
                e["digest"] = "sha256:" + "2" * 64

    b = build(sample_tar(), "podman5", mutate_toc=corrupt)
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    with pytest.raises(DigestMismatch):
        file_bytes(ct.toc, b.blob, "etc/passwd")


def test_zeros_chunks_are_frames_and_verify() -> None:
    b = build(sample_tar(), "podman5", chunk_size=64 * 1024)
    doc = json.loads(b.toc_json)
    assert any(e.get("chunkType") == "zeros" for e in doc["entries"])
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    assert file_bytes(ct.toc, b.blob, "data/holey.bin") == HOLEY


# -- the exact tar size ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["podman5", "podman48", "podman43"])
def test_uncompressed_size_is_exact(variant: str) -> None:
    b = build(sample_tar(), variant)
    src = CountingReader(b.blob)
    ct = zstdchunked.open_toc(src, len(b.blob), digests_of(b), layout=layout_of(b))
    assert src.reads == 1  # metadata frames in one request
    if variant == "podman43":
        assert ct.tar_split_size is None and ct.regions is not None
    else:
        assert ct.tar_split_size == len(b.tar)
    assert zstdchunked.uncompressed_size(ct, src) == len(b.tar)
    if variant == "podman43":
        # the scan reads the frames between files' data, never the big file's frames
        big = ct.toc.node(ct.toc.lookup("data/big.bin")).entry
        region = next(r for r in ct.regions if r.start == big.chunks[0].blob_offset)
        assert region.size == len(BIG)
        assert not any(o < region.end and region.start < o + n for o, n in src.ranges[1:])
        fetched = sum(n for _, n in src.ranges[1:])
        assert fetched < len(b.blob) // 2


def test_gap_scan_handles_every_request_split() -> None:
    b = build(sample_tar(), "podman43", chunk_size=8 * 1024)
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    for merge, limit in ((0, 1), (4096, 64 * 1024), (1 << 30, 1 << 30)):
        assert zstdchunked.uncompressed_size(ct, reader(b.blob), merge=merge,
                                             request_limit=limit) == len(b.tar)


def test_stargz_without_annotation_has_no_size() -> None:
    b = build(tar_of("stargz"), "stargz")
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    with pytest.raises(FormatError):
        zstdchunked.uncompressed_size(ct, reader(b.blob))


def test_tar_split_flipped_or_inconsistent_is_refused() -> None:
    b = build(sample_tar(), "podman5")
    ts = b.layout.tar_split
    assert ts is not None
    bad = flip(b.blob, ts.offset + ts.length // 2)
    with pytest.raises(DigestMismatch):
        zstdchunked.open_toc(reader(bad), len(bad), digests_of(b))

    def drop_file(lines: list[str]) -> list[str]:
        return [line for line in lines if '"data/suid"' not in line]

    b = build(sample_tar(), "podman5", mutate_tar_split=drop_file)  # re-signed in the TOC
    with pytest.raises(TocError):
        zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    # a legacy tar-split checksum annotation is honoured the same way
    b = build(sample_tar(), "podman48")
    bad = flip(b.blob, b.layout.tar_split.offset + 1)
    with pytest.raises(DigestMismatch):
        zstdchunked.open_toc(reader(bad), len(bad), digests_of(b), layout=layout_of(b))
    # its 56-byte footer does not say where the tar-split is: without the annotation it is
    # not used at all (and the size comes from the scan)
    ct = zstdchunked.open_toc(reader(bad), len(bad), digests_of(b))
    assert ct.tar_split_size is None


def test_tar_size_from_tar_split_counts_segments_and_files() -> None:
    lines = [
        {"type": 2, "payload": "AAAA", "position": 0},  # 3 bytes
        {"type": 1, "name": "a", "size": 10, "payload": None, "position": 1},
        {"type": 2, "payload": None, "position": 2},
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    assert zstdchunked.tar_size_from_tar_split(data) == 13
    with pytest.raises(TocError):
        zstdchunked.tar_size_from_tar_split(b'{"type":3}')
    with pytest.raises(TocError):
        zstdchunked.tar_size_from_tar_split(b'{"type":1,"size":-1}')


# -- layouts: annotations and footers -----------------------------------------------------------


def test_position_annotations() -> None:
    assert zstdchunked.parse_manifest_position("100:20:300:1") == zstdchunked.Section(100, 20, 300)
    assert zstdchunked.parse_tarsplit_position("9:8:7") == zstdchunked.Section(9, 8, 7)
    for bad in ("100:20:300:2", "100:20:300", "a:1:1:1", "100:0:1:1", "4:5:6:1", "١:1:1:1"):
        with pytest.raises(FooterError):
            zstdchunked.parse_manifest_position(bad)


def test_footer_sizes_and_garbage(built: Built) -> None:
    layout = zstdchunked.parse_footer(built.blob[-200:], len(built.blob))
    assert layout.toc == built.layout.toc
    for tail in (b"", b"x" * 100, built.blob[-200:-1], flip(built.blob[-200:], 199)):
        with pytest.raises(FooterError):
            zstdchunked.parse_footer(tail, len(built.blob))


def test_layout_pointing_outside_the_blob_is_refused(built: Built) -> None:
    toc = built.layout.toc
    for section in (zstdchunked.Section(toc.offset + 1, toc.length, toc.uncompressed),
                    zstdchunked.Section(toc.offset, toc.length + 10**9, toc.uncompressed)):
        with pytest.raises(FormatError):
            zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built),
                                 layout=zstdchunked.Layout(section))
    # an annotation pointing far before the tail is refused before anything is read
    src = CountingReader(built.blob)
    early = zstdchunked.Layout(zstdchunked.Section(8, toc.length, toc.uncompressed))
    with pytest.raises(TocError):
        zstdchunked.open_toc(src, len(built.blob), digests_of(built), layout=early,
                             max_toc_size=64 << 10, max_tar_split_size=64 << 10)
    assert src.reads == 0
    big = zstdchunked.Section(toc.offset, toc.length, 1 << 40)
    with pytest.raises(TocError):
        zstdchunked.open_toc(reader(built.blob), len(built.blob), digests_of(built),
                             layout=zstdchunked.Layout(big))


# -- frames ------------------------------------------------------------------------------------


def test_frame_walker() -> None:
    one = zstandard.ZstdCompressor(write_checksum=True).compress(BIG)
    two = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 1000)
    skip = skippable_frame(b"meta")
    data = one + skip + two
    assert frame_end(data, 0) == len(one)
    assert frame_end(data, len(one)) == len(one) + len(skip)
    assert frame_end(data, len(one) + len(skip)) == len(data)
    assert decompressed_length(data, limit=1 << 30) == len(BIG) + 3000
    for bad in (one[:-1], one[:10], b"\x00" * 16, skip[:-1]):
        with pytest.raises(FormatError):
            frame_end(bad, 0)
    with pytest.raises(FormatError):
        decompressed_length(one + two[:-2], limit=1 << 30)
    with pytest.raises(FormatError):
        decompressed_length(one, limit=1000)


def test_time_parsing_keeps_nanoseconds() -> None:
    parse = zstdchunked.parse_time_ns
    assert parse("2023-11-14T22:13:20Z") == 1_700_000_000 * 10**9
    assert parse("2023-11-14T22:13:20.123456789Z") == 1_700_000_000 * 10**9 + 123456789
    assert parse("2023-11-14T23:13:20.5+01:00") == 1_700_000_000 * 10**9 + 500_000_000
    assert parse("1969-12-31T23:59:59Z") == -(10**9)
    for zero in ("", "0001-01-01T00:00:00Z", "garbage", "2023-13-01T00:00:00Z"):
        assert parse(zero) == 0


def test_toc_entry_rules() -> None:
    def toc(entries: list[dict], data_end: int = 10_000) -> Toc:
        doc = json.dumps({"version": 1, "entries": entries}).encode()
        return zstdchunked.parse_toc(doc, data_end=data_end).toc

    d = "sha256:" + "a" * 64
    assert toc([{"type": "reg", "name": "a", "size": 3, "offset": 10, "endOffset": 20,
                 "digest": d, "modtime": "2023-11-14T22:13:20.000000001Z"}]).node(1).entry\
        .mtime_ns == 1_700_000_000 * 10**9 + 1
    bad_cases = [
        [{"type": "chunk", "name": "a"}],
        [{"type": "sock", "name": "a"}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 0, "digest": d}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 20_000, "digest": d}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 10, "endOffset": 5, "digest": d}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 10, "digest": d, "chunkType": "x"}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 50, "digest": d},
         {"type": "reg", "name": "b", "size": 3, "offset": 40, "digest": d}],
        [{"type": "reg", "name": "a", "size": 3, "offset": 10, "endOffset": 60, "digest": d},
         {"type": "reg", "name": "b", "size": 3, "offset": 40, "endOffset": 70, "digest": d}],
        [{"type": "symlink", "name": "a"}],
        [{"type": "reg", "name": "../a"}],
        [{"type": "dir", "name": "a", "mode": True}],
    ]
    for entries in bad_cases:
        with pytest.raises(TocError):
            toc(entries)


# -- the store's use: RemoteLayer and the resolver's facts --------------------------------------


class CountingReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    @property
    def reads(self) -> int:
        return len(self.ranges)

    def __call__(self, offset: int, length: int) -> bytes:
        self.ranges.append((offset, length))
        return self.data[offset : offset + length]


class MemoryBlob:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.size = len(data)

    def read_range(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def download(self, dest) -> int:
        dest.write(self.data)
        return self.size


def test_remote_layer_reads_zstd_chunked_files(tmp_path: Path) -> None:
    b = build(sample_tar(), "podman5", chunk_size=16 * 1024)
    ct = zstdchunked.open_toc(reader(b.blob), len(b.blob), digests_of(b))
    layer = RemoteLayer(MemoryBlob(b.blob), ct.toc, ChunkCache(16 << 20), tmp_path / "blobs",
                        decode=zstdchunked.decode_chunk)
    entry = ct.toc.node(ct.toc.lookup("data/big.bin")).entry
    assert layer.read_file(entry, 0, len(BIG)) == BIG
    assert layer.read_file(entry, 50_000, 30_000) == BIG[50_000:80_000]
    assert layer.read_blob(0, len(b.blob) + 10) == b.blob
    # a corrupt frame: the read fails, nothing is served or cached
    small = ct.toc.node(ct.toc.lookup("data/small/f07.txt")).entry
    frame = small.chunks[0].blob_offset
    bad = flip(b.blob, (frame + frame_end(b.blob, frame)) // 2)
    layer2 = RemoteLayer(MemoryBlob(bad), ct.toc, ChunkCache(16 << 20), tmp_path / "b2",
                         decode=zstdchunked.decode_chunk)
    with pytest.raises(FormatError):
        layer2.read_file(small, 0, 100)
    assert layer2.stats().chunks_fetched == 0


def descriptor(b: Built, media_type: str = oci.OCI_LAYER_ZSTD) -> oci.Descriptor:
    return oci.Descriptor(media_type, b.digest, len(b.blob), annotations=dict(b.annotations))


def test_resolver_facts_for_each_variant() -> None:
    for variant in VARIANTS:
        b = build(tar_of(variant), variant)
        facts = _lazy_facts(descriptor(b))
        assert facts.compression == COMPRESSION_ZSTD and facts.zstd is not None
        assert facts.layout is not None and facts.layout.toc == b.layout.toc
        if variant == "stargz":
            assert facts.uncompressed_size == len(b.tar)
            assert facts.toc_digest == b.annotations[TOC_DIGEST]  # Podman 5's key for it
        else:
            assert facts.uncompressed_size is None  # derived from the layer
        if variant in ("podman5", "podman48"):
            assert facts.toc_digest == b.annotations[GH + "manifest-checksum"]
            assert facts.layout.tar_split == b.layout.tar_split
    plain = oci.Descriptor(oci.OCI_LAYER_ZSTD, "sha256:" + "3" * 64, 10)
    with pytest.raises(NotLazyLayer):
        _lazy_facts(plain)
    broken = build(sample_tar(), "podman5")
    broken.annotations[GH + "manifest-position"] = "1:2:3"
    with pytest.raises(NotLazyLayer):
        _lazy_facts(descriptor(broken))


def test_layer_keys_podman_uses() -> None:
    b5 = build(sample_tar(), "podman5")
    b4 = build(sample_tar(), "podman43")
    manifest = oci.Manifest(
        media_type=oci.OCI_MANIFEST,
        config=oci.Descriptor(oci.OCI_CONFIG, "sha256:" + "4" * 64, 2),
        layers=(descriptor(b4), descriptor(b5)),
    )
    assert _find_layer(manifest, b4.digest) == (0, KeyKind.BLOB)  # Podman 4.3
    assert _find_layer(manifest, b5.digest) == (1, KeyKind.BLOB)
    assert _find_layer(manifest, b5.annotations[GH + "manifest-checksum"]) == (1, KeyKind.TOC)
    with pytest.raises(NotFound):  # the legacy key is never a Podman 5 key
        _find_layer(manifest, b4.annotations[OLD + "manifest-checksum"])


def test_info_records_carry_zstd_compression() -> None:
    rec = LayerRecord("sha256:" + "5" * 64, KeyKind.TOC, "sha256:" + "6" * 64, 10,
                      "sha256:" + "7" * 64, 1234, "sha256:" + "5" * 64, COMPRESSION_ZSTD)
    info = json.loads(rec.info_json())
    assert info["compression"] == 4 and info["toc-digest"] == rec.key
    assert info["flags"] == {"expected-layer-diffid": rec.diff_id}


def test_usize_annotation_is_honoured_only_when_numeric() -> None:
    b = build(tar_of("stargz"), "stargz")
    b.annotations[USIZE] = "12x"
    assert _lazy_facts(descriptor(b)).uncompressed_size is None

