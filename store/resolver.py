"""From `<ref>/<key>` to a served layer: manifest, platform, config, layer, verified TOC.

Failures here happen before Podman has read `info`, so the FUSE front answers them all with
ENOENT and Podman pulls the layer the normal way (als-protocol.md §2.2). Nothing in this
module knows FUSE; network I/O goes through the RegistryClient.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import structlog

from store import estargz, oci, zstdchunked
from store.als import COMPRESSION_GZIP, COMPRESSION_ZSTD, KeyKind, LayerRecord
from store.cache.state import LayerState
from store.chunkcache import ChunkCache
from store.digest import is_digest
from store.errors import FormatError, LayerstoreError, NotFound, NotLazyLayer
from store.layer import RemoteLayer
from store.memory import release_free_memory
from store.reference import Reference
from store.registry.client import RegistryClient
from store.singleflight import SingleFlight

if TYPE_CHECKING:
    from store.cache.chunks import DiskChunkCache
    from store.cache.state import StateDB
    from store.cache.tails import TailCache
    from store.estargz import ReadAt
    from store.prefetch import Prefetcher

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RegistryBlob:
    """A blob in one repository of one registry: the BlobSource of a RemoteLayer."""

    client: RegistryClient
    registry: str
    repository: str
    digest: str
    size: int

    def read_range(self, offset: int, length: int) -> bytes:
        return self.client.read_range(self.registry, self.repository, self.digest, offset, length)

    def download(self, dest: BinaryIO) -> int:
        return self.client.download_blob(
            self.registry, self.repository, self.digest, dest, expected_size=self.size
        )


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    ref: Reference
    manifest: oci.Manifest
    fetched_at: float
    digest: str = ""  # of the (platform) manifest, recorded in the state DB


@dataclass(frozen=True, slots=True)
class LayerHandle:
    ref: str
    key: str
    record: LayerRecord
    layer: RemoteLayer


@dataclass(frozen=True, slots=True)
class LazyFacts:
    """What the manifest (or the state record) says about serving one layer lazily."""

    toc_digest: str  # `toc-digest` in info: the key Podman >= 5.1 asks for
    uncompressed_size: int | None  # None: derived from the layer (zstd:chunked only)
    compression: int = COMPRESSION_GZIP
    zstd: zstdchunked.TocDigests | None = None  # set for zstd:chunked layers
    layout: zstdchunked.Layout | None = None  # from the position annotations, if present


class _LayerDropped(Exception):
    """The layer a resolve was about to hand out was dropped meanwhile (retried)."""


class Resolver:
    def __init__(
        self,
        client: RegistryClient,
        *,
        cache: ChunkCache,
        blob_dir: Path,
        manifest_ttl: float = 60.0,
        platform: oci.Platform | None = None,
        max_images: int = 256,
        state: StateDB | None = None,
        disk: DiskChunkCache | None = None,
        prefetcher: Prefetcher | None = None,
        tails: TailCache | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.state = state  # what each <ref>/<key> resolved to, across restarts
        self.disk = disk
        self.tails = tails  # footer+TOC bytes kept on disk: reopening needs no registry
        self.prefetcher = prefetcher
        self.blob_dir = blob_dir
        self.manifest_ttl = manifest_ttl
        self.platform = platform or oci.host_platform()
        self.max_images = max_images
        self._lock = threading.Lock()
        self._images: OrderedDict[str, ResolvedImage] = OrderedDict()
        self._configs: dict[str, oci.ImageConfig] = {}
        self._layers: dict[tuple[str, str, str], RemoteLayer] = {}
        self._chunked: dict[tuple[str, str, str], zstdchunked.ChunkedToc] = {}
        self._tar_sizes: dict[tuple[str, str, str], int] = {}
        self._handles: dict[tuple[str, str], LayerHandle] = {}
        self._image_flight: SingleFlight[ResolvedImage] = SingleFlight()
        self._layer_flight: SingleFlight[RemoteLayer] = SingleFlight()
        self._handle_flight: SingleFlight[LayerHandle] = SingleFlight()

    # -- public ------------------------------------------------------------------------------

    def resolve(self, ref_text: str, key: str) -> LayerHandle:
        """The layer Podman means by `<ref>/<key>`; raises if it cannot be served lazily."""
        handle = self.known(ref_text, key)
        if handle is not None:
            return handle
        return self._handle_flight.run((ref_text, key), lambda: self._resolve(ref_text, key))

    def known(self, ref_text: str, key: str) -> LayerHandle | None:
        with self._lock:
            handle = self._handles.get((ref_text, key))
        # a handle made while its layer was being dropped is stale: resolve again
        return handle if handle is not None and not handle.layer.closed else None

    def handles(self) -> list[LayerHandle]:
        with self._lock:
            return list(self._handles.values())

    def drop(self, layer: RemoteLayer) -> list[tuple[str, str]]:
        """Forget *layer* and the paths that led to it (nobody can reach it any more); a
        later lookup of such a path resolves it again, from the state DB. Returns the paths."""
        with self._lock:
            layer.close()  # under the lock: a resolve storing a handle sees it closed
            paths = [p for p, h in self._handles.items() if h.layer is layer]
            for path in paths:
                del self._handles[path]
            for ident in [i for i, v in self._layers.items() if v is layer]:
                del self._layers[ident]
                self._chunked.pop(ident, None)
                self._tar_sizes.pop(ident, None)
        return paths

    def _store_handle(self, handle: LayerHandle) -> None:
        with self._lock:
            if handle.layer.closed:
                raise _LayerDropped
            self._handles[(handle.ref, handle.key)] = handle

    def close(self) -> None:
        with self._lock:
            layers = list(self._layers.values())
        for layer in layers:
            layer.close()

    # -- steps -------------------------------------------------------------------------------

    def _resolve(self, ref_text: str, key: str) -> LayerHandle:
        # A layer this resolve found may be dropped (its other paths released) before the
        # handle is stored: then the layer is opened afresh.
        while True:
            try:
                return self._resolve_once(ref_text, key)
            except _LayerDropped:
                continue  # the next attempt opens a new layer object, which nothing dropped

    def _resolve_once(self, ref_text: str, key: str) -> LayerHandle:
        recorded = self.state.get(ref_text, key) if self.state is not None else None
        if recorded is not None:
            try:
                return self._resolve_recorded(recorded)
            except LayerstoreError as exc:
                # e.g. the blob was deleted from that repository: try what the tag says now
                log.warning("layer.record_unusable", ref=ref_text, key=key, error=str(exc))
        return self._resolve_fresh(ref_text, key)

    def _resolve_recorded(self, rec: LayerState) -> LayerHandle:
        """Serve exactly what Podman was told before a restart: no manifest, no tag lookup.

        The key names the content, so the recorded blob stays right even if the tag moved.
        """
        started = time.monotonic()
        facts = LazyFacts(rec.toc_digest, rec.uncompressed_size, rec.compression)
        if rec.compression == COMPRESSION_ZSTD:
            # No annotations here: the footer locates the TOC, and the recorded digest names
            # either the compressed TOC or its JSON.
            facts = LazyFacts(
                rec.toc_digest,
                rec.uncompressed_size,
                COMPRESSION_ZSTD,
                zstdchunked.TocDigests(recorded=rec.toc_digest),
            )
        layer = self._layer(
            rec.registry, rec.repository, rec.blob_digest, rec.compressed_size, facts
        )
        record = LayerRecord(
            key=rec.key,
            kind=KeyKind(rec.kind),
            blob_digest=rec.blob_digest,
            compressed_size=rec.compressed_size,
            diff_id=rec.diff_id,
            uncompressed_size=rec.uncompressed_size,
            toc_digest=rec.toc_digest,
            compression=rec.compression,
        )
        handle = LayerHandle(rec.ref, rec.key, record, layer)
        self._store_handle(handle)
        log.info(
            "layer.prepared",
            ref=rec.ref,
            key=rec.key,
            key_kind=rec.kind,
            blob=rec.blob_digest,
            files=layer.toc.node_count,
            lazy=True,
            from_state=True,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return handle

    def _resolve_fresh(self, ref_text: str, key: str) -> LayerHandle:
        started = time.monotonic()
        ref = Reference.parse(ref_text)
        image = self._image(ref_text, ref)
        index, kind = _find_layer(image.manifest, key)
        desc = image.manifest.layers[index]
        facts = _lazy_facts(desc)
        # A TOC key is what info's toc-digest must repeat (Podman >= 5.1 checks it).
        toc_digest = key if kind is KeyKind.TOC else facts.toc_digest
        config = self._config(ref, image.manifest.config)
        if len(config.diff_ids) != len(image.manifest.layers):
            raise NotLazyLayer("image config and manifest disagree on the number of layers")
        layer = self._layer(ref.registry, ref.repository, desc.digest, desc.size, facts)
        usize = facts.uncompressed_size
        if usize is None:
            usize = self._tar_size((ref.registry, ref.repository, desc.digest), layer)
        record = LayerRecord(
            key=key,
            kind=kind,
            blob_digest=desc.digest,
            compressed_size=desc.size,
            diff_id=config.diff_ids[index],
            uncompressed_size=usize,
            toc_digest=toc_digest,
            compression=facts.compression,
        )
        handle = LayerHandle(ref_text, key, record, layer)
        if self.state is not None:
            self.state.put(
                LayerState(
                    ref=ref_text,
                    key=key,
                    kind=kind.value,
                    registry=ref.registry,
                    repository=ref.repository,
                    manifest_digest=image.digest,
                    config_digest=image.manifest.config.digest,
                    blob_digest=desc.digest,
                    compressed_size=desc.size,
                    uncompressed_size=usize,
                    toc_digest=toc_digest,
                    diff_id=config.diff_ids[index],
                    compression=facts.compression,
                    layer_index=index,
                    layer_count=len(image.manifest.layers),
                )
            )
        self._store_handle(handle)
        log.info(
            "layer.prepared",
            ref=ref_text,
            key=key,
            key_kind=kind.value,
            blob=desc.digest,
            files=layer.toc.node_count,
            lazy=True,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return handle

    def _image(self, ref_text: str, ref: Reference) -> ResolvedImage:
        with self._lock:
            image = self._images.get(ref_text)
            if image is not None:
                fresh = ref.digest is not None or (
                    time.monotonic() - image.fetched_at < self.manifest_ttl
                )
                if fresh:
                    self._images.move_to_end(ref_text)
                    return image
        return self._image_flight.run(ref_text, lambda: self._fetch_image(ref_text, ref))

    def _fetch_image(self, ref_text: str, ref: Reference) -> ResolvedImage:
        fetched = self.client.get_manifest(ref)
        parsed = oci.parse_manifest(fetched.data, fetched.media_type)
        if isinstance(parsed, oci.Index):
            # Podman passes the reference of the list; pick the host platform as it does (G14).
            desc = oci.choose_platform(parsed, self.platform)
            fetched = self.client.get_manifest(ref.with_digest(desc.digest))
            parsed = oci.parse_manifest(fetched.data, fetched.media_type)
            if not isinstance(parsed, oci.Manifest):
                raise NotFound(f"{ref}: platform entry {desc.digest} is not an image manifest")
        image = ResolvedImage(ref, parsed, time.monotonic(), fetched.digest)
        with self._lock:
            self._images[ref_text] = image
            self._images.move_to_end(ref_text)
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return image

    def _config(self, ref: Reference, desc: oci.Descriptor) -> oci.ImageConfig:
        with self._lock:
            config = self._configs.get(desc.digest)
        if config is None:
            data = self.client.get_blob(ref.registry, ref.repository, desc.digest)
            config = oci.parse_config(data)
            with self._lock:
                self._configs[desc.digest] = config
        return config

    def _layer(
        self, registry: str, repository: str, digest: str, size: int, facts: LazyFacts
    ) -> RemoteLayer:
        ident = (registry, repository, digest)
        with self._lock:
            layer = self._layers.get(ident)
        if layer is not None and not layer.closed:
            return layer

        def open_layer() -> RemoteLayer:
            source = RegistryBlob(self.client, registry, repository, digest, size)
            pre = self.prefetcher
            options = {
                "disk": self.disk,
                "gate": pre.gate if pre is not None else None,
                "readahead": pre.readahead if pre is not None else None,
            }
            if facts.zstd is not None:
                chunked = self._open_meta(
                    source,
                    lambda read_at: zstdchunked.open_toc(
                        read_at, source.size, facts.zstd, layout=facts.layout
                    ),
                )
                opened = RemoteLayer(
                    source,
                    chunked.toc,
                    self.cache,
                    self.blob_dir,
                    decode=zstdchunked.decode_chunk,
                    **options,  # type: ignore[arg-type]
                )
                with self._lock:
                    self._chunked[ident] = chunked
            else:
                toc = self._open_meta(
                    source, lambda read_at: estargz.open_toc(read_at, source.size, facts.toc_digest)
                )
                opened = RemoteLayer(
                    source,
                    toc,
                    self.cache,
                    self.blob_dir,
                    **options,  # type: ignore[arg-type]
                )
            with self._lock:
                self._layers[ident] = opened
            release_free_memory()  # the parse peak of a big TOC would otherwise stay resident
            if self.prefetcher is not None:
                self.prefetcher.layer_opened(opened)  # first use: start the prefetch
            return opened

        return self._layer_flight.run(ident, open_layer)

    def _open_meta(self, source: RegistryBlob, open_fn: Callable[[ReadAt], T]) -> T:
        """Fetch and verify a layer's TOC, from the kept tail when there is one."""
        if self.tails is None:
            return open_fn(source.read_range)
        return self.tails.open_with(source.digest, source.size, source.read_range, open_fn)

    def _tar_size(self, ident: tuple[str, str, str], layer: RemoteLayer) -> int:
        """The exact tar size of a zstd:chunked layer without a size annotation: from its
        tar-split, or by inflating the frames between the files' data (Podman 4.x layers)."""
        with self._lock:
            size = self._tar_sizes.get(ident)
            chunked = self._chunked.get(ident)
        if size is not None:
            return size
        if chunked is None:
            if layer.closed:
                raise _LayerDropped  # its TOC went with it: open it again
            raise NotLazyLayer("layer has no uncompressed-size annotation")
        started = time.monotonic()
        size = zstdchunked.uncompressed_size(chunked, layer.source.read_range)
        with self._lock:
            self._tar_sizes[ident] = size
        log.info(
            "layer.tar_size",
            blob=layer.source.digest,
            size=size,
            source="tar-split" if chunked.tar_split_size is not None else "frame-scan",
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return size


def _find_layer(manifest: oci.Manifest, key: str) -> tuple[int, KeyKind]:
    for i, desc in enumerate(manifest.layers):
        if desc.digest == key:
            return i, KeyKind.BLOB
    for i, desc in enumerate(manifest.layers):
        # The keys of c/storage's toc.GetTOCDigest: eStargz TOC or zstd:chunked manifest checksum.
        annotations = desc.annotations
        if key in (
            annotations.get(oci.TOC_DIGEST_ANNOTATION),
            annotations.get(oci.ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION),
        ):
            return i, KeyKind.TOC
    raise NotFound(f"no layer with digest or TOC digest {key}")


def _lazy_facts(desc: oci.Descriptor) -> LazyFacts:
    """How to serve a layer lazily (TOC digest, exact uncompressed size), or NotLazyLayer."""
    if oci.is_zstd_layer(desc.media_type):
        return _zstd_facts(desc)
    if not oci.is_gzip_layer(desc.media_type):
        raise NotLazyLayer(f"media type {desc.media_type} is not served lazily")
    toc_digest = desc.annotations.get(oci.TOC_DIGEST_ANNOTATION)
    if not toc_digest:
        raise NotLazyLayer("layer has no eStargz TOC digest annotation")
    raw_size = desc.annotations.get(oci.UNCOMPRESSED_SIZE_ANNOTATION)
    if raw_size is None or not raw_size.isdigit():
        # Podman needs the exact uncompressed size for save/push (als-protocol.md §7, G3).
        raise NotLazyLayer("layer has no valid uncompressed-size annotation")
    return LazyFacts(toc_digest, int(raw_size))


def _zstd_facts(desc: oci.Descriptor) -> LazyFacts:
    """zstd:chunked (containers/storage, either annotation prefix) or stargz's zstd eStargz.

    The uncompressed size comes from the eStargz annotation when present (ctr-remote writes
    it), else from the layer itself (tar-split, or the frames between file data): None here.
    """
    ann = desc.annotations
    checksum = ann.get(oci.ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION) or ann.get(
        oci.ZSTD_CHUNKED_LEGACY_MANIFEST_CHECKSUM_ANNOTATION
    )
    toc_json = ann.get(oci.TOC_DIGEST_ANNOTATION)
    if not checksum and not toc_json:
        raise NotLazyLayer("zstd layer without a TOC (plain zstd)")
    position = ann.get(oci.ZSTD_CHUNKED_MANIFEST_POSITION_ANNOTATION) or ann.get(
        oci.ZSTD_CHUNKED_LEGACY_MANIFEST_POSITION_ANNOTATION
    )
    tar_split_position = ann.get(oci.ZSTD_CHUNKED_TARSPLIT_POSITION_ANNOTATION)
    raw_size = ann.get(oci.UNCOMPRESSED_SIZE_ANNOTATION)
    try:
        digests = zstdchunked.TocDigests(
            manifest_checksum=_digest_or_none(checksum),
            toc_json=_digest_or_none(toc_json),
            tar_split=_digest_or_none(ann.get(oci.ZSTD_CHUNKED_TARSPLIT_CHECKSUM_ANNOTATION)),
        )
        layout = None
        if position:
            tar_split = None
            if tar_split_position:
                tar_split = zstdchunked.parse_tarsplit_position(tar_split_position)
            layout = zstdchunked.Layout(zstdchunked.parse_manifest_position(position), tar_split)
    except FormatError as exc:
        raise NotLazyLayer(f"zstd:chunked annotations unusable: {exc}") from None
    usize = None
    if raw_size is not None and raw_size.isascii() and raw_size.isdigit():
        usize = int(raw_size)
    # `toc-digest` must be the key Podman >= 5.1 derives (toc.GetTOCDigest): the current
    # manifest-checksum, else the eStargz TOC digest (ctr-remote's zstd layers).
    key = ann.get(oci.ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION) or toc_json or checksum
    assert key is not None
    return LazyFacts(key, usize, COMPRESSION_ZSTD, digests, layout)


def _digest_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    if not is_digest(value):
        raise FormatError(f"invalid digest {value[:80]!r}")
    return value
