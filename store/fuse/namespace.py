"""Inode numbers for the ALS namespace, with no pyfuse3 dependency.

    1                       the mount root
    <base64(ref)>           one inode per reference name seen
      <key>                 one inode per resolved layer path, then `info` (+1), `blob` (+2)
        diff/...            a contiguous range per RemoteLayer: base + DiffView node id

A layer reached through several paths (both key kinds, several tags) keeps one inode range,
so the same file has the same inode wherever it is seen. Numbers are never reused while
mounted: the kernel may hold on to any of them.

The kernel's references (FUSE lookup counts: +1 per lookup or readdir entry, -n per forget)
are counted per layer, over its key, info, blob and diff inodes. A layer the kernel holds no
inode of can be dropped (drop_layer): nothing can reach its old inode numbers any more, and a
new lookup of its path gets a fresh range.
"""

from __future__ import annotations

import bisect
import enum
import threading
from array import array
from dataclasses import dataclass
from typing import NewType

from store.layer import RemoteLayer
from store.resolver import LayerHandle

Inode = NewType("Inode", int)
ROOT_INODE = Inode(1)


class Kind(enum.Enum):
    ROOT = "root"
    REF = "ref"
    KEY = "key"
    INFO = "info"
    BLOB = "blob"
    DIFF = "diff"


@dataclass(frozen=True, slots=True)
class RefNode:
    name: str  # the base64 directory name
    ref: str  # decoded reference


@dataclass(frozen=True, slots=True)
class KeyNode:
    ref_inode: Inode
    handle: LayerHandle


@dataclass(frozen=True, slots=True)
class Located:
    kind: Kind
    ref: RefNode | None = None
    key: KeyNode | None = None
    layer: RemoteLayer | None = None
    node_id: int = 0  # DiffView node for DIFF


