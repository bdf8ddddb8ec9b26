"""OCI image layouts on disk (`oci:DIR[:TAG]`), image-spec image-layout.md.

    DIR/oci-layout          {"imageLayoutVersion": "1.0.0"}
    DIR/index.json          OCI index; entries carry their tag in org.opencontainers.image.ref.name
    DIR/blobs/sha256/<hex>  every blob, manifest and index by digest

Writes go blob first; index.json (the only thing that names a tag) is replaced atomically
last, so an interrupted write never leaves a tag pointing at missing content.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store import oci
from store.digest import Digest, sha256_of
from store.errors import FormatError, NotFound, ReferenceError_

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class LayoutRef:
    path: Path
    tag: str | None

    @classmethod
    def parse(cls, text: str) -> LayoutRef:
        """`oci:DIR` or `oci:DIR:TAG` (a last `:x` is a tag only if it looks like one)."""
        if not text.startswith("oci:"):
            raise ReferenceError_(f"not an OCI layout reference: {text!r}")
        rest = text[4:]
        path, tag = rest, None
        head, sep, tail = rest.rpartition(":")
        if sep and head and _TAG.match(tail) and "/" not in tail:
            path, tag = head, tail
        if not path:
            raise ReferenceError_(f"OCI layout reference without a directory: {text!r}")
        return cls(Path(path), tag)

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


def is_layout_ref(text: str) -> bool:
    return text.startswith("oci:")


class Layout:
    """One layout directory; reading needs it to exist, writing creates it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # --- reading ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.path / "blobs" / d.algorithm / d.hex

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str, *, max_size: int = 64 << 20) -> bytes:
        path = self.blob_path(digest)
        try:
            if path.stat().st_size > max_size:
                raise FormatError(f"{self.path}: blob {digest} is larger than {max_size} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.path}: blob {digest} is missing") from None
        Digest.parse(digest).verify(data, f"{self.path}: blob {digest}")
        return data

    def index(self) -> dict[str, Any]:
        if not (self.path / LAYOUT_FILE).is_file():
            raise NotFound(f"{self.path} is not an OCI image layout (no {LAYOUT_FILE} file)")
        try:
            obj = json.loads((self.path / "index.json").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"{self.path}: index.json is missing") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{self.path}/index.json: not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests"), list):
            raise FormatError(f"{self.path}/index.json: not an OCI index")
        return obj

    def resolve(self, tag: str | None) -> oci.Descriptor:
        """The index.json entry for *tag* (or the only entry when no tag is given)."""
        entries = oci.parse_manifest(json.dumps(self.index()).encode(), oci.OCI_INDEX)
        assert isinstance(entries, oci.Index)
        if tag is None:
            if len(entries.manifests) != 1:
                raise NotFound(
                    f"{self.path}: {len(entries.manifests)} images in the layout; name one "
                    "with oci:DIR:TAG"
                )
            return entries.manifests[0]
        for desc in entries.manifests:
            if desc.annotations.get(REF_NAME_ANNOTATION) == tag:
                return desc
        raise NotFound(f"{self.path}: no image tagged {tag!r}")

    # --- writing ------------------------------------------------------------------------------

    def init(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / LAYOUT_FILE
        if not marker.exists():
            _atomic_write(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        if not (self.path / "index.json").exists():
            empty = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}
            _atomic_write(self.path / "index.json", json.dumps(empty).encode())

    def put_blob_file(self, digest: str, src: Path) -> str:
        """Copy *src* in as blob *digest*; "exists" if it was already there, else "copied"."""
        dest = self.blob_path(digest)
        if dest.is_file() and dest.stat().st_size == src.stat().st_size:
            return "exists"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return "copied"

    def put_blob_bytes(self, data: bytes) -> str:
        digest = sha256_of(data)
        dest = self.blob_path(digest)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(dest, data)
        return digest

    def tag(self, tag: str | None, descriptor: dict[str, Any]) -> None:
        """Point *tag* at *descriptor* in index.json (replacing an entry of the same tag, or
        every untagged entry when *tag* is None)."""
        index = self.index()
        desc = dict(descriptor)
        annotations = dict(desc.get("annotations") or {})
        if tag is not None:
            annotations[REF_NAME_ANNOTATION] = tag
        if annotations:
            desc["annotations"] = annotations
        keep = [
            m for m in index["manifests"]
            if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != tag
        ]
        index["manifests"] = [*keep, desc]
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", oci.OCI_INDEX)
        _atomic_write(self.path / "index.json", json.dumps(index, indent=2).encode() + b"\n")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["Layout", "LayoutRef", "REF_NAME_ANNOTATION", "is_layout_ref"]
