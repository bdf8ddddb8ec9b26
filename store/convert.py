"""`layerstore convert`: any image (registry or OCI layout) -> an eStargz image that lazy-pulls.

Pipeline, in three phases so that bad input never leaves anything under DST's tag:

1. plan: read the source manifest/index, pick platforms, read configs and check every media
   type before any layer is downloaded;
2. convert: download each distinct layer (verified) and write it as eStargz with
   store.estargz.build_estargz into a private work directory; layers that already are eStargz
   (valid footer and TOC matching their toc.digest annotation) are kept byte for byte;
3. publish: blobs first (layers, configs), then per-platform manifests by digest, then the tag.

eStargz changes the DiffID (TOC and landmark are part of the tar), so the configs'
rootfs.diff_ids are rewritten; history and everything else in the config is kept. Output is
always OCI. JSON is serialised deterministically, so the same input and options give the same
digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from store import oci
from store.digest import Verifier, sha256_of
from store.errors import FormatError, NotFound
from store.estargz import (
    DEFAULT_CHUNK_SIZE,
    build_estargz,
    normalize_name,
    open_toc,
    read_toc_bytes,
)
from store.ocilayout import Layout, LayoutRef
from store.progress import Progress, human, summary_table
from store.reference import Reference

MAX_CONFIG_SIZE = 8 << 20
_COPY_PIECE = 1 << 20
#: Annotations describing the old blob that would be wrong on the converted one.
_STALE_ANNOTATIONS = frozenset(
    {
        oci.TOC_DIGEST_ANNOTATION,
        oci.UNCOMPRESSED_SIZE_ANNOTATION,
        oci.ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION,
        oci.ZSTD_CHUNKED_MANIFEST_POSITION_ANNOTATION,
        oci.ZSTD_CHUNKED_LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
        oci.ZSTD_CHUNKED_LEGACY_MANIFEST_POSITION_ANNOTATION,
    }
)
_INPUT_KINDS = {
    oci.OCI_LAYER_GZIP: "gzip",
    oci.DOCKER_LAYER_GZIP: "gzip",
    oci.OCI_LAYER_TAR: "tar",
    oci.OCI_LAYER_ZSTD: "zstd",
}


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = 9
    prioritized: tuple[str, ...] = ()
    platform: oci.Platform | None = None
    all_platforms: bool = False
    workers: int = 0  # 0: min(cpu count, 4)


@dataclass(frozen=True, slots=True)
class LayerReport:
    source_digest: str
    source_size: int
    digest: str
    size: int
    toc_entries: int | None  # None when the layer was kept as it was
    kept: bool


@dataclass
class ConvertResult:
    digest: str  # of what DST's tag now names (manifest or index)
    media_type: str
    layers: list[LayerReport] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)  # per-platform manifest digests

    def summary(self) -> str:
        rows = [
            [
                r.source_digest[7:19],
                human(r.source_size),
                human(r.size),
                "kept" if r.kept else str(r.toc_entries),
                r.digest[7:19],
            ]
            for r in self.layers
        ]
        table = summary_table(rows, ["layer", "before", "after", "toc entries", "new digest"])
        kind = "index" if self.media_type == oci.OCI_INDEX else "manifest"
        return f"{table}\n{kind} {self.digest}"


# --- endpoints -------------------------------------------------------------------------------


class Source(Protocol):
    def top(self) -> tuple[bytes, str]: ...
    def manifest(self, desc: oci.Descriptor) -> bytes: ...
    def small_blob(self, desc: oci.Descriptor) -> bytes: ...
    def download(self, desc: oci.Descriptor, dest: BinaryIO) -> None: ...
    def mount_origin(self) -> tuple[str, str] | None: ...


class Target(Protocol):
    def put_blob(self, digest: str, path: Path, mountable: bool) -> str: ...
    def put_manifest(self, data: bytes, media_type: str) -> str: ...
    def tag(self, data: bytes, media_type: str) -> str: ...


class RegistrySource:
    def __init__(self, client: Any, ref: Reference) -> None:
        self.client = client
        self.ref = ref

    def top(self) -> tuple[bytes, str]:
        fetched = self.client.get_manifest(self.ref)
        return fetched.data, fetched.media_type

    def manifest(self, desc: oci.Descriptor) -> bytes:
        return self.client.get_manifest(self.ref.with_digest(desc.digest)).data

    def small_blob(self, desc: oci.Descriptor) -> bytes:
        return self.client.get_blob(
            self.ref.registry, self.ref.repository, desc.digest, max_size=MAX_CONFIG_SIZE
        )

    def download(self, desc: oci.Descriptor, dest: BinaryIO) -> None:
        self.client.download_blob(
            self.ref.registry, self.ref.repository, desc.digest, dest, expected_size=desc.size
        )

    def mount_origin(self) -> tuple[str, str] | None:
        return self.ref.registry, self.ref.repository


class LayoutSource:
    def __init__(self, ref: LayoutRef) -> None:
        self.layout = Layout(ref.path)
        self.tag = ref.tag

    def top(self) -> tuple[bytes, str]:
        desc = self.layout.resolve(self.tag)
        return self.layout.read_blob(desc.digest, max_size=MAX_CONFIG_SIZE), desc.media_type

    def manifest(self, desc: oci.Descriptor) -> bytes:
        return self.layout.read_blob(desc.digest, max_size=MAX_CONFIG_SIZE)

    def small_blob(self, desc: oci.Descriptor) -> bytes:
        return self.layout.read_blob(desc.digest, max_size=MAX_CONFIG_SIZE)

    def download(self, desc: oci.Descriptor, dest: BinaryIO) -> None:
        what = f"{self.layout.path}: blob {desc.digest}"
        verifier = Verifier(desc.digest, what)
        try:
            with open(self.layout.blob_path(desc.digest), "rb") as f:
                while piece := f.read(_COPY_PIECE):
                    verifier.update(piece)
                    dest.write(piece)
        except FileNotFoundError:
            raise NotFound(f"{what} is missing") from None
        if verifier.size != desc.size:
            raise FormatError(f"{what}: {verifier.size} bytes, manifest says {desc.size}")
        verifier.check()

    def mount_origin(self) -> tuple[str, str] | None:
        return None


class RegistryTarget:
    def __init__(self, pusher: Any, ref: Reference, source: Source) -> None:
        self.pusher = pusher
        self.ref = ref
        origin = source.mount_origin()
        # Cross-repository mount only works within one registry.
        self.mount_from = origin[1] if origin and origin[0] == ref.registry else None

    def put_blob(self, digest: str, path: Path, mountable: bool) -> str:
        return self.pusher.push_blob(
            self.ref.registry, self.ref.repository, digest, path,
            mount_from=self.mount_from if mountable else None,
        )

    def put_manifest(self, data: bytes, media_type: str) -> str:
        return self.pusher.put_manifest(
            self.ref.registry, self.ref.repository, sha256_of(data), data, media_type
        )

    def tag(self, data: bytes, media_type: str) -> str:
        if self.ref.tag is None:
            raise FormatError(f"destination {self.ref} has no tag")
        return self.pusher.put_manifest(
            self.ref.registry, self.ref.repository, self.ref.tag, data, media_type
        )


class LayoutTarget:
    def __init__(self, ref: LayoutRef) -> None:
        self.layout = Layout(ref.path)
        self.tag_name = ref.tag

    def put_blob(self, digest: str, path: Path, mountable: bool) -> str:
        self.layout.init()
        return self.layout.put_blob_file(digest, path)

    def put_manifest(self, data: bytes, media_type: str) -> str:
        self.layout.init()
        return self.layout.put_blob_bytes(data)

    def tag(self, data: bytes, media_type: str) -> str:
        digest = self.put_manifest(data, media_type)
        self.layout.tag(
            self.tag_name, {"mediaType": media_type, "digest": digest, "size": len(data)}
        )
        return digest


# --- plan ------------------------------------------------------------------------------------


@dataclass
class _Image:
    entry: oci.Descriptor | None  # the source index entry (platform), None for a single image
    manifest: oci.Manifest
    config: oci.ImageConfig


def _plan(source: Source, options: ConvertOptions) -> tuple[oci.Index | None, list[_Image]]:
    data, media_type = source.top()
    top = oci.parse_manifest(data, media_type)
    entries: list[oci.Descriptor | None]
    index: oci.Index | None = None
    if isinstance(top, oci.Index):
        index = top
        if options.all_platforms:
            entries = [
                d for d in top.manifests
                if d.media_type in oci.MANIFEST_MEDIA_TYPES
                and d.platform is not None
                and d.platform.os != "unknown"  # attestation manifests, not images
            ]
            if not entries:
                raise NotFound("the source index lists no image manifest with a platform")
        else:
            entries = [oci.choose_platform(top, options.platform or oci.host_platform())]
    else:
        entries = [None]
    images = []
    for entry in entries:
        if entry is None:
            manifest = top
        else:
            manifest = oci.parse_manifest(source.manifest(entry), entry.media_type)
            if not isinstance(manifest, oci.Manifest):
                raise FormatError(f"index entry {entry.digest} is a nested index: unsupported")
        assert isinstance(manifest, oci.Manifest)
        _check_media_types(manifest)
        config = oci.parse_config(source.small_blob(manifest.config))
        if len(config.diff_ids) != len(manifest.layers):
            raise FormatError(
                f"config lists {len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers"
            )
        images.append(_Image(entry, manifest, config))
    return (index if options.all_platforms else None), images


def _check_media_types(manifest: oci.Manifest) -> None:
    if manifest.config.media_type not in oci.CONFIG_MEDIA_TYPES:
        raise FormatError(f"unsupported config media type {manifest.config.media_type!r}")
    for layer in manifest.layers:
        if layer.media_type not in _INPUT_KINDS:
            raise FormatError(
                f"layer {layer.digest}: unsupported media type {layer.media_type!r}"
            )
        if layer.urls:
            raise FormatError(f"layer {layer.digest}: foreign layer with URLs is not supported")


# --- convert ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Converted:
    source: oci.Descriptor
    path: Path
    descriptor: dict[str, Any]
    diff_id: str
    report: LayerReport


class _Counting:
    """A file proxy that reports bytes read/written to a callback."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]) -> None:
        self._f = f
        self._report = report

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._report(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._report(n or 0)
        return n

    def write(self, data: bytes) -> int:
        self._report(len(data))
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _convert_layer(
    source: Source,
    desc: oci.Descriptor,
    diff_id: str,
    work: Path,
    options: ConvertOptions,
    progress: Progress,
) -> _Converted:
    key = desc.digest
    label = f"layer {desc.digest[7:19]}"
    src_path = work / f"in-{desc.digest[7:]}"
    with open(src_path, "wb") as f:
        source.download(desc, f)
    progress.start(key, label)
    kept = _existing_estargz(src_path, desc, diff_id)
    if kept is not None:
        _check_names(src_path, desc.size)
        annotations = _kept_annotations(desc, kept)
        descriptor = {
            "mediaType": oci.OCI_LAYER_GZIP,
            "digest": desc.digest,
            "size": desc.size,
            "annotations": annotations,
        }
        report = LayerReport(desc.digest, desc.size, desc.digest, desc.size, None, True)
        progress.done(key, "already eStargz, kept")
        return _Converted(desc, src_path, descriptor, diff_id, report)
    prioritized: list[str] = []
    if options.prioritized:
        # One list serves every layer: each layer gets the paths it actually holds.
        present = _layer_paths(src_path)
        prioritized = [p for p in options.prioritized if _normalized(p) in present]
    out_path = work / f"out-{desc.digest[7:]}"
    with open(src_path, "rb") as raw_in, open(out_path, "wb") as raw_out:
        result = build_estargz(
            _Counting(raw_in, lambda n: progress.add(key, bytes_in=n)),  # type: ignore[arg-type]
            _Counting(raw_out, lambda n: progress.add(key, bytes_out=n)),  # type: ignore[arg-type]
            chunk_size=options.chunk_size,
            compression_level=options.compression_level,
            prioritized=prioritized or None,
        )
    src_path.unlink()
    _check_names(out_path, result.blob_size)
    annotations = {k: v for k, v in desc.annotations.items() if k not in _STALE_ANNOTATIONS}
    annotations[oci.TOC_DIGEST_ANNOTATION] = result.toc_digest
    annotations[oci.UNCOMPRESSED_SIZE_ANNOTATION] = str(result.uncompressed_size)
    descriptor = {
        "mediaType": oci.OCI_LAYER_GZIP,
        "digest": result.blob_digest,
        "size": result.blob_size,
        "annotations": dict(sorted(annotations.items())),
    }
    report = LayerReport(
        desc.digest, desc.size, result.blob_digest, result.blob_size, result.toc_entries, False
    )
    progress.done(key, f"{result.toc_entries} TOC entries")
    return _Converted(desc, out_path, descriptor, result.diff_id, report)


def _normalized(path: str) -> str | None:
    try:
        return normalize_name(path)
    except FormatError:
        return None


def _layer_paths(path: Path) -> set[str | None]:
    """Normalised names of the entries of a (plain, gzip or zstd) tar layer."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        stream: Any = f
        if head == b"\x28\xb5\x2f\xfd":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                return {_normalized(info.name) for info in archive}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"layer is not a valid tar: {exc}") from None
        except Exception as exc:  # zstandard.ZstdError has no common base with the others
            raise FormatError(f"layer cannot be read: {exc}") from None


def _check_names(path: Path, size: int) -> None:
    """Refuse absolute and '..' member names: the writer normalises them for its own TOC,
    but keeps them verbatim in the tar, where a careless extractor would follow them."""
    with open(path, "rb") as f:

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        entries = json.loads(read_toc_bytes(read_at, size).json).get("entries", [])
    for entry in entries:
        names = [entry.get("name", "")]
        if entry.get("type") == "hardlink":
            names.append(entry.get("linkName", ""))
        for name in names:
            if name.startswith("/") or ".." in name.split("/"):
                raise FormatError(f"input tar entry {name!r}: absolute or '..' name refused")


def _existing_estargz(path: Path, desc: oci.Descriptor, diff_id: str) -> int | None:
    """The uncompressed size if the layer already is eStargz whose TOC matches its annotation
    and whose content matches the config's DiffID; None if it must be converted."""
    toc_digest = oci.toc_digest_of(desc)
    if toc_digest is None or _INPUT_KINDS[desc.media_type] != "gzip":
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as f:

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        try:
            open_toc(read_at, size, toc_digest)
        except FormatError:
            return None  # not (valid) eStargz: convert it like any gzip layer
        f.seek(0)
        usize, digest = _gunzip_digest(f)
    if digest != diff_id:
        raise FormatError(f"layer {desc.digest}: content does not match DiffID {diff_id}")
    return usize


def _gunzip_digest(f: BinaryIO) -> tuple[int, str]:
    """Size and sha256 of the decompressed stream of concatenated gzip members."""
    h = hashlib.sha256()
    size = 0
    inflater = zlib.decompressobj(wbits=31)
    try:
        while piece := f.read(_COPY_PIECE):
            while piece:
                out = inflater.decompress(piece)
                h.update(out)
                size += len(out)
                if inflater.eof:
                    piece = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    piece = b""
    except zlib.error as exc:
        raise FormatError(f"corrupt gzip stream: {exc}") from None
    return size, "sha256:" + h.hexdigest()


def _kept_annotations(desc: oci.Descriptor, usize: int) -> dict[str, str]:
    annotations = dict(desc.annotations)
    annotations[oci.UNCOMPRESSED_SIZE_ANNOTATION] = str(usize)
    return dict(sorted(annotations.items()))


# --- publish ---------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _new_config(config: oci.ImageConfig, diff_ids: Sequence[str]) -> bytes:
    raw = dict(config.raw)
    rootfs = dict(raw["rootfs"])
    rootfs["diff_ids"] = list(diff_ids)
    raw["rootfs"] = rootfs
    return _dumps(raw)


def _descriptor_json(desc: oci.Descriptor) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    if desc.platform is not None:
        p: dict[str, Any] = {
            "architecture": desc.platform.architecture,
            "os": desc.platform.os,
        }
        if desc.platform.variant:
            p["variant"] = desc.platform.variant
        out["platform"] = p
    if desc.annotations:
        out["annotations"] = dict(desc.annotations)
    return out


def convert(
    source: Source,
    target: Target,
    options: ConvertOptions,
    *,
    progress: Progress | None = None,
    workdir: Path | None = None,
) -> ConvertResult:
    progress = progress or Progress(open(os.devnull, "w"), enabled=False)  # noqa: SIM115
    index, images = _plan(source, options)
    layers: dict[str, tuple[oci.Descriptor, str]] = {}
    for image in images:
        for desc, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
            layers.setdefault(desc.digest, (desc, diff_id))
    work = Path(tempfile.mkdtemp(prefix="layerstore-convert-", dir=workdir))
    try:
        workers = options.workers or min(os.cpu_count() or 1, 4)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(layers) or 1))) as pool:
            futures = {
                digest: pool.submit(_convert_layer, source, d, i, work, options, progress)
                for digest, (d, i) in layers.items()
            }
            converted = {digest: fut.result() for digest, fut in futures.items()}
        result = ConvertResult(digest="", media_type="")
        result.layers = [converted[d].report for d in layers]
        # Phase 3 (publish) starts only now: every layer converted, nothing failed.
        manifests: list[tuple[_Image, bytes]] = []
        pending_blobs: dict[str, tuple[Path, bool]] = {}
        configs: list[bytes] = []
        for image in images:
            conv = [converted[d.digest] for d in image.manifest.layers]
            config = _new_config(image.config, [c.diff_id for c in conv])
            configs.append(config)
            manifest: dict[str, Any] = {
                "schemaVersion": 2,
                "mediaType": oci.OCI_MANIFEST,
                "config": {
                    "mediaType": oci.OCI_CONFIG,
                    "digest": sha256_of(config),
                    "size": len(config),
                },
                "layers": [c.descriptor for c in conv],
            }
            if image.manifest.annotations:
                manifest["annotations"] = dict(image.manifest.annotations)
            manifests.append((image, _dumps(manifest)))
            for c in conv:
                pending_blobs.setdefault(c.descriptor["digest"], (c.path, c.report.kept))
        for digest, (path, kept) in pending_blobs.items():
            target.put_blob(digest, path, kept)
        for config in configs:
            path = work / f"config-{sha256_of(config)[7:]}"
            path.write_bytes(config)
            target.put_blob(sha256_of(config), path, False)
        result.manifests = [sha256_of(m) for _, m in manifests]
        if index is None:
            (_, data), = manifests
            result.media_type = oci.OCI_MANIFEST
            result.digest = target.tag(data, oci.OCI_MANIFEST)
            return result
        entries = []
        for image, data in manifests:
            target.put_manifest(data, oci.OCI_MANIFEST)
            assert image.entry is not None
            entry = _descriptor_json(image.entry)
            entry.update(mediaType=oci.OCI_MANIFEST, digest=sha256_of(data), size=len(data))
            entries.append(entry)
        new_index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": entries,
        }
        if index.annotations:
            new_index["annotations"] = dict(index.annotations)
        result.media_type = oci.OCI_INDEX
        result.digest = target.tag(_dumps(new_index), oci.OCI_INDEX)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_platform(text: str) -> oci.Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not {text!r}")
    return oci.Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def read_prioritized(path: Path) -> tuple[str, ...]:
    """Paths from a --prioritize file: one per line, blank lines and '#' comments ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))


__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "LayerReport",
    "LayoutSource",
    "LayoutTarget",
    "RegistrySource",
    "RegistryTarget",
    "convert",
    "parse_platform",
    "read_prioritized",
]
