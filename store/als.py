"""Additional-layer-store protocol records (als-protocol.md §2-§5), free of I/O.

- the `<base64(ref)>` directory-name codec,
- which kind of key Podman used (`sha256:` of the compressed blob for Podman <= 5.0, of the
  eStargz TOC for Podman >= 5.1),
- the `info` JSON that containers/storage decodes into its Layer struct,
- the `use` / `rmdir` reference counts.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import threading
from dataclasses import dataclass

from store.digest import is_digest
from store.errors import ReferenceError_

# containers/storage pkg/archive Compression enum (als-protocol.md §3).
COMPRESSION_GZIP = 2
COMPRESSION_ZSTD = 4


def encode_ref(ref: str) -> str:
    """Directory name Podman uses for *ref*: standard base64 with padding."""
    return base64.b64encode(ref.encode()).decode("ascii")


def decode_ref(name: str) -> str:
    """Inverse of encode_ref. Missing padding is accepted defensively (§11.2)."""
    if not name or len(name) > 255 or not name.isascii():
        raise ReferenceError_(f"not a base64 reference name: {name[:60]!r}")
    padded = name + "=" * (-len(name) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ReferenceError_(f"not a base64 reference name: {name[:60]!r}") from exc


def is_key_name(name: str) -> bool:
    return is_digest(name)


class KeyKind(enum.Enum):
    BLOB = "blob"  # compressed blob digest (Podman <= 5.0)
    TOC = "toc"  # TOC digest annotation (Podman >= 5.1)


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """Everything `info` needs about one layer, as found in the manifest and config."""

    key: str
    kind: KeyKind
    blob_digest: str
    compressed_size: int
    diff_id: str
    uncompressed_size: int
    toc_digest: str
    compression: int = COMPRESSION_GZIP

    def info_json(self) -> bytes:
        """The `info` file content, stable bytes for a given record (§3, §11.4).

        Blob keys (Podman 4.3) need `diff-digest` and an exact `diff-size`: layer IDs and
        `podman save` depend on them. TOC keys (Podman 5) need `toc-digest` == key and the
        DiffID as `flags.expected-layer-diffid`; `compressed-diff-digest` is left out there
        (gotcha G10).
        """
        if self.kind is KeyKind.BLOB:
            rec: dict[str, object] = {
                "compressed-diff-digest": self.blob_digest,
                "compressed-size": self.compressed_size,
                "diff-digest": self.diff_id,
                "diff-size": self.uncompressed_size,
                "compression": self.compression,
            }
        else:
            rec = {
                "toc-digest": self.toc_digest,
                "compressed-size": self.compressed_size,
                "diff-size": self.uncompressed_size,
                "compression": self.compression,
                "flags": {"expected-layer-diffid": self.diff_id},
            }
        return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"


class RefCounts:
    """`use` (+1) and `rmdir` (-1) notifications per layer path (§5).

    Counts are advisory: Podman's side is not persistent, so a release for a layer never
    seen in use (e.g. after a restart) is accepted and the count never goes below zero.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def use(self, ref: str, key: str) -> int:
        with self._lock:
            n = self._counts.get((ref, key), 0) + 1
            self._counts[(ref, key)] = n
            return n

    def release(self, ref: str, key: str) -> int:
        with self._lock:
            n = max(0, self._counts.get((ref, key), 0) - 1)
            if n:
                self._counts[(ref, key)] = n
            else:
                self._counts.pop((ref, key), None)
            return n

    def count(self, ref: str, key: str) -> int:
        with self._lock:
            return self._counts.get((ref, key), 0)

    def in_use(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)
