"""From `<ref>/<key>` to a served layer: manifest, platform, config, layer, verified TOC.

Failures here happen before Podman has read `info`, so the FUSE front answers them all with
ENOENT and Podman pulls the layer the normal way (als-protocol.md §2.2). Nothing in this
module knows FUSE; network I/O goes through the RegistryClient.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import structlog

from store import oci
from store.als import COMPRESSION_GZIP, KeyKind, LayerRecord
from store.cache.state import LayerState
from store.chunkcache import ChunkCache
from store.errors import LayerstoreError, NotFound, NotLazyLayer
from store.layer import RemoteLayer
from store.reference import Reference
from store.registry.client import RegistryClient
from store.singleflight import SingleFlight

if TYPE_CHECKING:
    from store.cache.chunks import DiskChunkCache
    from store.cache.state import StateDB
    from store.prefetch import Prefetcher

log = structlog.get_logger(__name__)


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
    ) -> None:
        self.client = client
        self.cache = cache
        self.state = state  # what each <ref>/<key> resolved to, across restarts
        self.disk = disk
        self.prefetcher = prefetcher
        self.blob_dir = blob_dir
        self.manifest_ttl = manifest_ttl
        self.platform = platform or oci.host_platform()
        self.max_images = max_images
        self._lock = threading.Lock()
        self._images: OrderedDict[str, ResolvedImage] = OrderedDict()
        self._configs: dict[str, oci.ImageConfig] = {}
        self._layers: dict[tuple[str, str, str], RemoteLayer] = {}
        self._handles: dict[tuple[str, str], LayerHandle] = {}
        self._image_flight: SingleFlight[ResolvedImage] = SingleFlight()
        self._layer_flight: SingleFlight[RemoteLayer] = SingleFlight()
        self._handle_flight: SingleFlight[LayerHandle] = SingleFlight()

    # -- public ------------------------------------------------------------------------------

    def resolve(self, ref_text: str, key: str) -> LayerHandle:
        """The layer Podman means by `<ref>/<key>`; raises if it cannot be served lazily."""
        with self._lock:
            handle = self._handles.get((ref_text, key))
        if handle is not None:
            return handle
        return self._handle_flight.run((ref_text, key), lambda: self._resolve(ref_text, key))

    def known(self, ref_text: str, key: str) -> LayerHandle | None:
        with self._lock:
            return self._handles.get((ref_text, key))

    def handles(self) -> list[LayerHandle]:
        with self._lock:
            return list(self._handles.values())

    def close(self) -> None:
        with self._lock:
            layers = list(self._layers.values())
        for layer in layers:
            layer.close()

    # -- steps -------------------------------------------------------------------------------

    def _resolve(self, ref_text: str, key: str) -> LayerHandle:
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
        layer = self._layer(
            rec.registry, rec.repository, rec.blob_digest, rec.compressed_size, rec.toc_digest
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
        with self._lock:
            self._handles[(rec.ref, rec.key)] = handle
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
        toc_digest, usize = _lazy_facts(desc)
        config = self._config(ref, image.manifest.config)
        if len(config.diff_ids) != len(image.manifest.layers):
            raise NotLazyLayer("image config and manifest disagree on the number of layers")
        layer = self._layer(ref.registry, ref.repository, desc.digest, desc.size, toc_digest)
        record = LayerRecord(
            key=key,
            kind=kind,
            blob_digest=desc.digest,
            compressed_size=desc.size,
            diff_id=config.diff_ids[index],
            uncompressed_size=usize,
            toc_digest=toc_digest,
            compression=COMPRESSION_GZIP,
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
                    compression=COMPRESSION_GZIP,
                    layer_index=index,
                    layer_count=len(image.manifest.layers),
                )
            )
        with self._lock:
            self._handles[(ref_text, key)] = handle
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
        self, registry: str, repository: str, digest: str, size: int, toc_digest: str
    ) -> RemoteLayer:
        ident = (registry, repository, digest)
        with self._lock:
            layer = self._layers.get(ident)
        if layer is not None:
            return layer

        def open_layer() -> RemoteLayer:
            source = RegistryBlob(self.client, registry, repository, digest, size)
            pre = self.prefetcher
            opened = RemoteLayer.open(
                source,
                toc_digest,
                self.cache,
                self.blob_dir,
                disk=self.disk,
                gate=pre.gate if pre is not None else None,
                readahead=pre.readahead if pre is not None else None,
            )
            with self._lock:
                self._layers[ident] = opened
            if self.prefetcher is not None:
                self.prefetcher.layer_opened(opened)  # first use: start the prefetch
            return opened

        return self._layer_flight.run(ident, open_layer)


def _find_layer(manifest: oci.Manifest, key: str) -> tuple[int, KeyKind]:
    for i, desc in enumerate(manifest.layers):
        if desc.digest == key:
            return i, KeyKind.BLOB
    for i, desc in enumerate(manifest.layers):
        if desc.annotations.get(oci.TOC_DIGEST_ANNOTATION) == key:
            return i, KeyKind.TOC
    raise NotFound(f"no layer with digest or TOC digest {key}")


def _lazy_facts(desc: oci.Descriptor) -> tuple[str, int]:
    """The TOC digest and exact uncompressed size, or NotLazyLayer."""
    if not oci.is_gzip_layer(desc.media_type):
        raise NotLazyLayer(f"media type {desc.media_type} is not served lazily")
    toc_digest = desc.annotations.get(oci.TOC_DIGEST_ANNOTATION)
    if not toc_digest:
        raise NotLazyLayer("layer has no eStargz TOC digest annotation")
    raw_size = desc.annotations.get(oci.UNCOMPRESSED_SIZE_ANNOTATION)
    if raw_size is None or not raw_size.isdigit():
        # Podman needs the exact uncompressed size for save/push (als-protocol.md §7, G3).
        raise NotLazyLayer("layer has no valid uncompressed-size annotation")
    return toc_digest, int(raw_size)
