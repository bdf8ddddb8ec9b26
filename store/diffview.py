"""The overlay-format view of a layer that `diff/` shows (als-protocol.md §6, estargz-format §8).

The TOC describes the tar as written: OCI whiteouts are ordinary `.wh.NAME` files and opaque
directories carry a `.wh..wh..opq` marker. overlayfs wants something else as a lower layer:
a whiteout is a 0:0 character device named NAME, an opaque directory has the xattr
`trusted.overlay.opaque=y` (rootful) or `user.overlay.opaque=y` (rootless, `userxattr`), and
no `.wh.*` name is visible. The prefetch landmarks at the root are bookkeeping, hidden too.

Node ids are the TOC tree's ids; synthetic whiteout devices get ids after the last TOC node.
Pure: no I/O.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from store.estargz import Toc, TocEntry

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
LANDMARKS = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})
OPAQUE_XATTRS = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class Attr:
    mode: int  # type bits | permission bits (incl. setuid/setgid/sticky)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: int


class DiffView:
    root = 0

    def __init__(self, toc: Toc) -> None:
        self.toc = toc
        self._toc_nodes = toc.node_count
        self._children: dict[int, dict[str, int]] = {}  # only dirs whose listing differs
        self._opaque: set[int] = set()
        self._whiteouts: list[int] = []  # synthetic id - toc nodes -> mtime_ns
        for node_id in range(self._toc_nodes):
            children = toc.children(node_id)
            if children:
                self._convert_dir(node_id, children)

    def _convert_dir(self, node_id: int, children: dict[str, int]) -> None:
        hidden = [n for n in children if n.startswith(WHITEOUT_PREFIX)]
        if node_id == self.root:
            hidden += [n for n in children if n in LANDMARKS]
        if not hidden:
            return
        visible = {n: i for n, i in children.items() if n not in hidden}
        for name in hidden:
            if name == OPAQUE_MARKER:
                self._opaque.add(node_id)
            elif name.startswith(WHITEOUT_PREFIX):
                target = name[len(WHITEOUT_PREFIX) :]
                # A real entry of the same name in this layer wins over the whiteout.
                if target and target not in visible:
                    marker = self.toc.entry(children[name])
                    visible[target] = self._toc_nodes + len(self._whiteouts)
                    self._whiteouts.append(marker.mtime_ns)
        self._children[node_id] = visible

    @property
    def node_count(self) -> int:
        return self._toc_nodes + len(self._whiteouts)

    def is_whiteout(self, node_id: int) -> bool:
        return node_id >= self._toc_nodes

    def entry(self, node_id: int) -> TocEntry | None:
        if self.is_whiteout(node_id):
            return None
        return self.toc.entry(node_id)

    def children(self, node_id: int) -> dict[str, int]:
        if self.is_whiteout(node_id):
            return {}
        override = self._children.get(node_id)
        if override is not None:
            return override
        return self.toc.children(node_id)

    def lookup(self, parent: int, name: str) -> int | None:
        return self.children(parent).get(name)

    def attr(self, node_id: int) -> Attr:
        if self.is_whiteout(node_id):
            mtime = self._whiteouts[node_id - self._toc_nodes]
            return Attr(stat.S_IFCHR, 0, 0, 0, mtime, 1, 0)
        e = self.toc.entry(node_id)
        size = (
            e.size if e.type == "reg" else len(e.link_name.encode()) if e.type == "symlink" else 0
        )
        rdev = os.makedev(e.dev_major, e.dev_minor) if e.type in ("char", "block") else 0
        nlink = self.toc.nlink(node_id)
        if e.type == "dir":
            nlink = 2 + sum(1 for i in self.children(node_id).values() if self._is_dir(i))
        return Attr(
            _TYPE_BITS[e.type] | (e.mode & 0o7777),
            e.uid,
            e.gid,
            size,
            e.mtime_ns,
            max(1, nlink),
            rdev,
        )

    def _is_dir(self, node_id: int) -> bool:
        return not self.is_whiteout(node_id) and self.toc.entry(node_id).type == "dir"

    def readlink(self, node_id: int) -> str | None:
        e = self.entry(node_id)
        return e.link_name if e is not None and e.type == "symlink" else None

    def xattrs(self, node_id: int) -> dict[str, bytes]:
        e = self.entry(node_id)
        if e is None:
            return {}
        if node_id in self._opaque:
            return {**e.xattrs, **OPAQUE_XATTRS}
        return e.xattrs

    def path(self, node_id: int) -> str:
        """Best-effort path for log lines."""
        if self.is_whiteout(node_id):
            return "<whiteout>"
        return self.toc.entry(node_id).name or "/"
