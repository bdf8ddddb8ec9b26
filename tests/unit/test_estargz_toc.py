"""TOC JSON parsing and the filesystem tree (estargz-format.md §3, §3.5, §7, §12)."""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import sys
import types
from typing import Any

import pytest

from store.digest import sha256_of
from store.errors import TocError
from store.estargz import ROOT_ID, Toc, TocEntry, normalize_name, parse_toc_json

EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
TOC_OFFSET = 1_000_000


def d(text: str) -> str:
    return sha256_of(text.encode())


def parse(*entries: dict[str, Any], toc_offset: int = TOC_OFFSET) -> Toc:
    return parse_toc_json(
        json.dumps({"version": 1, "entries": list(entries)}).encode(), toc_offset=toc_offset
    )


def reg(name: str, size: int, offset: int, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": "reg", "size": size, "offset": offset}
    entry["digest"] = d(name)
    entry["chunkDigest"] = d(name)
    entry.update(extra)
    return entry


def node_of(toc: Toc, path: str):  # noqa: ANN201 - Node
    node_id = toc.lookup(path)
    assert node_id is not None, path
    return toc.node(node_id)


# ---------------------------------------------------------------------------- basics


def test_empty_toc_has_a_synthetic_root() -> None:
    toc = parse()
    assert len(toc) == 0
    assert toc.node_count == 1
    root = toc.node(ROOT_ID)
    assert root.entry.type == "dir"
    assert root.entry.mode == 0o755
    assert root.parent == ROOT_ID
    assert root.nlink == 2
    assert dict(toc.children(ROOT_ID)) == {}
    assert toc.lookup("") == ROOT_ID
    assert toc.lookup("/") == ROOT_ID
    assert toc.landmark is None and toc.prefetch_end is None
    assert toc.fully_verifiable


def test_missing_entries_key_is_an_empty_toc() -> None:
    assert len(parse_toc_json(b'{"version": 1}', toc_offset=10)) == 0


def test_all_fields_are_parsed() -> None:
    toc = parse(
        {
            "name": "./usr/bin/ping",
            "type": "reg",
            "size": 5,
            "modtime": "2024-01-02T03:04:05Z",
            "mode": 0o104755,
            "uid": 1000,
            "gid": 100,
            "userName": "alice",
            "groupName": "users",
            "offset": 4000,
            "xattrs": {"security.capability": base64.b64encode(b"\x01\x00\xff").decode()},
            "digest": d("ping"),
            "chunkDigest": d("ping"),
            "NumLink": 0,  # legacy key, ignored (§3.2)
            "someFutureKey": {"x": [1, 2]},
        }
    )
    entry = node_of(toc, "usr/bin/ping").entry
    assert entry == TocEntry(
        name="usr/bin/ping",
        type="reg",
        size=5,
        mode=0o4755,
        uid=1000,
        gid=100,
        mtime_ns=1704164645 * 10**9,
        xattrs={"security.capability": b"\x01\x00\xff"},
        digest=d("ping"),
        chunks=entry.chunks,
        user_name="alice",
        group_name="users",
    )
    [chunk] = entry.chunks
    assert (chunk.file_offset, chunk.size, chunk.blob_offset, chunk.inner_offset) == (0, 5, 4000, 0)
    assert chunk.blob_end == TOC_OFFSET
    assert chunk.digest == d("ping")


def test_missing_numeric_fields_default_to_zero() -> None:
    toc = parse({"name": "f", "type": "reg", "digest": EMPTY_DIGEST})
    entry = node_of(toc, "f").entry
    assert (entry.size, entry.mode, entry.uid, entry.gid, entry.mtime_ns) == (0, 0, 0, 0, 0)
    assert entry.chunks == []
    assert entry.digest == EMPTY_DIGEST
    assert entry.xattrs == {}


@pytest.mark.parametrize(
    ("modtime", "expected_ns"),
    [
        ("2019-08-20T10:30:43Z", 1566297043 * 10**9),
        ("2019-08-20T12:30:43+02:00", 1566297043 * 10**9),
        ("2019-08-20T10:30:43.5Z", 1566297043 * 10**9 + 500_000_000),
        ("1970-01-01T00:00:00Z", 0),
        ("0001-01-01T00:00:00Z", 0),  # Go's zero time
        ("yesterday", 0),
        ("", 0),
    ],
)
def test_modtime(modtime: str, expected_ns: int) -> None:
    toc = parse({"name": "x/", "type": "dir", "modtime": modtime})
    assert node_of(toc, "x").entry.mtime_ns == expected_ns


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (16877, 0o755),  # 0o40755: file-type bits dropped
        (33261, 0o755),
        (0o104755, 0o4755),  # setuid
        (0o2755, 0o2755),  # setgid
        (0o1777, 0o1777),  # sticky
        (0o7777, 0o7777),
        (0, 0),
    ],
)
def test_mode_keeps_only_permission_and_special_bits(mode: int, expected: int) -> None:
    toc = parse({"name": "x", "type": "fifo", "mode": mode})
    assert node_of(toc, "x").entry.mode == expected


