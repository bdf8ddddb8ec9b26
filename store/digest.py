"""OCI content digests: parsing, validation and streaming verification."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from store.errors import DigestMismatch, FormatError

_DIGEST_RE = re.compile(r"^(sha256):([a-f0-9]{64})$|^(sha512):([a-f0-9]{128})$")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _DIGEST_RE.match(text)
        if not m:
            raise FormatError(f"not a valid digest: {text[:80]!r}")
        algo = m.group(1) or m.group(3)
        hexpart = m.group(2) or m.group(4)
        return cls(algo, hexpart)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def verify(self, data: bytes, what: str = "content") -> None:
        """Raise DigestMismatch unless *data* hashes to this digest."""
        h = self.hasher()
        h.update(data)
        if h.hexdigest() != self.hex:
            raise DigestMismatch(what, str(self), f"{self.algorithm}:{h.hexdigest()}")


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.match(text))


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Verifier:
    """Incremental hash that is checked once all content was fed."""

    def __init__(self, expected: Digest | str, what: str = "content") -> None:
        self.expected = expected if isinstance(expected, Digest) else Digest.parse(expected)
        self.what = what
        self._h = self.expected.hasher()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def check(self) -> None:
        actual = f"{self.expected.algorithm}:{self._h.hexdigest()}"
        if actual != str(self.expected):
            raise DigestMismatch(self.what, str(self.expected), actual)
