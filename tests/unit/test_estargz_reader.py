"""open_toc / decode_chunk (estargz-format.md §3.5 step 9, §4.4, §5.1, §6, §12.2, §13)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib
from dataclasses import replace
from typing import Any

import pytest
from tarbuild import TarBuilder

import store.estargz
from store.digest import sha256_of
from store.errors import DigestMismatch, FooterError, FormatError, TocError
from store.estargz import (
    FOOTER_SIZE,
    Chunk,
    Toc,
    build_estargz_bytes,
    decode_chunk,
    encode_footer,
    inflate_prefix,
    iter_members,
    open_toc,
    read_toc_bytes,
)

DATA = b"0123456789abcdefghijklm"  # §12.3 "chunked_file": 23 bytes


class Remote:
    """A blob behind a read_at seam that records every request."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset : offset + length]


def layer(**options: Any) -> tuple[bytes, str]:
    builder = (
        TarBuilder()
        .dir("foo/")
        .file("foo/bar.txt", DATA)
        .file("foo/empty", b"")
        .symlink("foo/link", "bar.txt")
        .file("padding", random.Random(0).randbytes(options.pop("padding", 0)))
    )
    blob, result = build_estargz_bytes(builder.build(), **options)
    return blob, result.toc_digest


def toc_payload(blob: bytes) -> tuple[int, bytes]:
    """(toc_offset, uncompressed TOC member) of a blob."""
    toc_offset = int(blob[-FOOTER_SIZE:][16:32], 16)
    return toc_offset, gzip.decompress(blob[toc_offset:-FOOTER_SIZE])


def with_toc_member(blob: bytes, member: bytes) -> bytes:
    """Replace the TOC member of *blob* (and fix the footer)."""
    toc_offset, _ = toc_payload(blob)
    return blob[:toc_offset] + member + encode_footer(toc_offset)