def test_user_and_group_names_are_filled_from_earlier_entries() -> None:
    toc = parse(
        {"name": "a/", "type": "dir", "uid": 5, "gid": 6, "userName": "u5", "groupName": "g6"},
        {"name": "a/b", "type": "fifo", "uid": 5, "gid": 6},
        {"name": "a/c", "type": "fifo", "uid": 5, "userName": "renamed"},
        {"name": "a/e", "type": "fifo", "uid": 5},
        {"name": "a/f", "type": "fifo", "uid": 7},
    )
    assert (node_of(toc, "a/b").entry.user_name, node_of(toc, "a/b").entry.group_name) == (
        "u5",
        "g6",
    )
    assert node_of(toc, "a/c").entry.user_name == "renamed"
    assert node_of(toc, "a/c").entry.group_name == ""  # gid 0 has no name
    assert node_of(toc, "a/e").entry.user_name == "renamed"
    assert node_of(toc, "a/f").entry.user_name == ""


def test_xattrs_are_base64_decoded_including_invalid_utf8() -> None:
    raw = {"user.foo": b"bar", "user.bin": b"\xff\xfe\xfd", "user.empty": b""}
    encoded = {k: base64.b64encode(v).decode() for k, v in raw.items()}
    toc = parse({"name": "x/", "type": "dir", "xattrs": encoded})
    assert node_of(toc, "x").entry.xattrs == raw


def test_parsed_empty_xattrs_are_read_only() -> None:
    toc = parse({"name": "x/", "type": "dir"}, {"name": "y/", "type": "dir"})
    xattrs = node_of(toc, "x").entry.xattrs
    with pytest.raises(TypeError):
        xattrs["user.a"] = b"1"
    assert node_of(toc, "y").entry.xattrs == {}


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("x", "x"),
        ("./x", "x"),
        ("/x", "x"),
        ("bin/", "bin"),
        ("./usr/lib/x.so", "usr/lib/x.so"),
        ("a//b", "a/b"),
        ("a/./b/", "a/b"),
        ("a/../b", "b"),
        ("./", ""),
        ("/", ""),
        (".", ""),
        ("", ""),
    ],
)
def test_normalize_name(raw: str, normalised: str) -> None:
    assert normalize_name(raw) == normalised


@pytest.mark.parametrize("raw", ["..", "../x", "./../x", "a/../../x", "/../etc/passwd", "a\x00b"])
def test_normalize_name_rejects_escapes_and_nul(raw: str) -> None:
    with pytest.raises(TocError):
        normalize_name(raw)


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a\x00b"])
def test_entries_with_escaping_names_are_rejected(name: str) -> None:
    with pytest.raises(TocError, match="entry 0"):
        parse({"name": name, "type": "fifo"})


def test_hardlink_target_escaping_is_rejected() -> None:
    with pytest.raises(TocError):
        parse({"name": "x", "type": "fifo"}, {"name": "y", "type": "hardlink", "linkName": "../x"})


def test_long_and_unicode_names() -> None:
    long_name = "d/" + "n" * 150
    toc = parse(
        {"name": long_name, "type": "fifo"},
        {"name": "ünïcødé/日本", "type": "fifo"},
    )
    assert node_of(toc, long_name).entry.name == long_name
    assert "日本" in toc.children(toc.lookup("ünïcødé") or 0)


def test_lone_surrogate_names_are_rejected() -> None:
    data = b'{"version": 1, "entries": [{"name": "bad\\udcff", "type": "fifo"}]}'
    with pytest.raises(TocError):
        parse_toc_json(data, toc_offset=10)


