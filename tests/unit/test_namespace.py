"""The FUSE namespace's inode numbering and its count of the kernel's references per layer."""

from __future__ import annotations

from pathlib import Path

from store.als import KeyKind, LayerRecord
from store.chunkcache import ChunkCache
from store.estargz import build_estargz_bytes
from store.fuse.namespace import Kind, Namespace
from store.layer import RemoteLayer
from store.resolver import LayerHandle
from tests.unit.tarbuild import TarBuilder
from tests.unit.test_disk_cache import MemoryBlob


def small_layer(tmp_path: Path, name: str) -> RemoteLayer:
    tb = TarBuilder()
    tb.file(f"{name}/a.txt", b"a\n")
    tb.file(f"{name}/b.txt", b"b\n")
    blob, res = build_estargz_bytes(tb.build())
    return RemoteLayer.open(MemoryBlob(blob), res.toc_digest, ChunkCache(1 << 20), tmp_path)


def handle(ref: str, key: str, layer: RemoteLayer) -> LayerHandle:
    record = LayerRecord(key, KeyKind.BLOB, layer.source.digest, layer.source.size,
                         "sha256:" + "0" * 64, 1, "sha256:" + "1" * 64)
    return LayerHandle(ref, key, record, layer)


def test_two_paths_share_one_inode_range(tmp_path: Path) -> None:
    ns = Namespace()
    layer = small_layer(tmp_path, "x")
    r1, r2 = ns.ref_inode("cjE=", "r1"), ns.ref_inode("cjI=", "r2")
    k1 = ns.key_inode(r1, handle("r1", "sha256:k1", layer))
    k2 = ns.key_inode(r2, handle("r2", "sha256:k2", layer))
    assert k1 != k2
    root = ns.diff_inode(layer, layer.view.root)
    assert ns.locate(root).kind is Kind.DIFF and ns.locate(root).layer is layer
    assert ns.locate(k1 + 1).kind is Kind.INFO and ns.locate(k2 + 2).kind is Kind.BLOB


def test_layer_is_droppable_only_when_the_kernel_forgot_all_its_inodes(tmp_path: Path) -> None:
    ns = Namespace()
    layer, other = small_layer(tmp_path, "x"), small_layer(tmp_path, "y")
    ref = ns.ref_inode("cg==", "r")
    key = ns.key_inode(ref, handle("r", "sha256:k", layer))
    okey = ns.key_inode(ref, handle("r", "sha256:o", other))
    diff = ns.diff_inode(layer, layer.view.root)
    child = ns.diff_inode(layer, layer.view.lookup(layer.view.root, "x"))
    for ino in (ref, key, key + 1, diff, child, child, okey):
        ns.remember(ino)
    assert ns.kernel_refs(layer) == 5 and ns.kernel_refs(other) == 1
    assert ns.drop_layer(layer) is False  # still held: nothing changes
    assert ns.locate(child) is not None
    assert ns.forget(ref, 1) is None  # reference directories are not counted
    assert ns.forget(child, 2) is None
    assert ns.forget(key, 1) is None and ns.forget(key + 1, 1) is None
    assert ns.forget(diff, 5) is layer  # more than it holds: clamped, and now none are held
    assert ns.kernel_refs(layer) == 0
    assert ns.drop_layer(layer) is True
    for ino in (key, key + 1, key + 2, diff, child):
        assert ns.locate(ino) is None  # gone, and never handed out again
    assert ns.find_key(ref, "sha256:k") is None
    assert [name for name, _ in ns.key_children(ref)] == ["sha256:o"]
    assert ns.locate(okey).key.handle.layer is other  # the other layer is untouched
    # the same path resolved again gets new numbers
    again = ns.key_inode(ref, handle("r", "sha256:k", layer))
    assert again > okey and ns.diff_inode(layer, layer.view.root) > child