def toc_tar(json_bytes: bytes, name: str = "stargz.index.json", **pax: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(json_bytes)
    info.pax_headers = pax
    return TarBuilder().raw(info, json_bytes).build()


def read_file(blob: bytes, toc: Toc, path: str) -> bytes:
    entry = toc.node(toc.lookup(path) or 0).entry
    return b"".join(decode_chunk(blob[c.blob_offset : c.blob_end], c) for c in entry.chunks)


def test_public_api_is_exported() -> None:
    for name in store.estargz.__all__:
        assert hasattr(store.estargz, name), name


# ---------------------------------------------------------------------------- open_toc


def test_small_blob_needs_one_read() -> None:
    blob, digest = layer()
    remote = Remote(blob)
    toc = open_toc(remote.read_at, len(blob), digest)
    assert remote.calls == [(0, len(blob))]
    assert toc.lookup("foo/bar.txt") is not None
    assert toc.toc_offset == int(blob[-35:-19], 16)


def test_large_blob_reads_only_the_tail() -> None:
    blob, digest = layer(padding=1 << 20, compression_level=0)
    remote = Remote(blob)
    open_toc(remote.read_at, len(blob), digest, tail_guess=64 * 1024)
    assert remote.calls == [(len(blob) - 64 * 1024, 64 * 1024)]


def test_toc_starting_before_the_tail_window_needs_a_second_read() -> None:
    blob, digest = layer()
    remote = Remote(blob)
    toc = open_toc(remote.read_at, len(blob), digest, tail_guess=100)
    tail_start = len(blob) - 100
    assert remote.calls == [(tail_start, 100), (toc.toc_offset, tail_start - toc.toc_offset)]
    assert len(toc) == 6


@pytest.mark.parametrize("tail_guess", [1, 51, 52, 10**9])
def test_odd_tail_guesses(tail_guess: int) -> None:
    blob, digest = layer()
    toc = open_toc(Remote(blob).read_at, len(blob), digest, tail_guess=tail_guess)
    assert read_file(blob, toc, "foo/bar.txt") == DATA


def test_digest_is_required_unless_verification_is_off() -> None:
    blob, _ = layer()
    with pytest.raises(ValueError):
        open_toc(Remote(blob).read_at, len(blob), None)
    toc = open_toc(Remote(blob).read_at, len(blob), None, verify=False)
    assert toc.lookup("foo") is not None


def test_wrong_toc_digest_is_detected() -> None:
    blob, digest = layer()
    other = sha256_of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        open_toc(Remote(blob).read_at, len(blob), other)
    assert (info.value.expected, info.value.actual) == (other, digest)
    with pytest.raises(FormatError):
        open_toc(Remote(blob).read_at, len(blob), "sha256:nothex")


def test_toc_digest_is_over_the_json_bytes() -> None:
    blob, digest = layer()
    payload = read_toc_bytes(Remote(blob).read_at, len(blob))
    assert sha256_of(payload.json) == digest
    assert payload.footer_size == FOOTER_SIZE
    assert json.loads(payload.json)["version"] == 1


def modified_toc_blob(blob: bytes, edit: Any) -> bytes:
    _, member = toc_payload(blob)
    with tarfile.open(fileobj=io.BytesIO(member)) as archive:
        extracted = archive.extractfile("stargz.index.json")
        assert extracted is not None
        doc = json.loads(extracted.read())
    edit(doc)
    new_json = json.dumps(doc, indent="\t").encode()
    return with_toc_member(blob, gzip.compress(toc_tar(new_json), mtime=0))


def lose_chunk_digest(doc: dict[str, Any]) -> None:
    for entry in doc["entries"]:
        if entry["name"] == "foo/bar.txt":
            del entry["chunkDigest"]


def rename_dir(doc: dict[str, Any]) -> None:
    doc["entries"][1]["name"] = "renamed/"


def duplicate_offset(doc: dict[str, Any]) -> None:
    data = [e for e in doc["entries"] if "offset" in e]
    data[1]["offset"] = data[0]["offset"]


@pytest.mark.parametrize("edit", [lose_chunk_digest, rename_dir, duplicate_offset])
def test_modified_toc_fails_verification(edit: Any) -> None:
    # §12.2: a rewritten TOC must not verify against the original digest.
    blob, digest = layer()
    tampered = modified_toc_blob(blob, edit)
    with pytest.raises(DigestMismatch):
        open_toc(Remote(tampered).read_at, len(tampered), digest)


def test_modified_toc_parses_when_unverified() -> None:
    blob, _ = layer()
    tampered = modified_toc_blob(blob, rename_dir)
    toc = open_toc(Remote(tampered).read_at, len(tampered), None, verify=False)
    assert toc.lookup("renamed") is not None
    dup = modified_toc_blob(blob, duplicate_offset)
    with pytest.raises(TocError):
        open_toc(Remote(dup).read_at, len(dup), None, verify=False)


def test_toc_entry_may_carry_pax_records() -> None:
    blob, _ = layer()
    _, member = toc_payload(blob)
    json_bytes = read_toc_bytes(Remote(blob).read_at, len(blob)).json
    for tar in (
        toc_tar(json_bytes, comment="written by someone else"),
        toc_tar(json_bytes, name="short", path="stargz.index.json"),  # PAX path wins
    ):
        patched = with_toc_member(blob, gzip.compress(tar, mtime=0))
        toc = open_toc(Remote(patched).read_at, len(patched), sha256_of(json_bytes))
        assert len(toc) == 6


def test_toc_member_from_another_gzip_writer() -> None:
    # Readers must accept any RFC 1952 member, e.g. with FNAME set (§2.3).
    blob, digest = layer()
    _, member = toc_payload(blob)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(member) + deflate.flush()
    header = b"\x1f\x8b\x08\x08\x12\x34\x56\x78\x00\x03toc.tar\x00"
    trailer = zlib.crc32(member).to_bytes(4, "little") + len(member).to_bytes(4, "little")
    patched = with_toc_member(blob, header + body + trailer)
    assert len(open_toc(Remote(patched).read_at, len(patched), digest)) == 6


def test_legacy_footer_blob() -> None:
    blob, digest = layer()
    toc_offset, _ = toc_payload(blob)
    extra = b"%016xSTARGZ" % toc_offset
    legacy = (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00"
        + extra
        + b"\x01\x00\x00\xff\xff"
        + bytes(8)
    )
    old = blob[:-FOOTER_SIZE] + legacy
    payload = read_toc_bytes(Remote(old).read_at, len(old))
    assert payload.footer_size == 47
    assert open_toc(Remote(old).read_at, len(old), digest).lookup("foo/bar.txt") is not None


def test_truncated_and_short_blobs() -> None:
    blob, digest = layer()
    for cut in (blob[:-1], blob[:46], b"", blob[: len(blob) // 2]):
        with pytest.raises(FooterError):
            open_toc(Remote(cut).read_at, len(cut), digest)


def test_footer_pointing_past_the_toc_end() -> None:
    blob, digest = layer()
    for offset in (len(blob) - FOOTER_SIZE, len(blob), 2**62):
        bad = blob[:-FOOTER_SIZE] + encode_footer(offset)
        with pytest.raises(FooterError):
            open_toc(Remote(bad).read_at, len(bad), digest)


def test_short_read_is_a_format_error() -> None:
    blob, digest = layer()
    with pytest.raises(FormatError, match="returned"):
        open_toc(lambda off, n: blob[off : off + n - 1], len(blob), digest)
    # The caller claims a bigger blob than the seam can deliver.
    with pytest.raises(FormatError):
        open_toc(Remote(blob).read_at, len(blob) + 10, digest)


def test_toc_size_limit() -> None:
    blob, digest = layer()
    with pytest.raises(TocError, match="exceeds"):
        open_toc(Remote(blob).read_at, len(blob), digest, max_toc_size=100)
    # A small compressed member that inflates beyond the limit (a "zip bomb").
    bomb = toc_tar(b" " * (2 << 20))
    patched = with_toc_member(blob, gzip.compress(bomb, mtime=0))
    with pytest.raises(TocError):
        open_toc(Remote(patched).read_at, len(patched), digest, max_toc_size=1 << 20)


@pytest.mark.parametrize(
    "member",
    [
        b"not gzip at all",
        gzip.compress(b"", mtime=0),  # empty member: no tar header
        gzip.compress(b"\x00" * 1024, mtime=0),  # end-of-archive only
        gzip.compress(b"garbage" * 200, mtime=0),
        gzip.compress(toc_tar(b"{}", name="./stargz.index.json"), mtime=0),  # exact name (§3.1)
        gzip.compress(toc_tar(b"{}", name="other.json"), mtime=0),
        gzip.compress(toc_tar(b'{"version": 1, "entries": []}')[:520], mtime=0),  # truncated
        gzip.compress(toc_tar(b"{}"), mtime=0)[:-9],  # member cut short
        gzip.compress(b"x" * 400, mtime=0)[:-8] + b"\x00" * 8,  # bad CRC
    ],
)
def test_broken_toc_members(member: bytes) -> None:
    blob, _ = layer()
    patched = with_toc_member(blob, member)
    with pytest.raises(TocError):
        read_toc_bytes(Remote(patched).read_at, len(patched))


def test_toc_entry_must_be_a_regular_file() -> None:
    blob, _ = layer()
    info = tarfile.TarInfo("stargz.index.json")
    info.type = tarfile.SYMTYPE
    info.linkname = "x"
    patched = with_toc_member(blob, gzip.compress(TarBuilder().raw(info).build(), mtime=0))
    with pytest.raises(TocError, match="type"):
        read_toc_bytes(Remote(patched).read_at, len(patched))


def test_toc_split_over_two_members_is_rejected() -> None:
    # §13: exactly one member is inflated; a TOC spread over two is truncated.
    blob, _ = layer()
    _, member = toc_payload(blob)
    split = gzip.compress(member[:700], mtime=0) + gzip.compress(member[700:], mtime=0)
    patched = with_toc_member(blob, split)
    with pytest.raises(TocError):
        read_toc_bytes(Remote(patched).read_at, len(patched))


def test_invalid_json_with_matching_digest() -> None:
    blob, _ = layer()
    bad_json = b'{"version": 1, "entries": [{"name": "x", "type": "weird"}]}'
    patched = with_toc_member(blob, gzip.compress(toc_tar(bad_json), mtime=0))
    with pytest.raises(TocError):
        open_toc(Remote(patched).read_at, len(patched), sha256_of(bad_json))


def test_random_corruption_of_the_tail_only_raises_format_errors() -> None:
    blob, digest = layer()
    toc_offset, _ = toc_payload(blob)
    rng = random.Random(11)
    outcomes: set[str] = set()
    for _ in range(500):
        damaged = bytearray(blob)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(toc_offset, len(blob))] ^= 1 << rng.randrange(8)
        try:
            open_toc(Remote(bytes(damaged)).read_at, len(damaged), digest)
            outcomes.add("ok")  # e.g. a changed MTIME byte in a gzip header
        except FormatError as exc:
            outcomes.add(type(exc).__name__)
    assert {"FooterError", "TocError"} <= outcomes


# ---------------------------------------------------------------------------- decode_chunk


def test_read_at_every_offset_of_a_chunked_file() -> None:
    blob, digest = layer(chunk_size=4)
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    node = toc.node(toc.lookup("foo/bar.txt") or 0)
    assert len(node.entry.chunks) == 6
    for offset in range(len(DATA)):
        chunk = node.entry.chunks[toc.chunk_index_for(node, offset)]
        data = decode_chunk(blob[chunk.blob_offset : chunk.blob_end], chunk)
        assert data == DATA[chunk.file_offset : chunk.file_offset + chunk.size]
        assert data[offset - chunk.file_offset] == DATA[offset]
        # A ranged read [offset, end) assembled from the chunks it touches.
        pieces = [
            decode_chunk(blob[c.blob_offset : c.blob_end], c)
            for c in (node.entry.chunks[i] for i in toc.chunk_range(node, offset, len(DATA)))
        ]
        first = node.entry.chunks[toc.chunk_index_for(node, offset)].file_offset
        assert b"".join(pieces)[offset - first :] == DATA[offset:]


def test_raw_may_be_longer_than_the_chunk_or_an_exact_prefix() -> None:
    blob, digest = layer()
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    [chunk] = toc.node(toc.lookup("foo/bar.txt") or 0).entry.chunks
    assert decode_chunk(blob[chunk.blob_offset :], chunk) == DATA
    # The shortest prefix that still inflates to the whole chunk works too.
    shortest = next(
        n
        for n in range(1, chunk.blob_end - chunk.blob_offset + 1)
        if _decodes(blob[chunk.blob_offset : chunk.blob_offset + n], chunk)
    )
    assert decode_chunk(blob[chunk.blob_offset : chunk.blob_offset + shortest], chunk) == DATA
    with pytest.raises(FormatError):
        decode_chunk(blob[chunk.blob_offset : chunk.blob_offset + shortest - 1], chunk)
    assert decode_chunk(bytearray(blob[chunk.blob_offset : chunk.blob_end]), chunk) == DATA
    assert decode_chunk(memoryview(blob)[chunk.blob_offset : chunk.blob_end], chunk) == DATA


def _decodes(raw: bytes, chunk: Chunk) -> bool:
    try:
        decode_chunk(raw, chunk)
    except FormatError:
        return False
    return True


def test_flipped_payload_byte_is_a_digest_mismatch() -> None:
    # Level 0 stores the payload verbatim: flip its first byte (§12.2). The member goes on
    # with padding and headers, so inflation stops before the gzip CRC could object.
    blob, digest = layer(compression_level=0)
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    [chunk] = toc.node(toc.lookup("foo/bar.txt") or 0).entry.chunks
    damaged = bytearray(blob[chunk.blob_offset : chunk.blob_end])
    payload_start = 10 + 5  # gzip header + stored-block header
    assert damaged[payload_start : payload_start + len(DATA)] == DATA
    damaged[payload_start] ^= 0xFF
    with pytest.raises(DigestMismatch) as info:
        decode_chunk(bytes(damaged), chunk)
    assert info.value.expected == chunk.digest
    assert info.value.actual == sha256_of(bytes([DATA[0] ^ 0xFF]) + DATA[1:])


def test_any_corrupted_byte_never_yields_wrong_data() -> None:
    blob, digest = layer(chunk_size=4)
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    for chunk in toc.node(toc.lookup("foo/bar.txt") or 0).entry.chunks:
        raw = blob[chunk.blob_offset : chunk.blob_end]
        expected = DATA[chunk.file_offset : chunk.file_offset + chunk.size]
        for position in range(len(raw)):
            damaged = bytearray(raw)
            damaged[position] ^= 0x55
            with contextlib.suppress(FormatError):
                assert decode_chunk(bytes(damaged), chunk) == expected  # e.g. MTIME byte


def test_wrong_or_missing_chunk_digest() -> None:
    blob, digest = layer()
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    [chunk] = toc.node(toc.lookup("foo/bar.txt") or 0).entry.chunks
    raw = blob[chunk.blob_offset : chunk.blob_end]
    with pytest.raises(DigestMismatch):
        decode_chunk(raw, replace(chunk, digest=sha256_of(b"other")))
    with pytest.raises(FormatError, match="unverified"):
        decode_chunk(raw, replace(chunk, digest=None))


def test_inner_offset_and_multi_member_ranges() -> None:
    raw = gzip.compress(b"hello ", mtime=0) + gzip.compress(b"world", mtime=0) + b"junk"
    chunk = Chunk(0, 8, 0, len(raw), 3, sha256_of(b"lo world"))
    assert decode_chunk(raw, chunk) == b"lo world"
    assert inflate_prefix(raw, 11) == b"hello world"
    with pytest.raises(FormatError):
        inflate_prefix(raw, 12)  # the "junk" is no gzip member
    with pytest.raises(FormatError):
        inflate_prefix(gzip.compress(b"hello ", mtime=0), 7)  # ends at a member boundary
    with pytest.raises(FormatError):
        inflate_prefix(b"", 1)
    assert inflate_prefix(b"", 0) == b""


def test_min_chunk_layers_read_back() -> None:
    files = {f"f{i}": random.Random(i).randbytes(i * 300) for i in range(1, 30)}
    builder = TarBuilder()
    for name, data in files.items():
        builder.file(name, data)
    blob, result = build_estargz_bytes(builder.build(), min_chunk_size=2000, chunk_size=2048)
    toc = open_toc(Remote(blob).read_at, len(blob), result.toc_digest)
    chunks = [c for e in toc.entries for c in e.chunks]
    assert any(c.inner_offset for c in chunks)
    assert len({c.blob_offset for c in chunks}) < len(chunks)
    for name, data in files.items():
        assert read_file(blob, toc, name) == data


def test_iter_members() -> None:
    blob, _ = layer(chunk_size=4)
    members = list(iter_members(blob))
    assert b"".join(out for _, out in members) == gzip.decompress(blob)
    assert members[0][0] == 0 and members[-1] == (len(blob) - FOOTER_SIZE, b"")
    with pytest.raises(FormatError):
        list(iter_members(blob[:-1]))
    with pytest.raises(FormatError):
        list(iter_members(blob + b"x"))


def test_digest_of_the_landmark_chunk() -> None:
    blob, digest = layer()
    toc = open_toc(Remote(blob).read_at, len(blob), digest)
    [chunk] = toc.node(toc.lookup(".no.prefetch.landmark") or 0).entry.chunks
    assert decode_chunk(blob[chunk.blob_offset : chunk.blob_end], chunk) == b"\x0f"
    assert chunk.digest == "sha256:" + hashlib.sha256(b"\x0f").hexdigest()