def test_whiteout_names_are_kept_verbatim() -> None:
    # Overlay conversion happens in the FUSE layer (§8); the TOC keeps the raw names.
    toc = parse(
        {"name": "etc/", "type": "dir"},
        {"name": "etc/.wh.passwd", "type": "reg", "digest": EMPTY_DIGEST},
        {"name": "opt/.wh..wh..opq", "type": "reg", "digest": EMPTY_DIGEST},
    )
    assert list(toc.children(toc.lookup("etc") or 0)) == [".wh.passwd"]
    assert list(toc.children(toc.lookup("opt") or 0)) == [".wh..wh..opq"]


# ---------------------------------------------------------------------------- tree


def test_implicit_parent_directories_are_synthesised() -> None:
    toc = parse(reg("a/b/c/file", 3, 100))
    for path in ("a", "a/b", "a/b/c"):
        entry = node_of(toc, path).entry
        assert (entry.type, entry.mode, entry.uid, entry.gid, entry.name) == (
            "dir",
            0o755,
            0,
            0,
            path,
        )
    assert len(toc) == 1  # synthesised dirs are not TOC entries
    assert toc.node_count == 5
    assert node_of(toc, "a/b/c").parent == toc.lookup("a/b")


def test_directory_listed_after_its_children_keeps_them() -> None:
    toc = parse(
        reg("a/x", 1, 100),
        {"name": "a/", "type": "dir", "mode": 0o700, "uid": 9},
        reg("a/y", 1, 200),
    )
    a = node_of(toc, "a")
    assert (a.entry.mode, a.entry.uid) == (0o700, 9)
    assert list(toc.children(a.id)) == ["x", "y"]


def test_directory_link_counts() -> None:
    # §12.3 "3dir": bar/, foo/, foo/bar/ -> 2, 3, 2; root 2 + 2 subdirs.
    toc = parse(
        {"name": "bar/", "type": "dir"},
        {"name": "foo/", "type": "dir"},
        {"name": "foo/bar/", "type": "dir"},
        {"name": "foo/file", "type": "fifo"},
    )
    assert node_of(toc, "bar").nlink == 2
    assert node_of(toc, "foo").nlink == 3
    assert node_of(toc, "foo/bar").nlink == 2
    assert toc.node(ROOT_ID).nlink == 4
    assert node_of(toc, "foo/file").nlink == 1


@pytest.mark.parametrize("root_name", ["./", "/", "."])
def test_root_entry_sets_root_metadata_without_a_loop(root_name: str) -> None:
    toc = parse(
        {"name": root_name, "type": "dir", "mode": 0o1777, "uid": 3},
        {"name": "./a/", "type": "dir"},
    )
    root = toc.node(ROOT_ID)
    assert (root.entry.mode, root.entry.uid) == (0o1777, 3)
    assert list(toc.children(ROOT_ID)) == ["a"]
    assert node_of(toc, "a").parent == ROOT_ID
    assert root.nlink == 3


def test_root_entry_must_be_a_directory() -> None:
    with pytest.raises(TocError):
        parse({"name": "./", "type": "reg", "digest": EMPTY_DIGEST})


def test_later_entry_replaces_earlier_one() -> None:
    toc = parse(
        reg("f", 3, 100),
        {"name": "f", "type": "symlink", "linkName": "elsewhere"},
        {"name": "d/", "type": "dir"},
        {"name": "d", "type": "fifo"},  # an empty dir may be replaced
        {"name": "e", "type": "fifo"},
        {"name": "e/", "type": "dir"},  # and a non-dir by a dir
    )
    assert len(toc) == 6
    assert list(toc.children(ROOT_ID)) == ["f", "d", "e"]
    assert node_of(toc, "f").entry.type == "symlink"
    assert node_of(toc, "f").entry.link_name == "elsewhere"
    assert node_of(toc, "d").entry.type == "fifo"
    assert node_of(toc, "e").entry.type == "dir"
    # Replaced nodes leave no holes: ids are dense.
    assert sorted(toc.node(i).id for i in range(toc.node_count)) == list(range(toc.node_count))
    assert toc.node_count == 4


def test_replacing_a_non_empty_directory_is_rejected() -> None:
    with pytest.raises(TocError):
        parse(
            {"name": "d/", "type": "dir"},
            {"name": "d/x", "type": "fifo"},
            {"name": "d", "type": "fifo"},
        )


def test_child_of_a_non_directory_is_rejected() -> None:
    with pytest.raises(TocError, match="not a directory"):
        parse({"name": "f", "type": "fifo"}, {"name": "f/x", "type": "fifo"})


def test_symlinks_keep_their_target_verbatim() -> None:
    toc = parse({"name": "foo/bar", "type": "symlink", "linkName": "../../x"})
    entry = node_of(toc, "foo/bar").entry
    assert (entry.type, entry.link_name) == ("symlink", "../../x")


