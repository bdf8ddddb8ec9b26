"""Helpers shared by the convert tests (unit, registry, e2e), and tests of the helpers.

`read_estargz` is an independent check of a converted blob: it verifies the TOC against its
digest and inflates and verifies every chunk of every regular file with the format package's
reader, then hands back the file contents for comparison with the source tar.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from store.errors import DigestMismatch, FormatError
from store.estargz import build_estargz_bytes, decode_chunk, normalize_name, open_toc
from store.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Toc

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"
LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes], *, dirs: tuple[str, ...] = (), extra=None) -> bytes:
    """A PAX tar with fixed metadata; *extra(tar)* may append special entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tar.addfile(ti, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return buf.getvalue()


def tar_files(tar: bytes) -> dict[str, bytes]:
    """Regular files of a tar by normalised name (a later entry wins)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:*") as archive:
        for ti in archive:
            if ti.isreg():
                out[normalize_name(ti.name)] = archive.extractfile(ti).read()
    return out


def read_estargz(blob: bytes, toc_digest: str) -> tuple[Toc, dict[str, bytes]]:
    """Verified TOC and the content of every regular file (every chunk digest checked)."""

    def read_at(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    toc = open_toc(read_at, len(blob), toc_digest)
    files: dict[str, bytes] = {}
    for entry in toc.entries:
        if entry.type != "reg":
            continue
        parts = [decode_chunk(blob[c.blob_offset : c.blob_end], c) for c in entry.chunks]
        data = b"".join(parts)
        assert len(data) == entry.size, entry.name
        if entry.digest is not None:
            assert sha(data) == entry.digest, f"file digest of {entry.name}"
        files[entry.name] = data
    return toc, files


def content_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in LANDMARKS}


def image_config(diff_ids: list[str], arch: str = "amd64", **extra: Any) -> dict[str, Any]:
    return {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "history": [{"created_by": f"step {i}"} for i in range(len(diff_ids))],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        **extra,
    }


# --- tests of the helpers ------------------------------------------------------------------


def test_read_estargz_returns_verified_contents() -> None:
    tar = make_tar({"a.txt": b"alpha\n", "big.bin": bytes(range(256)) * 1000})
    blob, res = build_estargz_bytes(tar, chunk_size=64 << 10)
    toc, files = read_estargz(blob, res.toc_digest)
    assert content_files(files) == tar_files(tar)
    assert len(toc.entries) >= 3


def test_read_estargz_detects_a_corrupted_chunk() -> None:
    tar = make_tar({"a.txt": b"A" * 100_000})
    blob, res = build_estargz_bytes(tar, chunk_size=16 << 10)
    toc, _ = read_estargz(blob, res.toc_digest)
    chunk = next(e for e in toc.entries if e.name == "a.txt").chunks[2]
    # Re-compress the member of one chunk with different bytes of the same length.
    start, end = chunk.blob_offset, chunk.blob_end
    fake = gzip.compress(b"B" * chunk.size, mtime=0)
    bad = blob[:start] + fake + blob[end:]
    with pytest.raises((DigestMismatch, FormatError)):
        decode_chunk(bad[start : start + len(fake)], chunk)


def test_read_estargz_refuses_a_wrong_toc_digest() -> None:
    blob, _ = build_estargz_bytes(make_tar({"a": b"x"}))
    with pytest.raises(DigestMismatch):
        read_estargz(blob, sha(b"not the toc"))


def write_layout(
    root: Path,
    layers: list[tuple[bytes, str]],
    config: dict[str, Any],
    *,
    tag: str | None = "v1",
    manifest_media_type: str = OCI_MANIFEST,
    config_media_type: str = OCI_CONFIG,
    layer_annotations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """An OCI layout at *root* holding one image; returns the manifest descriptor."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        digest = sha(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    config_bytes = json.dumps(config).encode()
    descs = []
    for i, (data, mt) in enumerate(layers):
        desc: dict[str, Any] = {"mediaType": mt, "digest": put(data), "size": len(data)}
        if layer_annotations and layer_annotations[i]:
            desc["annotations"] = layer_annotations[i]
        descs.append(desc)
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_media_type,
        "config": {
            "mediaType": config_media_type,
            "digest": put(config_bytes),
            "size": len(config_bytes),
        },
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    top = {"mediaType": manifest_media_type, "digest": put(mbytes), "size": len(mbytes)}
    entry = dict(top)
    if tag:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = root / "index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    )
    index["manifests"].append(entry)
    index_path.write_text(json.dumps(index))
    return top
