"""zstd:chunked layers through a real `layerstore serve` mount and the real local registry.

Three producers of the same layer tar:

- `podman`: the machine's `podman push --compression-format zstd:chunked` (Podman 4.3: 40-byte
  footer, `io.containers.zstd-chunked.*` annotations, no tar-split, no size annotation);
- `ctr`: `ctr-remote image convert --zstdchunked` (stargz-snapshotter's zstd eStargz: TOC digest
  of the JSON, uncompressed-size annotation);
- `spec5`: the Podman 5 layout (64-byte footer, tar-split, `io.github.containers.*` annotations)
  built to spec by tests/unit/zstdchunked_build.py (real Podman 5 blobs: tests/e2e).

For each: `diff/` equals the tar, reads are range requests only, `blob` is the registry blob byte
for byte, and `info` is right for both key kinds.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from store import zstdchunked
from store.errors import FormatError
from tests.fuse.test_store_mount import expected_view, layer_dir, sample_tar, walk
from tests.harness import images
from tests.harness.containerd import Containerd
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LayerBlob, LocalRegistry
from tests.harness.store import StoreProcess
from tests.harness.zstdchunked import (
    MT_ZSTD,
    blob,
    fetch_zstd_chunked,
    go_tar,
    podman_push_zstd_chunked,
)
from tests.unit.zstdchunked_build import build

GH = "io.github.containers.zstd-chunked."
OLD = "io.containers.zstd-chunked."
TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANN = "io.containers.estargz.uncompressed-size"
VARIANTS = ("podman", "ctr", "spec5")


@dataclass
class Variant:
    name: str
    image: images.TestImage
    tar: bytes  # what the layer blob decompresses to

    @property
    def desc(self) -> dict:
        return self.image.manifest["layers"][0]

    @property
    def digest(self) -> str:
        return self.desc["digest"]

    @property
    def ann(self) -> dict[str, str]:
        return self.desc.get("annotations", {})

    @property
    def toc_key(self) -> str | None:
        """What Podman >= 5.1 would ask for (c/storage toc.GetTOCDigest), if anything."""
        return self.ann.get(GH + "manifest-checksum") or self.ann.get(TOC_ANN)


def unzstd(data: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    return b"".join(iter(lambda: reader.read(1 << 20), b""))


@pytest.fixture(scope="module")
def source_tar() -> bytes:
    return go_tar(sample_tar())


@pytest.fixture(scope="module")
def variants(
    registry: LocalRegistry, source_tar: bytes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Variant]]:
    tree = images.apply_layers([source_tar])
    gz = images.push(
        registry, "fuse/zc-src", "gzip", [images.gzip_layer(source_tar)],
        ["sha256:" + images.sha256_hex(source_tar)], tree,
    )
    work = tmp_path_factory.mktemp("zc-images")
    env = PodmanEnv(work / "podman", registry.host)
    try:
        podman_push_zstd_chunked(env, gz.ref, f"{registry.host}/fuse/zc:podman")
    finally:
        env.cleanup()
    ctd = Containerd(work / "containerd")
    try:
        ctd.start()
        ctd.convert_zstdchunked(gz.ref, f"{registry.host}/fuse/zc:ctr")
    finally:
        ctd.stop()
    spec = build(source_tar, "podman5", chunk_size=64 * 1024)
    spec_pushed = registry.push_image(
        "fuse/zc", "spec5", [LayerBlob(spec.blob, MT_ZSTD, spec.annotations)],
        images.image_config([spec.diff_id]),
    )
    assert spec_pushed.manifest["layers"][0]["digest"] == spec.digest
    out = {}
    for tag in VARIANTS:
        img = fetch_zstd_chunked(registry.host, "fuse/zc", tag, tree)
        out[tag] = Variant(tag, img, unzstd(blob(registry.host, "fuse/zc", img.layer_digests[0])))
    yield out


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest, variants: dict[str, Variant]) -> Variant:
    return variants[request.param]


def test_producers_wrote_what_we_expect(variants: dict[str, Variant], source_tar: bytes) -> None:
    podman, ctr, spec5 = (variants[v] for v in VARIANTS)
    # Podman 4.3: legacy keys only, and its blob decompresses to the source tar exactly
    assert set(podman.ann) == {OLD + "manifest-checksum", OLD + "manifest-position"}
    assert podman.tar == source_tar
    assert podman.image.diff_ids == ["sha256:" + images.sha256_hex(source_tar)]
    assert {TOC_ANN, SIZE_ANN, OLD + "manifest-checksum"} <= set(ctr.ann)
    assert GH + "tarsplit-position" in spec5.ann
    for v in variants.values():
        assert v.image.diff_ids == ["sha256:" + hashlib.sha256(v.tar).hexdigest()], v.name


def test_lookup_and_reads_are_range_requests_only(
    variant: Variant, registry: LocalRegistry, mount: Path
) -> None:
    """The first test to touch each layer: lookup, info and every file of diff/ without one
    whole-blob GET."""
    mark = registry.mark()
    ldir = layer_dir(mount, variant.image, variant.digest)
    info = json.loads((ldir / "info").read_bytes())
    walk(ldir / "diff")  # reads every regular file
    assert registry.blob_gets(mark, variant.digest, status=200) == []
    ranged = registry.blob_gets(mark, variant.digest, status=206)
    assert ranged, "no range request at all?"
    assert info["diff-size"] == len(variant.tar)


def test_diff_tree_equals_the_tar(variant: Variant, mount: Path, source_tar: bytes) -> None:
    # ctr-remote's tar also holds `.no.prefetch.landmark`, which diff/ hides: compare with the
    # source tar every producer started from
    want = expected_view(source_tar)
    for key in [variant.digest] + ([variant.toc_key] if variant.toc_key else []):
        assert walk(layer_dir(mount, variant.image, key) / "diff") == want, key


def test_reads_at_any_offset(variant: Variant, mount: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(variant.tar)) as tf:
        want = tf.extractfile("data/big.bin").read()
    path = layer_dir(mount, variant.image, variant.digest) / "diff/data/big.bin"
    with open(path, "rb") as f:
        for off, size in [(0, 1), (65535, 2), (65536, 65536), (100_000, 150_000),
                          (len(want) - 3, 100), (len(want), 10)]:
            f.seek(off)
            assert f.read(size) == want[off : off + size], (off, size)


def test_info_for_both_key_kinds(variant: Variant, mount: Path) -> None:
    diff_id = variant.image.diff_ids[0]
    by_blob = json.loads((layer_dir(mount, variant.image, variant.digest) / "info").read_bytes())
    assert by_blob == {
        "compressed-diff-digest": variant.digest,
        "compressed-size": variant.desc["size"],
        "diff-digest": diff_id,
        "diff-size": len(variant.tar),
        "compression": 4,
    }
    if variant.toc_key is None:
        # Podman 4.3's legacy annotations name no key Podman 5 would use
        legacy = layer_dir(mount, variant.image, variant.ann[OLD + "manifest-checksum"])
        assert not (legacy / "info").exists()
        return
    by_toc = json.loads((layer_dir(mount, variant.image, variant.toc_key) / "info").read_bytes())
    assert by_toc == {
        "toc-digest": variant.toc_key,
        "compressed-size": variant.desc["size"],
        "diff-size": len(variant.tar),
        "compression": 4,
        "flags": {"expected-layer-diffid": diff_id},
    }


def test_where_the_exact_size_came_from(
    variants: dict[str, Variant], store: StoreProcess, mount: Path
) -> None:
    """Podman 4.3's layers: a scan of the frames between file data; Podman 5's: the tar-split;
    ctr-remote's: the uncompressed-size annotation (no event)."""
    for v in variants.values():
        (layer_dir(mount, v.image, v.digest) / "info").read_bytes()
    sources = {e["blob"]: e["source"] for e in store.events("layer.tar_size")}
    assert sources.get(variants["podman"].digest) == "frame-scan"
    assert sources.get(variants["spec5"].digest) == "tar-split"
    assert variants["ctr"].digest not in sources


