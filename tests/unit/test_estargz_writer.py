"""The tar -> eStargz converter (estargz-format.md §2, §3, §4.1, §7, §12.1, §12.3, §12.4)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from typing import Any

import pytest
from tarbuild import TarBuilder, members

from store.errors import FormatError
from store.estargz import (
    DEFAULT_CHUNK_SIZE,
    FOOTER_SIZE,
    BuildResult,
    Toc,
    build_estargz,
    build_estargz_bytes,
    decode_chunk,
    iter_members,
    open_toc,
    parse_footer,
)

LANDMARK_DIGEST = "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def toc_of(blob: bytes, result: BuildResult) -> Toc:
    return open_toc(lambda off, n: blob[off : off + n], len(blob), result.toc_digest)


def raw_toc(blob: bytes) -> dict[str, Any]:
    """The TOC JSON as written, read with plain tarfile (no help from our reader)."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        info = archive.getmember("stargz.index.json")
        extracted = archive.extractfile(info)
        assert extracted is not None
        return json.loads(extracted.read())


def raw_entry(blob: bytes, name: str) -> dict[str, Any]:
    [entry] = [e for e in raw_toc(blob)["entries"] if e["name"] == name and e["type"] != "chunk"]
    return entry


def member_starts(blob: bytes) -> list[int]:
    return [start for start, _ in iter_members(blob)]


def read_file(blob: bytes, toc: Toc, path: str) -> bytes:
    node_id = toc.lookup(path)
    assert node_id is not None, path
    chunks = toc.node(node_id).entry.chunks
    return b"".join(decode_chunk(blob[c.blob_offset : c.blob_end], c) for c in chunks)


def rich_tar(*, fmt: int = tarfile.PAX_FORMAT, prefix: str = "") -> TarBuilder:
    """Every entry kind; PAX-only features only when the format can carry them."""
    builder = (
        TarBuilder(format=fmt, prefix=prefix)
        .dir("foo/", uid=50, gid=100, uname="user50", gname="group100")
        .file(
            "foo/bar.txt",
            b"hello, world\n" * 100,
            mode=0o600,
            uid=50,
            gid=100,
            uname="user50",
            gname="group100",
        )
        .file("foo/empty", b"")
        .file("foo/one", b"1")
        .file("bar/foo2.txt", b"in an implicit directory")
        .symlink("lnk", "../../outside/the/root")
        .symlink("foo/early", "../later/dir")
        .dir("later/dir/")
        .hardlink("foo/hard", "foo/bar.txt")
        .char("dev/null", 1, 3)
        .char("dev/zero", 1, 5)
        .block("dev/sda", 8, 0)
        .fifo("run/fifo")
        .dir("tmp/", mode=0o1777)
        .file("usr/bin/su", b"#!/bin/sh\n", mode=0o4755)
        .dir("srv/", mode=0o2775)
        .file("big", rand(3 * 4096 + 7))
        .file("etc/.wh.passwd", b"")
        .file("opt/.wh..wh..opq", b"")
        .file("zero-mtime", b"x", mtime=0)
    )
    if fmt != tarfile.USTAR_FORMAT:
        builder.file("long/" + "n" * 150, b"long name").symlink("long-link", "t" * 120)
        builder.dir("d" * 120 + "/")
    if fmt == tarfile.PAX_FORMAT:
        builder.file("xattr", b"x", xattrs={"user.foo": b"bar", "user.bin": b"\xff\xfe\xfd"})
        builder.file("ünïcødé/日本語", b"utf-8 names")
    return builder


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("prefix", ["", "./", "/"])
@pytest.mark.parametrize("compression", ["plain", "gzip", "zstd"])
def test_blob_is_a_tar_gz_with_the_same_members(fmt: int, prefix: str, compression: str) -> None:
    builder = rich_tar(fmt=fmt, prefix=prefix)
    source = {"plain": builder.build, "gzip": builder.build_gzip, "zstd": builder.build_zstd}
    blob, result = build_estargz_bytes(source[compression](), chunk_size=4096)
    # §2.2: any gzip reader inflates the blob to a valid tar; minus landmark and TOC it is
    # the input, entry by entry (names, metadata, xattrs, payloads).
    assert members(blob, skip_reserved=True) == members(builder.build())
    names = [m.name for m in members(blob)]
    assert names[0] == ".no.prefetch.landmark"
    assert names[-1] == "stargz.index.json"
    toc = toc_of(blob, result)
    for member in members(builder.build()):
        if member.type == tarfile.REGTYPE:
            assert read_file(blob, toc, member.name) == member.data


