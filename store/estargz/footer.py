"""The eStargz footer: an empty gzip member whose Extra field holds the TOC offset.

Layouts are in estargz-format.md §4.1 (51 bytes, RFC 1952 subfield "SG") and §4.2
(47 bytes, legacy CRFS stargz, raw Extra field). Parsing never raises anything but
FooterError, whatever bytes it is given.
"""

from __future__ import annotations

import struct
import zlib

from store.errors import FooterError

__all__ = ["FOOTER_SIZE", "LEGACY_FOOTER_SIZE", "encode_footer", "parse_footer", "detect_footer"]

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

# §4.1: magic, CM=deflate, FLG=FEXTRA, MTIME=0, XFL=0, OS=255 (unknown).
_GZIP_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
# An empty final stored block followed by CRC32=0 and ISIZE=0: the member inflates to b"".
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
_MAGIC = b"STARGZ"
_SUBFIELD_LEN = 16 + len(_MAGIC)  # 22: hex offset + magic
_XLEN = 4 + _SUBFIELD_LEN  # 26: SI1, SI2, LEN(2) + payload
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
_MAX_OFFSET = (1 << 63) - 1  # the reference parses a signed 64-bit value


def encode_footer(toc_offset: int) -> bytes:
    """Return the 51-byte footer pointing at the TOC member at *toc_offset* (§4.1)."""
    if not 0 <= toc_offset <= _MAX_OFFSET:
        raise ValueError(f"TOC offset out of range: {toc_offset}")
    extra = b"SG" + struct.pack("<H", _SUBFIELD_LEN) + b"%016x" % toc_offset + _MAGIC
    footer = _GZIP_HEADER + struct.pack("<H", _XLEN) + extra + _EMPTY_BODY
    assert len(footer) == FOOTER_SIZE
    return footer


def parse_footer(tail: bytes) -> int:
    """Return the TOC offset recorded in the last bytes of *tail*.

    *tail* should hold at least the last 51 bytes of the blob; the legacy 47-byte form is
    tried on the last 47 bytes when the 51-byte form does not match (§4.2).
    """
    return detect_footer(tail)[0]


def detect_footer(tail: bytes) -> tuple[int, int]:
    """Like parse_footer, but return ``(toc_offset, footer_size)``.

    The footer size tells the reader where the compressed TOC ends (§4.1: it occupies
    ``[toc_offset, blob_size - footer_size)``).
    """
    if not isinstance(tail, bytes | bytearray | memoryview):
        raise FooterError(f"footer must be bytes, not {type(tail).__name__}")
    data = bytes(tail[-FOOTER_SIZE:])
    if len(data) < LEGACY_FOOTER_SIZE:
        raise FooterError(f"blob tail too short for a footer ({len(data)} bytes)")
    problems = []
    if len(data) == FOOTER_SIZE:
        try:
            return _parse_estargz(data), FOOTER_SIZE
        except FooterError as exc:
            problems.append(str(exc))
    # A legacy footer seen as 51 bytes starts 4 bytes early and fails the magic check,
    # so trying the modern form first is unambiguous (§4.2).
    try:
        return _parse_legacy(data[-LEGACY_FOOTER_SIZE:]), LEGACY_FOOTER_SIZE
    except FooterError as exc:
        problems.append(str(exc))
    raise FooterError("no eStargz footer: " + "; ".join(problems))


def _parse_estargz(data: bytes) -> int:
    _check_header_and_body(data, _XLEN, "eStargz")
    extra = data[12 : 12 + _XLEN]
    if extra[0:2] != b"SG":
        raise FooterError("eStargz footer: Extra subfield id is not 'SG'")
    if extra[2:4] != struct.pack("<H", _SUBFIELD_LEN):
        raise FooterError("eStargz footer: Extra subfield length is not 22")
    return _parse_payload(extra[4:], "eStargz")


def _parse_legacy(data: bytes) -> int:
    _check_header_and_body(data, _SUBFIELD_LEN, "legacy")
    return _parse_payload(data[12 : 12 + _SUBFIELD_LEN], "legacy")


def _check_header_and_body(data: bytes, xlen: int, kind: str) -> None:
    # Only the fields that fix the layout are compared strictly; MTIME, XFL and OS are free
    # (§2.3: readers must not depend on them). FNAME/FCOMMENT/FHCRC would move the Extra
    # field out of place, so only FEXTRA (plus the harmless FTEXT bit) is allowed.
    if data[0:3] != b"\x1f\x8b\x08":
        raise FooterError(f"{kind} footer: not a gzip/deflate header")
    if data[3] & ~0x01 != 0x04:
        raise FooterError(f"{kind} footer: unexpected gzip flags {data[3]:#04x}")
    if struct.unpack("<H", data[10:12])[0] != xlen:
        raise FooterError(f"{kind} footer: Extra length is not {xlen}")
    body = data[12 + xlen :]
    if body[-8:] != b"\x00" * 8:
        raise FooterError(f"{kind} footer: CRC32/ISIZE of an empty member must be zero")
    # Accept any 5-byte deflate stream that inflates to nothing, not just the usual one.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body[:-8])
    except zlib.error as exc:
        raise FooterError(f"{kind} footer: invalid deflate data ({exc})") from None
    if out or not inflater.eof or inflater.unused_data:
        raise FooterError(f"{kind} footer: member is not empty")


def _parse_payload(payload: bytes, kind: str) -> int:
    hexpart, magic = payload[:16], payload[16:]
    if magic != _MAGIC:
        raise FooterError(f"{kind} footer: magic 'STARGZ' missing")
    # int(x, 16) would also accept '+', '_', whitespace and '0x'; insist on 16 hex digits.
    if not all(b in _HEXDIGITS for b in hexpart):
        raise FooterError(f"{kind} footer: TOC offset is not hexadecimal")
    offset = int(hexpart, 16)
    if offset > _MAX_OFFSET:
        raise FooterError(f"{kind} footer: TOC offset {offset:#x} out of range")
    return offset