def test_blob_is_the_registry_blob(variant: Variant, mount: Path) -> None:
    path = layer_dir(mount, variant.image, variant.digest) / "blob"
    assert path.stat().st_size == variant.desc["size"]
    data = path.read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == variant.digest
    assert "sha256:" + hashlib.sha256(unzstd(data)).hexdigest() == variant.image.diff_ids[0]


def test_real_blobs_verify_both_ways(variants: dict[str, Variant]) -> None:
    """The pure reader on the real tools' blobs: good bytes verify, a flipped byte does not."""
    for v in variants.values():
        data = blob(v.image.host, "fuse/zc", v.digest)
        pos_text = v.ann.get(GH + "manifest-position") or v.ann[OLD + "manifest-position"]
        layout = zstdchunked.Layout(zstdchunked.parse_manifest_position(pos_text))
        digests = zstdchunked.TocDigests(
            manifest_checksum=v.ann.get(GH + "manifest-checksum")
            or v.ann.get(OLD + "manifest-checksum"),
            toc_json=v.ann.get(TOC_ANN),
        )
        read = lambda o, n, d=data: d[o : o + n]  # noqa: E731
        ct = zstdchunked.open_toc(read, len(data), digests, layout=layout)
        big = ct.toc.node(ct.toc.lookup("data/big.bin")).entry
        first = big.chunks[0]
        raw = data[first.blob_offset : first.blob_end]
        assert len(zstdchunked.decode_chunk(raw, first)) == first.size
        frame = zstdchunked.frame_end(raw, 0)
        bad = raw[: frame // 2] + bytes([raw[frame // 2] ^ 1]) + raw[frame // 2 + 1 :]
        with pytest.raises(FormatError):
            zstdchunked.decode_chunk(bad, first)
        toc = ct.layout.toc
        broken = data[: toc.offset + 4] + bytes([data[toc.offset + 4] ^ 1]) + data[toc.offset + 5 :]
        with pytest.raises(FormatError):
            zstdchunked.open_toc(lambda o, n, d=broken: d[o : o + n], len(broken), digests,
                                 layout=layout)


def test_corrupt_chunk_is_eio_and_never_served(
    registry: LocalRegistry, store: StoreProcess, mount: Path, source_tar: bytes
) -> None:
    """A TOC that records a wrong digest for one file (consistently signed by the manifest):
    that file reads EIO, every other file still reads."""

    def wrong(doc: dict) -> None:
        for e in doc["entries"]:
            if e["name"] == "etc/hostname":
                e["digest"] = "sha256:" + "0" * 64

    bad = build(source_tar, "podman5", mutate_toc=wrong)
    pushed = registry.push_image(
        "fuse/zc-bad", "v1", [LayerBlob(bad.blob, MT_ZSTD, bad.annotations)],
        images.image_config([bad.diff_id]),
    )
    diff = layer_dir(mount, pushed, bad.digest) / "diff"
    mark = store.mark()
    with pytest.raises(OSError) as exc:
        (diff / "etc/hostname").read_bytes()
    assert exc.value.errno == errno.EIO
    assert (diff / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    failed = store.events("read.failed", since=mark)
    assert failed and "digest mismatch" in json.dumps(failed[0])


def test_restart_serves_the_recorded_layers(
    variants: dict[str, Variant], registry: LocalRegistry, tmp_path: Path, source_tar: bytes
) -> None:
    """After a restart the store answers from its state records: no manifest, no annotations,
    the footer locates the TOC and the recorded key (compressed TOC or TOC JSON digest)
    verifies it; info is byte-identical and files read as before."""
    lookups = [(v, key) for v in variants.values()
               for key in [v.digest] + ([v.toc_key] if v.toc_key else [])]
    before: dict[tuple[str, str], bytes] = {}
    first = StoreProcess(tmp_path / "root", tmp_path / "mnt")
    try:
        first.start()
        for v, key in lookups:
            info = layer_dir(first.mountpoint, v.image, key) / "info"
            before[(v.name, key)] = info.read_bytes()
    finally:
        first.stop()
    second = StoreProcess(tmp_path / "root", tmp_path / "mnt")
    try:
        second.start()
        mark, events = registry.mark(), second.mark()  # both runs log to ROOT/store.log
        for v, key in lookups:
            ldir = layer_dir(second.mountpoint, v.image, key)
            assert (ldir / "info").read_bytes() == before[(v.name, key)], (v.name, key)
            assert walk(ldir / "diff") == expected_view(source_tar), (v.name, key)
        manifests = [e for e in registry.requests_since(mark) if "/manifests/" in e.path]
        assert manifests == []
        prepared = second.events("layer.prepared", since=events)
        assert len(prepared) == len(lookups)
        assert all(e.get("from_state") is True for e in prepared), prepared
    finally:
        second.stop()