class Namespace:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 2
        self._refs: dict[int, RefNode] = {}
        self._ref_by_name: dict[str, Inode] = {}
        self._keys: dict[int, KeyNode] = {}
        self._key_by_path: dict[tuple[str, str], Inode] = {}
        self._layer_base: dict[int, int] = {}  # id(layer) -> base inode
        self._ranges: list[tuple[int, int, RemoteLayer]] = []  # (base, end, layer), sorted
        # The kernel's lookup counts: key/info/blob inodes in a dict; diff inodes in one array
        # per layer, indexed like its DiffView (a 100,000-file layer: 800 kB, not a dict of
        # 100,000 entries); and their sum per layer.
        self._lookups: dict[int, int] = {}
        self._diff_lookups: dict[int, array[int]] = {}  # id(layer) -> counts by node id
        self._layer_lookups: dict[int, int] = {}  # id(layer) -> sum over its inodes

    def _alloc(self, count: int) -> int:
        base = self._next
        self._next += count
        return base

    def ref_inode(self, name: str, ref: str) -> Inode:
        with self._lock:
            ino = self._ref_by_name.get(name)
            if ino is None:
                ino = Inode(self._alloc(1))
                self._ref_by_name[name] = ino
                self._refs[ino] = RefNode(name, ref)
            return ino

    def key_inode(self, ref_inode: Inode, handle: LayerHandle) -> Inode:
        ref_name = self._refs[ref_inode].name
        with self._lock:
            ino = self._key_by_path.get((ref_name, handle.key))
            if ino is None:
                ino = Inode(self._alloc(3))  # key dir, info, blob
                self._key_by_path[(ref_name, handle.key)] = ino
                self._keys[ino] = KeyNode(ref_inode, handle)
            layer = handle.layer
            if id(layer) not in self._layer_base:
                base = self._alloc(layer.view.node_count)
                self._layer_base[id(layer)] = base
                bisect.insort(
                    self._ranges, (base, base + layer.view.node_count, layer), key=lambda r: r[0]
                )
            return ino

    def diff_inode(self, layer: RemoteLayer, node_id: int) -> Inode:
        return Inode(self._layer_base[id(layer)] + node_id)

    def key_children(self, ref_inode: Inode) -> list[tuple[str, Inode]]:
        name = self._refs[ref_inode].name
        with self._lock:
            return sorted((k, i) for (r, k), i in self._key_by_path.items() if r == name)

    def ref_children(self) -> list[tuple[str, Inode]]:
        with self._lock:
            return sorted(self._ref_by_name.items())

    def find_key(self, ref_inode: Inode, key: str) -> Inode | None:
        name = self._refs[ref_inode].name
        with self._lock:
            return self._key_by_path.get((name, key))

    # -- the kernel's references ----------------------------------------------------------------

    def remember(self, inode: int) -> None:
        """The kernel took a reference (a lookup or readdir entry was answered)."""
        with self._lock:
            owner = self._owner_locked(inode)
            if owner is None:
                return  # the root and reference directories are never dropped
            layer, base = owner
            if base is None:
                self._lookups[inode] = self._lookups.get(inode, 0) + 1
            else:
                counts = self._diff_lookups.get(id(layer))
                if counts is None:
                    counts = array("Q", bytes(8 * layer.view.node_count))
                    self._diff_lookups[id(layer)] = counts
                counts[inode - base] += 1
            self._layer_lookups[id(layer)] = self._layer_lookups.get(id(layer), 0) + 1

    def forget(self, inode: int, nlookup: int) -> RemoteLayer | None:
        """The kernel dropped *nlookup* references; returns the layer if it now holds none."""
        with self._lock:
            owner = self._owner_locked(inode)
            if owner is None:
                return None
            layer, base = owner
            if base is None:
                held = self._lookups.get(inode, 0)
                gone = min(held, nlookup)
                if held > gone:
                    self._lookups[inode] = held - gone
                else:
                    self._lookups.pop(inode, None)
            else:
                counts = self._diff_lookups.get(id(layer))
                held = counts[inode - base] if counts is not None else 0
                gone = min(held, nlookup)
                if counts is not None:
                    counts[inode - base] = held - gone
            if gone == 0:
                return None
            left = self._layer_lookups.get(id(layer), 0) - gone
            self._layer_lookups[id(layer)] = left
            return layer if left <= 0 else None

    def key_paths(self, layer: RemoteLayer) -> list[tuple[Inode, str, str]]:
        """(reference directory inode, reference, key) of every path that leads to *layer*."""
        with self._lock:
            return [
                (node.ref_inode, self._refs[node.ref_inode].ref, node.handle.key)
                for node in self._keys.values()
                if node.handle.layer is layer
            ]

    def kernel_refs(self, layer: RemoteLayer) -> int:
        with self._lock:
            return self._layer_lookups.get(id(layer), 0)

    def drop_layer(self, layer: RemoteLayer) -> bool:
        """Forget every inode of *layer* (its key paths and diff range) if the kernel holds
        none of them; False (nothing done) if it does."""
        with self._lock:
            if self._layer_lookups.get(id(layer), 0) > 0:
                return False
            self._layer_lookups.pop(id(layer), None)
            self._diff_lookups.pop(id(layer), None)
            for ino, node in list(self._keys.items()):
                if node.handle.layer is layer:
                    del self._keys[ino]
                    ref_name = self._refs[node.ref_inode].name
                    self._key_by_path.pop((ref_name, node.handle.key), None)
                    for i in (ino, ino + 1, ino + 2):
                        self._lookups.pop(i, None)
            base = self._layer_base.pop(id(layer), None)
            if base is not None:
                self._ranges = [r for r in self._ranges if r[2] is not layer]
            return True

    def _owner_locked(self, inode: int) -> tuple[RemoteLayer, int | None] | None:
        """The layer an inode belongs to, with the base of its diff range (None for its key,
        info and blob inodes); None for the root, reference directories and unknown numbers."""
        for offset in (0, 1, 2):
            key = self._keys.get(inode - offset)
            if key is not None:
                return key.handle.layer, None
        i = bisect.bisect_right(self._ranges, inode, key=lambda r: r[0]) - 1
        if i >= 0:
            base, end, layer = self._ranges[i]
            if base <= inode < end:
                return layer, base
        return None

    def locate(self, inode: int) -> Located | None:
        if inode == ROOT_INODE:
            return Located(Kind.ROOT)
        with self._lock:
            ref = self._refs.get(inode)
            if ref is not None:
                return Located(Kind.REF, ref=ref)
            for offset, kind in ((0, Kind.KEY), (1, Kind.INFO), (2, Kind.BLOB)):
                key = self._keys.get(inode - offset)
                if key is not None:
                    return Located(kind, key=key)
            i = bisect.bisect_right(self._ranges, inode, key=lambda r: r[0]) - 1
            if i >= 0:
                base, end, layer = self._ranges[i]
                if base <= inode < end:
                    return Located(Kind.DIFF, layer=layer, node_id=inode - base)
        return None