def test_build_result() -> None:
    blob, result = build_estargz_bytes(rich_tar().build(), chunk_size=1000)
    stream = gzip.decompress(blob)
    assert result.diff_id == "sha256:" + hashlib.sha256(stream).hexdigest()
    assert result.uncompressed_size == len(stream)
    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.blob_size == len(blob)
    toc_json = json.dumps(raw_toc(blob))  # re-serialised only to count entries
    assert result.toc_entries == len(json.loads(toc_json)["entries"])
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        payload = archive.extractfile("stargz.index.json")
        assert payload is not None
        assert result.toc_digest == "sha256:" + hashlib.sha256(payload.read()).hexdigest()
    # The stream ends with the TOC entry and the tar end-of-archive marker (§2.2).
    assert stream.endswith(b"\x00" * 1024)


def test_output_is_deterministic() -> None:
    tar = rich_tar().build()
    options: dict[str, Any] = {"chunk_size": 100, "prioritized": ["foo/hard", "big"]}
    first = build_estargz_bytes(tar, **options)
    second = build_estargz_bytes(tar, **options)
    assert first == second
    assert build_estargz_bytes(tar, min_chunk_size=500) == build_estargz_bytes(
        tar, min_chunk_size=500
    )
    # gzip input gives the same blob as the plain tar.
    assert build_estargz_bytes(gzip.compress(tar, mtime=123), **options) == first