def test_hardlinks_share_one_node() -> None:
    toc = parse(
        reg("foo/foo1", 4, 100),
        {"name": "foolink", "type": "hardlink", "linkName": "./foo/foo1"},
        {"name": "bar/second", "type": "hardlink", "linkName": "foolink"},  # via another link
    )
    original, link, second = (toc.lookup(p) for p in ("foo/foo1", "foolink", "bar/second"))
    assert original == link == second
    node = toc.node(original or 0)
    assert node.nlink == 3
    assert node.entry.name == "foo/foo1"
    assert node.entry.type == "reg"
    assert toc.children(ROOT_ID)["foolink"] == original
    # The hardlink's own TOC entry records the normalised target.
    assert [e.link_name for e in toc.entries if e.type == "hardlink"] == ["foo/foo1", "foolink"]


def test_replacing_a_hardlinked_name_keeps_the_other_name() -> None:
    toc = parse(
        reg("a", 4, 100),
        {"name": "b", "type": "hardlink", "linkName": "a"},
        reg("a", 2, 200),
    )
    a, b = node_of(toc, "a"), node_of(toc, "b")
    assert a.id != b.id
    assert (a.entry.size, a.nlink) == (2, 1)
    assert (b.entry.size, b.nlink) == (4, 1)


@pytest.mark.parametrize(
    "entries",
    [
        [{"name": "l", "type": "hardlink", "linkName": "missing"}],
        [{"name": "l", "type": "hardlink", "linkName": "later"}, {"name": "later", "type": "fifo"}],
        [{"name": "d/", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
        [{"name": "l", "type": "hardlink"}],
        [{"name": "s", "type": "symlink"}],
    ],
)
def test_bad_links_are_rejected(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(TocError):
        parse(*entries)


def test_lookup() -> None:
    toc = parse(reg("a/b/c", 1, 100), {"name": "s", "type": "symlink", "linkName": "a"})
    assert toc.lookup("a/b/c") == toc.lookup("/a/b/c") == toc.lookup("./a//b/c/")
    assert toc.lookup("a/b/missing") is None
    assert toc.lookup("a/b/c/deeper") is None  # through a file
    assert toc.lookup("s/b") is None  # symlinks are not followed
    assert toc.lookup("a/../a") is None
    with pytest.raises(KeyError):
        toc.node(toc.node_count)
    with pytest.raises(KeyError):
        toc.node(-1)
    assert dict(toc.children(toc.lookup("a/b/c") or 0)) == {}


# ---------------------------------------------------------------------------- chunks


def test_chunk_entries_attach_to_the_preceding_reg() -> None:
    # 10-byte file in 4-byte chunks; the last chunk has no chunkSize (§3.3).
    toc = parse(
        reg("f", 10, 100, chunkSize=4, chunkDigest=d("c0")),
        {
            "name": "ignored",
            "type": "chunk",
            "offset": 200,
            "chunkOffset": 4,
            "chunkSize": 4,
            "chunkDigest": d("c1"),
        },
        {"name": "f", "type": "chunk", "offset": 300, "chunkOffset": 8, "chunkDigest": d("c2")},
        reg("g", 1, 400),
    )
    chunks = node_of(toc, "f").entry.chunks
    assert [(c.file_offset, c.size, c.blob_offset, c.blob_end) for c in chunks] == [
        (0, 4, 100, 200),
        (4, 4, 200, 300),
        (8, 2, 300, 400),
    ]
    assert [c.digest for c in chunks] == [d("c0"), d("c1"), d("c2")]
    assert toc.lookup("ignored") is None
    assert len(toc) == 2


def test_chunk_size_on_the_last_chunk_of_an_exact_multiple() -> None:
    toc = parse(
        reg("f", 8, 100, chunkSize=4),
        {"name": "f", "type": "chunk", "offset": 200, "chunkOffset": 4, "chunkSize": 4},
    )
    assert [(c.file_offset, c.size) for c in node_of(toc, "f").entry.chunks] == [(0, 4), (4, 4)]


def test_unchunked_file_with_explicit_chunk_size() -> None:
    toc = parse(reg("f", 4, 100, chunkSize=4))
    assert [(c.file_offset, c.size) for c in node_of(toc, "f").entry.chunks] == [(0, 4)]


def test_digest_fallback_for_unchunked_files_only() -> None:
    toc = parse(
        {"name": "single", "type": "reg", "size": 3, "offset": 100, "digest": d("s")},
        {
            "name": "multi",
            "type": "reg",
            "size": 6,
            "offset": 200,
            "digest": d("m"),
            "chunkSize": 3,
        },
        {"name": "multi", "type": "chunk", "offset": 300, "chunkOffset": 3},
    )
    assert node_of(toc, "single").entry.chunks[0].digest == d("s")  # §6.3 fallback
    assert [c.digest for c in node_of(toc, "multi").entry.chunks] == [None, None]
    assert not toc.fully_verifiable


@pytest.mark.parametrize(
    "entries",
    [
        [{"name": "c", "type": "chunk", "offset": 100, "chunkOffset": 4}],  # no reg before
        [
            {"name": "d/", "type": "dir"},
            {"name": "c", "type": "chunk", "offset": 1, "chunkOffset": 4},
        ],
        [reg("f", 10, 100, chunkSize=4)],  # chunks cover 4 of 10 bytes
        [reg("f", 10, 100, chunkSize=20)],  # chunk larger than the file
        [reg("f", 10, 100, chunkSize=4), {"type": "chunk", "offset": 200, "chunkOffset": 5}],  # gap
        [
            reg("f", 8, 100, chunkSize=4),
            {"type": "chunk", "offset": 200, "chunkOffset": 4, "chunkSize": 8},
        ],  # overlong
        [reg("f", 0, 0, chunkSize=0), {"type": "chunk", "offset": 200, "chunkOffset": 0}],
        [reg("f", 4, 100, chunkOffset=2)],  # reg must start at 0
        [{"name": "f", "type": "reg", "size": 4, "digest": d("f")}],  # data without offset
        [reg("f", 4, TOC_OFFSET)],  # data at/after the TOC
        [reg("a", 4, 500), reg("b", 4, 400)],  # offsets decreasing
        [reg("a", 4, 500), reg("b", 4, 500)],  # duplicated entry offset (§12.2)
    ],
)
def test_inconsistent_chunks_are_rejected(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(TocError):
        parse(*entries)


def test_inner_offset_members_share_blob_end() -> None:
    # §3.6: b and c live in the member that starts at 100 (after a's payload).
    toc = parse(
        reg("a", 10, 100),
        reg("b", 10, 100, innerOffset=1536),
        reg("c", 10, 100, innerOffset=2048),
        reg("d", 10, 900),
        toc_offset=2000,
    )
    blob = [
        (c.blob_offset, c.blob_end, c.inner_offset)
        for p in "abcd"
        for c in node_of(toc, p).entry.chunks
    ]
    assert blob == [(100, 900, 0), (100, 900, 1536), (100, 900, 2048), (900, 2000, 0)]


def test_empty_files_have_no_chunks() -> None:
    toc = parse(
        reg("a", 6, 100),
        {"name": "empty", "type": "reg", "digest": EMPTY_DIGEST},
        reg("b", 6, 200),
    )
    assert node_of(toc, "empty").entry.chunks == []
    assert node_of(toc, "a").entry.chunks[0].blob_end == 200


@pytest.mark.parametrize("size", [1, 4, 5, 8, 23])
def test_chunk_index_for_every_offset_and_the_boundaries(size: int) -> None:
    chunk = 4
    entries = [reg("f", size, 100, chunkSize=chunk) if size >= chunk else reg("f", size, 100)]
    for i, start in enumerate(range(chunk, size, chunk), start=1):
        entries.append(
            {
                "name": "f",
                "type": "chunk",
                "offset": 100 + 100 * i,
                "chunkOffset": start,
                **({"chunkSize": chunk} if start + chunk <= size else {}),
            }
        )
    toc = parse(*entries)
    node = node_of(toc, "f")
    chunks = node.entry.chunks
    assert len(chunks) == -(-size // chunk)
    for offset in range(size):
        index = toc.chunk_index_for(node, offset)
        assert index == offset // chunk
        assert chunks[index].file_offset <= offset < chunks[index].file_offset + chunks[index].size
        assert toc.chunk_index_for(node.entry, offset) == index
    for bad in (size, size + 1, -1):  # offset == size is not found (§12.4)
        with pytest.raises(IndexError):
            toc.chunk_index_for(node, bad)


def test_chunk_range() -> None:
    toc = parse(
        reg("f", 10, 100, chunkSize=4),
        {"type": "chunk", "offset": 200, "chunkOffset": 4, "chunkSize": 4},
        {"type": "chunk", "offset": 300, "chunkOffset": 8},
        {"name": "d/", "type": "dir"},
    )
    f = node_of(toc, "f")
    assert toc.chunk_range(f, 0, 10) == range(0, 3)
    assert toc.chunk_range(f, 3, 2) == range(0, 2)
    assert toc.chunk_range(f, 4, 4) == range(1, 2)
    assert toc.chunk_range(f, 9, 100) == range(2, 3)
    assert toc.chunk_range(f, 10, 5) == range(0)
    assert toc.chunk_range(f, 2, 0) == range(0)
    assert toc.chunk_range(node_of(toc, "d"), 0, 5) == range(0)
    with pytest.raises(IndexError):
        toc.chunk_index_for(node_of(toc, "d"), 0)


# ---------------------------------------------------------------------------- landmarks


def test_no_prefetch_landmark() -> None:
    toc = parse(reg(".no.prefetch.landmark", 1, 100), reg("a", 1, 200))
    assert (toc.landmark, toc.prefetch_end) == ("no-prefetch", None)
    assert ".no.prefetch.landmark" in toc.children(ROOT_ID)  # hiding is the FUSE layer's job


def test_prefetch_landmark() -> None:
    toc = parse(reg("a", 1, 100), reg("./.prefetch.landmark", 1, 250), reg("b", 1, 300))
    assert (toc.landmark, toc.prefetch_end) == ("prefetch", 250)


def test_landmark_only_counts_at_the_root() -> None:
    toc = parse(reg("sub/.prefetch.landmark", 1, 100))
    assert toc.landmark is None


# ---------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'"string"',
        b"{}",
        b'{"version": 2, "entries": []}',
        b'{"version": "1", "entries": []}',
        b'{"version": true, "entries": []}',
        b'{"version": 1.0, "entries": []}',
        b'{"version": 1, "entries": {}}',
        b'{"version": 1, "entries": [1]}',
        b'{"version": 1, "entries": [{"name": "x"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "socket"}]}',
        b'{"version": 1, "entries": [{"name": 5, "type": "dir"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": "3"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": -1}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": 1.5}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": true}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": 9223372036854775808}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "uid": 4294967296}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "mode": "0755"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "xattrs": []}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "xattrs": {"a": 1}}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "xattrs": {"a": "!!"}}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "xattrs": {"": "AA=="}}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "digest": "md5:abc"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": 1, "offset": 5,'
        b' "chunkDigest": "sha256:XYZ"}]}',
        b'{"version": 1, "entries": [{"name": "x", "type": "dir", "modtime": 5}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_toc_raises_toc_error(data: bytes) -> None:
    with pytest.raises(TocError):
        parse_toc_json(data, toc_offset=1000)


def test_toc_parse_classmethod() -> None:
    data = json.dumps({"version": 1, "entries": [{"name": "a/", "type": "dir"}]}).encode()
    assert Toc.parse(data, toc_offset=10).lookup("a") == 1


# ---------------------------------------------------------------------------- scale


def test_memory_and_time_for_100k_entries() -> None:
    entries: list[dict[str, Any]] = []
    offset = 100
    for i in range(10_000):
        directory = f"usr/share/some-package-{i:05d}/"
        entries.append(
            {"name": directory, "type": "dir", "modtime": "2024-01-02T03:04:05Z", "mode": 16877}
        )
        for j in range(9):
            digest = "sha256:" + hashlib.sha256(f"{i}/{j}".encode()).hexdigest()
            entries.append(
                {
                    "name": f"{directory}file-number-{j}.txt",
                    "type": "reg",
                    "size": 1000,
                    "modtime": "2024-01-02T03:04:05Z",
                    "mode": 420,
                    "offset": offset,
                    "digest": digest,
                    "chunkDigest": digest,
                }
            )
            offset += 600
    data = json.dumps({"version": 1, "entries": entries}).encode()
    del entries
    toc = parse_toc_json(data, toc_offset=offset)
    assert len(toc) == 100_000
    assert toc.node_count == 100_003  # + root, usr, usr/share
    retained = deep_size(toc)
    assert retained < 100 << 20, f"{retained / 2**20:.1f} MiB retained"
    # About 680 bytes per entry with ~45-byte paths: no Node object per file (the tree is
    # columns indexed by node id), one shared int/str object per repeated value.
    assert retained / len(toc) < 750


def deep_size(root: object) -> int:
    """Bytes of all objects reachable from *root* (types and modules excluded)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total
