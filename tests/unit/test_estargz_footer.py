"""Footer encoding/parsing (estargz-format.md §4.1, §4.2, §12.4)."""

from __future__ import annotations

import contextlib
import gzip
import random
import struct

import pytest

from store.errors import FooterError
from store.estargz import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    detect_footer,
    encode_footer,
    parse_footer,
)

# §4.1 example for TOC offset 0x1234, byte for byte.
SPEC_EXAMPLE = bytes.fromhex(
    "1f 8b 08 04 00 00 00 00 00 ff 1a 00 53 47 16 00 30 30 30 30 30 30 30 30 30 30 30 30"
    " 31 32 33 34 53 54 41 52 47 5a 01 00 00 ff ff 00 00 00 00 00 00 00 00"
)


def legacy_footer(offset: int, *, hexfmt: str = "%016x") -> bytes:
    """The 47-byte CRFS footer of §4.2, built by hand."""
    extra = (hexfmt % offset).encode() + b"STARGZ"
    return (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + struct.pack("<H", len(extra))
        + extra
        + b"\x01\x00\x00\xff\xff"
        + b"\x00" * 8
    )


def test_sizes() -> None:
    assert FOOTER_SIZE == 51
    assert LEGACY_FOOTER_SIZE == 47
    assert len(encode_footer(0)) == 51
    assert len(legacy_footer(0)) == 47


def test_encode_matches_spec_example() -> None:
    assert encode_footer(0x1234) == SPEC_EXAMPLE


def test_footer_is_an_empty_gzip_member() -> None:
    assert gzip.decompress(encode_footer(987654321)) == b""
    assert gzip.decompress(legacy_footer(987654321)) == b""


OFFSETS = [*range(0, 200_000, 1023), 2**32, 2**40 + 5, 2**63 - 1]


@pytest.mark.parametrize("offset", OFFSETS)
def test_roundtrip(offset: int) -> None:
    footer = encode_footer(offset)
    assert parse_footer(footer) == offset
    assert detect_footer(footer) == (offset, FOOTER_SIZE)


@pytest.mark.parametrize("offset", OFFSETS)
def test_legacy_roundtrip(offset: int) -> None:
    footer = legacy_footer(offset)
    assert parse_footer(footer) == offset
    assert detect_footer(footer) == (offset, LEGACY_FOOTER_SIZE)
    # With more tail bytes before it, the 51-byte window starts inside other data.
    assert detect_footer(b"\x1f\x8b\x08\x04" + footer) == (offset, LEGACY_FOOTER_SIZE)
    assert detect_footer(bytes(1000) + footer) == (offset, LEGACY_FOOTER_SIZE)


def test_uses_the_last_bytes_of_a_long_tail() -> None:
    tail = random.Random(1).randbytes(5000) + encode_footer(4242)
    assert parse_footer(tail) == 4242
    assert parse_footer(bytearray(tail)) == 4242
    assert parse_footer(memoryview(tail)) == 4242


def test_uppercase_hex_is_accepted() -> None:
    footer = encode_footer(0xABCDEF).replace(b"abcdef", b"ABCDEF")
    assert parse_footer(footer) == 0xABCDEF
    assert parse_footer(legacy_footer(0xABCDEF, hexfmt="%016X")) == 0xABCDEF


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_footer(-1)
    with pytest.raises(ValueError):
        encode_footer(2**63)


@pytest.mark.parametrize(
    "tail",
    [
        b"",
        b"\x1f\x8b",
        bytes(46),
        bytes(47),
        bytes(51),
        bytes(4096),
        b"\xff" * 51,
        encode_footer(5)[:-1],  # one byte short
        encode_footer(5) + b"\x00",  # trailing garbage shifts the window
        gzip.compress(b"", mtime=0) * 3,  # valid empty members, no Extra field
        SPEC_EXAMPLE.replace(b"STARGZ", b"STARGX"),
        SPEC_EXAMPLE.replace(b"SG\x16", b"GS\x16"),
        SPEC_EXAMPLE.replace(b"SG\x16\x00", b"SG\x15\x00"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b"000000000000123g"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b"+000000000001234"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b"0x00000000001234"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b"0000_00000001234"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b" 000000000001234"),
        SPEC_EXAMPLE.replace(b"0000000000001234", b"ffffffffffffffff"),  # > int64
        SPEC_EXAMPLE[:3] + b"\x0c" + SPEC_EXAMPLE[4:],  # FNAME|FEXTRA
        SPEC_EXAMPLE[:-8] + b"\x01" + SPEC_EXAMPLE[-7:],  # CRC of an empty member != 0
        SPEC_EXAMPLE[:38] + b"\x01\x01\x00\xfe\xff" + SPEC_EXAMPLE[43:],  # 1 stored byte
        legacy_footer(5)[:-1],
    ],
)
def test_malformed_footers_raise_footer_error(tail: bytes) -> None:
    with pytest.raises(FooterError):
        parse_footer(tail)


@pytest.mark.parametrize("value", [None, "x" * 60, 12345, [0] * 60])
def test_non_bytes_raise_footer_error(value: object) -> None:
    with pytest.raises(FooterError):
        parse_footer(value)  # type: ignore[arg-type]


# Bytes that fix the layout: magic/CM, XLEN, SI1/SI2, subfield LEN, STARGZ, CRC32/ISIZE.
STRUCTURAL = [0, 1, 2, 10, 11, 12, 13, 14, 15, *range(32, 38), *range(43, 51)]


@pytest.mark.parametrize("position", range(FOOTER_SIZE))
def test_any_single_byte_change_errors_or_parses(position: int) -> None:
    footer = encode_footer(0x1234)
    for flip in (0x01, 0x20, 0x80, 0xFF):
        mutated = bytearray(footer)
        mutated[position] ^= flip
        try:
            offset = parse_footer(bytes(mutated))
        except FooterError:
            continue
        # Still parseable: a changed hex digit, the FTEXT flag, MTIME/XFL/OS (free per
        # §2.3) or a deflate variant that still inflates to nothing.
        assert position not in STRUCTURAL
        assert (
            4 <= position < 10
            or 16 <= position < 32
            or 38 <= position < 43
            or (position == 3 and flip == 0x01)
        )
        assert isinstance(offset, int)


def test_random_garbage_never_crashes() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        tail = rng.randbytes(rng.randrange(0, 120))
        with pytest.raises(FooterError):
            parse_footer(tail)


def test_random_mutations_of_a_valid_tail_never_crash() -> None:
    rng = random.Random(8)
    good = rng.randbytes(100) + encode_footer(99)
    for _ in range(3000):
        tail = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            tail[rng.randrange(len(tail) - 51, len(tail))] = rng.randrange(256)
        with contextlib.suppress(FooterError):
            assert isinstance(parse_footer(bytes(tail)), int)