def test_gzip_member_headers_are_reproducible() -> None:
    blob, _ = build_estargz_bytes(rich_tar().build())
    starts = member_starts(blob)
    for start in starts[:-1]:
        # §2.3: no name/comment, MTIME 0, XFL 2 for level 9, OS 255.
        assert blob[start : start + 10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    blob1, _ = build_estargz_bytes(rich_tar().build(), compression_level=1)
    assert blob1[8:10] == b"\x04\xff"


def test_footer_points_at_the_toc_member() -> None:
    blob, _ = build_estargz_bytes(rich_tar().build())
    starts = member_starts(blob)
    assert starts[-1] == len(blob) - FOOTER_SIZE  # the footer is the last member
    toc_offset = parse_footer(blob[-FOOTER_SIZE:])
    assert toc_offset == starts[-2]
    inflated = gzip.decompress(blob[toc_offset : len(blob) - FOOTER_SIZE])
    assert inflated[:17] == b"stargz.index.json"


@pytest.mark.parametrize("level", [0, 1, 6, -1])
def test_compression_levels(level: int) -> None:
    builder = rich_tar()
    blob, result = build_estargz_bytes(builder.build(), compression_level=level)
    assert members(blob, skip_reserved=True) == members(builder.build())
    [big] = [m for m in members(builder.build()) if m.name == "big"]
    assert read_file(blob, toc_of(blob, result), "big") == big.data


def test_options_are_validated() -> None:
    tar = TarBuilder().file("a", b"x").build()
    for bad in (
        {"chunk_size": -1},
        {"min_chunk_size": -5},
        {"compression_level": 10},
        {"compression_level": -2},
    ):
        with pytest.raises(ValueError):
            build_estargz_bytes(tar, **bad)
    blob, result = build_estargz_bytes(TarBuilder().file("a", rand(5 << 20)).build(), chunk_size=0)
    toc = toc_of(blob, result)
    chunks = toc.node(toc.lookup("a") or 0).entry.chunks
    assert [c.size for c in chunks] == [DEFAULT_CHUNK_SIZE, (5 << 20) - DEFAULT_CHUNK_SIZE]


def test_streams_without_seek_are_accepted() -> None:
    tar = rich_tar().build()

    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self.data.read(min(len(buffer), 7))  # short reads on purpose
            buffer[: len(chunk)] = chunk
            return len(chunk)

    out = io.BytesIO()
    result = build_estargz(Pipe(tar), out)  # type: ignore[arg-type]
    assert (out.getvalue(), result) == build_estargz_bytes(tar)


def test_seekable_input_not_at_position_zero() -> None:
    tar = rich_tar().build()
    src = io.BytesIO(b"JUNK" + tar)
    src.seek(4)
    out = io.BytesIO()
    result = build_estargz(src, out)
    assert (out.getvalue(), result) == build_estargz_bytes(tar)


# ---------------------------------------------------------------------------- layout


def test_empty_layer() -> None:
    for tar in (b"", TarBuilder().build()):
        blob, result = build_estargz_bytes(tar)
        # landmark header member, landmark payload member, TOC member, footer.
        assert len(member_starts(blob)) == 4
        assert result.toc_entries == 1
        toc = toc_of(blob, result)
        assert len(toc) == 1
        assert list(toc.children(0)) == [".no.prefetch.landmark"]
        assert [m.name for m in members(blob)] == [".no.prefetch.landmark", "stargz.index.json"]


def test_every_payload_starts_a_member() -> None:
    blob, result = build_estargz_bytes(rich_tar().build(), chunk_size=4096)
    starts = set(member_starts(blob))
    toc = toc_of(blob, result)
    data_chunks = [c for e in toc.entries for c in e.chunks]
    assert data_chunks
    for chunk in data_chunks:
        assert chunk.inner_offset == 0
        assert chunk.blob_offset in starts  # §2.1 rule 2
        assert chunk.blob_end in starts or chunk.blob_end == toc.toc_offset
    # A file header and its payload sit in different members (§2.2).
    assert 0 not in {c.blob_offset for c in data_chunks}


def test_chunked_file_member_count_and_offsets() -> None:
    # §12.3 "chunked_file": 23 bytes in 4-byte chunks -> 6 chunks.
    data = b"0123456789abcdefghijklm"
    blob, result = build_estargz_bytes(TarBuilder().file("foo", data).build(), chunk_size=4)
    starts = member_starts(blob)
    # M0 landmark header, M1 landmark payload + foo header, 6 chunk members, TOC, footer.
    assert len(starts) == 10
    chunk_entries = [e for e in raw_toc(blob)["entries"] if e["name"] == "foo"]
    assert [e["type"] for e in chunk_entries] == ["reg"] + ["chunk"] * 5
    assert [e["offset"] for e in chunk_entries] == starts[2:8]
    assert [e.get("chunkOffset", 0) for e in chunk_entries] == [0, 4, 8, 12, 16, 20]
    assert [e.get("chunkSize") for e in chunk_entries] == [4, 4, 4, 4, 4, None]
    toc = toc_of(blob, result)
    chunks = toc.node(toc.lookup("foo") or 0).entry.chunks
    # NextOffset of chunk i is the offset of chunk i+1; the last one is bounded by the TOC.
    assert [c.blob_end for c in chunks] == starts[3:8] + [toc.toc_offset]
    assert read_file(blob, toc, "foo") == data


@pytest.mark.parametrize("extra", [0, 1])
def test_files_of_exactly_n_chunks_and_one_byte_more(extra: int) -> None:
    chunk = 1024
    data = rand(3 * chunk + extra)
    blob, result = build_estargz_bytes(TarBuilder().file("f", data).build(), chunk_size=chunk)
    entries = [e for e in raw_toc(blob)["entries"] if e["name"] == "f"]
    assert len(entries) == 3 + extra
    sizes = [e.get("chunkSize") for e in entries]
    if extra:
        assert sizes == [chunk, chunk, chunk, None]  # short final chunk: "to end of file"
    else:
        assert sizes == [chunk, chunk, chunk]  # exact multiple: chunkSize on the last too
    toc = toc_of(blob, result)
    chunks = toc.node(toc.lookup("f") or 0).entry.chunks
    assert [c.size for c in chunks] == [chunk] * 3 + [1] * extra
    assert read_file(blob, toc, "f") == data
    single, single_result = build_estargz_bytes(
        TarBuilder().file("f", rand(chunk)).build(), chunk_size=chunk
    )
    assert raw_entry(single, "f")["chunkSize"] == chunk  # one chunk of exactly C bytes


def test_empty_files_get_a_digest_but_no_member() -> None:
    # §12.1 "empty files": empty entries between 6-byte files.
    builder = TarBuilder()
    for i in range(3):
        builder.file(f"empty{i}", b"").file(f"six{i}", b"abcdef")
    blob, result = build_estargz_bytes(builder.build())
    for i in range(3):
        entry = raw_entry(blob, f"empty{i}")
        assert entry["digest"] == EMPTY_DIGEST
        assert not {"offset", "size", "chunkDigest"} & entry.keys()
    # landmark header, landmark payload, three 6-byte payloads, TOC, footer.
    assert len(member_starts(blob)) == 7
    toc = toc_of(blob, result)
    assert toc.node(toc.lookup("empty1") or 0).entry.chunks == []
    assert read_file(blob, toc, "six2") == b"abcdef"


def test_toc_json_fields_and_order() -> None:
    builder = (
        TarBuilder()
        .dir("d/", mode=0o755, mtime=0)
        .file(
            "f",
            b"12345",
            mode=0o644,
            uid=5,
            gid=6,
            uname="u",
            gname="g",
            mtime=1566297043,
            xattrs={"user.a": b"\x00\x01"},
        )
        .file("g", b"x", uid=5, gid=6, uname="u", gname="g")
        .file("h", b"x", uid=5, gid=6, uname="u2", gname="g")
        .char("c", 0, 0)
        .block("b", 8, 1)
    )
    blob, _ = build_estargz_bytes(builder.build())
    assert raw_entry(blob, "d/") == {"name": "d/", "type": "dir", "mode": 0o755}
    f = raw_entry(blob, "f")
    assert list(f) == [
        "name",
        "type",
        "size",
        "modtime",
        "mode",
        "uid",
        "gid",
        "userName",
        "groupName",
        "offset",
        "xattrs",
        "digest",
        "chunkDigest",
    ]
    assert f["modtime"] == "2019-08-20T10:30:43Z"
    assert f["xattrs"] == {"user.a": "AAE="}
    assert f["digest"] == f["chunkDigest"] == "sha256:" + hashlib.sha256(b"12345").hexdigest()
    # userName/groupName only when they change for an id (§3.3).
    assert "userName" not in raw_entry(blob, "g") and "groupName" not in raw_entry(blob, "g")
    assert raw_entry(blob, "h")["userName"] == "u2"
    assert raw_entry(blob, "c") == {
        "name": "c",
        "type": "char",
        "modtime": "2023-11-14T22:13:20Z",
        "mode": 0o666,
    }
    assert raw_entry(blob, "b")["devMajor"] == 8 and raw_entry(blob, "b")["devMinor"] == 1
    assert raw_toc(blob)["version"] == 1


def test_user_names_are_filled_back_by_the_reader() -> None:
    builder = (
        TarBuilder().file("a", b"1", uid=7, uname="seven").file("b", b"2", uid=7, uname="seven")
    )
    blob, result = build_estargz_bytes(builder.build())
    toc = toc_of(blob, result)
    assert toc.node(toc.lookup("b") or 0).entry.user_name == "seven"


# ---------------------------------------------------------------------------- entries


def test_tree_of_the_rich_layer() -> None:
    blob, result = build_estargz_bytes(rich_tar(prefix="./").build())
    toc = toc_of(blob, result)

    def entry(path: str):  # noqa: ANN202
        node_id = toc.lookup(path)
        assert node_id is not None, path
        return toc.node(node_id)

    assert entry("foo").entry.uid == 50 and entry("foo").entry.user_name == "user50"
    assert entry("bar").entry.mode == 0o755  # implicit directory
    assert entry("lnk").entry.link_name == "../../outside/the/root"  # verbatim (§12.3 symlink)
    assert entry("foo/hard").id == entry("foo/bar.txt").id
    assert entry("foo/hard").nlink == 2
    assert (
        entry("dev/null").entry.type,
        entry("dev/null").entry.dev_major,
        entry("dev/null").entry.dev_minor,
    ) == ("char", 1, 3)
    assert (entry("dev/sda").entry.type, entry("dev/sda").entry.dev_major) == ("block", 8)
    assert entry("run/fifo").entry.type == "fifo"
    assert entry("tmp").entry.mode == 0o1777
    assert entry("srv").entry.mode == 0o2775
    assert entry("usr/bin/su").entry.mode == 0o4755
    assert entry("foo/bar.txt").entry.mode == 0o600
    assert entry("xattr").entry.xattrs == {"user.foo": b"bar", "user.bin": b"\xff\xfe\xfd"}
    assert entry("etc/.wh.passwd").entry.type == "reg"  # whiteouts kept as is (§8)
    assert entry("opt/.wh..wh..opq").entry.digest == EMPTY_DIGEST
    assert entry("long/" + "n" * 150).entry.size == 9
    assert entry("long-link").entry.link_name == "t" * 120
    assert entry("zero-mtime").entry.mtime_ns == 0
    assert entry("foo").entry.mtime_ns == 1_700_000_000 * 10**9
    assert read_file(blob, toc, "ünïcødé/日本語") == b"utf-8 names"


def test_root_entry_in_the_input() -> None:
    # §12.3 "recursive": a tar that contains the root itself.
    for root in ("./", "/"):
        builder = TarBuilder().dir(root, mode=0o700).file("./a", b"x")
        blob, result = build_estargz_bytes(builder.build())
        toc = toc_of(blob, result)
        assert toc.node(0).entry.mode == 0o700
        assert set(toc.children(0)) == {"a", ".no.prefetch.landmark"}


def test_existing_landmarks_and_toc_are_dropped() -> None:
    builder = (
        TarBuilder()
        .file(".prefetch.landmark", b"\x0f")
        .file("./.no.prefetch.landmark", b"\x0f")
        .file("stargz.index.json", b"{}")
        .file("a", b"x")
        .file("sub/stargz.index.json", b"kept: not at the root")
    )
    blob, _ = build_estargz_bytes(builder.build())
    names = [m.name for m in members(blob)]
    assert names == [".no.prefetch.landmark", "a", "sub/stargz.index.json", "stargz.index.json"]


def test_duplicate_entries_keep_the_last_one() -> None:
    builder = TarBuilder().file("a", b"old").file("b", b"b").file("./a", b"new")
    blob, result = build_estargz_bytes(builder.build())
    assert [m.name for m in members(blob, skip_reserved=True)] == ["b", "./a"]
    assert read_file(blob, toc_of(blob, result), "a") == b"new"


def test_landmark_entry() -> None:
    blob, result = build_estargz_bytes(TarBuilder().file("a", b"x").build())
    landmark = raw_toc(blob)["entries"][0]
    assert landmark == {
        "name": ".no.prefetch.landmark",
        "type": "reg",
        "size": 1,
        "offset": landmark["offset"],
        "digest": LANDMARK_DIGEST,
        "chunkDigest": LANDMARK_DIGEST,
    }
    toc = toc_of(blob, result)
    assert (toc.landmark, toc.prefetch_end) == ("no-prefetch", None)
    assert read_file(blob, toc, ".no.prefetch.landmark") == b"\x0f"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        info = archive.getmembers()[0]
    assert (info.mode, info.uid, info.mtime) == (0, 0, 0)


# ---------------------------------------------------------------------------- prioritized


def prioritized_layer() -> TarBuilder:
    return (
        TarBuilder()
        .dir("a/")
        .dir("a/b/")
        .file("a/b/c.txt", b"c")
        .file("d.txt", b"d")
        .dir("e/")
        .file("e/f.txt", b"f")
        .hardlink("link", "d.txt")
        .file("z", b"z")
    )


def test_prioritized_files_come_first_with_parents_and_link_targets() -> None:
    blob, result = build_estargz_bytes(
        prioritized_layer().build(), prioritized=["/e/f.txt", "link", "a/b/c.txt"]
    )
    names = [m.name for m in members(blob)]
    assert names == [
        "e",
        "e/f.txt",
        "d.txt",
        "link",
        "a",
        "a/b",
        "a/b/c.txt",
        ".prefetch.landmark",
        "z",
        "stargz.index.json",
    ]
    toc = toc_of(blob, result)
    assert toc.landmark == "prefetch"
    landmark = toc.node(toc.lookup(".prefetch.landmark") or 0).entry
    assert toc.prefetch_end == landmark.chunks[0].blob_offset
    for path in ("e/f.txt", "d.txt", "a/b/c.txt"):
        assert toc.node(toc.lookup(path) or 0).entry.chunks[0].blob_offset < toc.prefetch_end
    assert toc.node(toc.lookup("z") or 0).entry.chunks[0].blob_offset > toc.prefetch_end


def test_prioritized_order_is_kept_and_duplicates_ignored() -> None:
    blob, _ = build_estargz_bytes(
        prioritized_layer().build(), prioritized=["z", "d.txt", "z", "./d.txt"]
    )
    assert [m.name for m in members(blob)][:3] == ["z", "d.txt", ".prefetch.landmark"]


def test_missing_prioritized_file_is_an_error() -> None:
    with pytest.raises(FormatError, match="not in the layer"):
        build_estargz_bytes(prioritized_layer().build(), prioritized=["nope"])


def test_empty_prioritized_list_means_no_prefetch() -> None:
    blob, _ = build_estargz_bytes(prioritized_layer().build(), prioritized=[])
    assert members(blob)[0].name == ".no.prefetch.landmark"


# ---------------------------------------------------------------------------- min chunk


def test_min_chunk_size_shares_members() -> None:
    # §12.3 "several_files_in_chunk": two 64000-byte random files and small files.
    builder = (
        TarBuilder()
        .dir("bar/")
        .file("foo", rand(64000, 1))
        .file("foo2", b"foo2")
        .file("bar/bar.txt", b"bar.txt")
        .file("foo3", rand(64000, 2))
        .file("foo4", b"foo4")
    )
    tar = builder.build()
    plain_blob, _ = build_estargz_bytes(tar)
    blob, result = build_estargz_bytes(tar, min_chunk_size=8000)
    assert len(member_starts(blob)) < len(member_starts(plain_blob))
    entries = {e["name"]: e for e in raw_toc(blob)["entries"]}
    inner = {name: e.get("innerOffset", 0) for name, e in entries.items() if "offset" in e}
    assert inner[".no.prefetch.landmark"] == 0  # landmarks always start a member (§7)
    assert any(inner.values())
    # A payload shares the open member while it holds < 8000 compressed bytes; innerOffset
    # counts the uncompressed bytes before it (landmark byte + padding + 2 headers = 1536).
    landmark_offset = entries[".no.prefetch.landmark"]["offset"]
    assert (entries["foo"]["offset"], inner["foo"]) == (landmark_offset, 1536)
    assert inner["foo2"] == 0  # 64000 random bytes filled the member
    assert (
        entries["bar/bar.txt"]["offset"] == entries["foo3"]["offset"] == entries["foo2"]["offset"]
    )
    assert (inner["bar/bar.txt"], inner["foo3"]) == (1024, 2048)
    assert inner["foo4"] == 0
    assert len(member_starts(blob)) == 6  # 4 data members + TOC + footer
    toc = toc_of(blob, result)
    for member in members(tar):
        if member.type == tarfile.REGTYPE:
            assert read_file(blob, toc, member.name) == member.data
    assert members(blob, skip_reserved=True) == members(tar)


def test_min_chunk_size_with_chunked_files() -> None:
    data = rand(100_000, 3)
    tar = TarBuilder().file("a", b"a").file("big", data).file("b", b"b").build()
    blob, result = build_estargz_bytes(tar, min_chunk_size=4000, chunk_size=32000)
    toc = toc_of(blob, result)
    big = toc.node(toc.lookup("big") or 0).entry
    assert [c.size for c in big.chunks] == [32000, 32000, 32000, 4000]
    assert read_file(blob, toc, "big") == data
    for offset in (0, 31999, 32000, 64001, 99999):
        chunk = big.chunks[toc.chunk_index_for(big, offset)]
        assert (
            decode_chunk(blob[chunk.blob_offset : chunk.blob_end], chunk)[
                offset - chunk.file_offset
            ]
            == data[offset]
        )


# ---------------------------------------------------------------------------- rejected input


def sparse_tar() -> bytes:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    return TarBuilder(format=tarfile.GNU_FORMAT).raw(info).build()


def contiguous_tar() -> bytes:
    info = tarfile.TarInfo("contig")
    info.type = tarfile.CONTTYPE
    info.size = 3
    return TarBuilder().raw(info, b"abc").build()


def pax_sparse_tar() -> bytes:
    # GNU sparse format 0.1 expressed in PAX records: tarfile reports it as info.sparse.
    return (
        TarBuilder().file("s", b"x", pax={"GNU.sparse.size": "1", "GNU.sparse.map": "0,1"}).build()
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (sparse_tar, "unsupported"),
        (contiguous_tar, "unsupported"),
        (pax_sparse_tar, "unsupported"),
        (lambda: TarBuilder().file("a", b"x").build(pax_global={"comment": "x"}), "global"),
        (lambda: TarBuilder().file("../evil", b"x").build(), "escapes"),
        (lambda: TarBuilder().file("a/../../evil", b"x").build(), "escapes"),
        (lambda: TarBuilder().hardlink("l", "../etc/shadow").build(), "escapes"),
        (lambda: TarBuilder().hardlink("l", "missing").build(), "missing"),
        (lambda: TarBuilder().hardlink("l", "later").file("later", b"x").build(), "missing"),
        (lambda: TarBuilder().dir("d/").hardlink("l", "d").build(), "directory"),
        (lambda: TarBuilder().file("f", b"x").file("f/child", b"y").build(), "not a directory"),
        (lambda: TarBuilder().file("./", b"x").build(), "root"),
        (lambda: TarBuilder().file("bad\udcff", b"x").build(), "UTF-8"),
        (lambda: TarBuilder().file("a", b"x").build()[:700], "tar"),  # truncated payload
        (lambda: TarBuilder().file("a", b"x").build()[:1024] + b"garbage" * 100, "header"),
        (lambda: b"\x1f\x8b\x08\x00garbage", "decompress"),
        (lambda: gzip.compress(b"not a tar at all" * 100), "tar"),
        (lambda: b"\x28\xb5\x2f\xfd" + b"garbage", "zstd"),
    ],
)
def test_unsupported_input_is_rejected(make: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build_estargz_bytes(make())
