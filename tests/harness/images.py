"""Test images built from scratch (no Docker Hub), and the file tree they must produce.

The e2e image has three layers:

1. base: static busybox with its applet symlinks, /etc/passwd, /etc/group, /tmp (1777),
   /etc/motd and /opt/replaced/{a,b}.txt;
2. changes: a whiteout deleting /etc/motd and an opaque /opt/replaced holding only new.txt;
3. data: a 60 MiB pseudo-random file, hardlinks, relative and absolute symlinks, a setuid file,
   a sticky directory, a file with a `user.` xattr, a fifo, a file owned by 1000:1000 and 300
   small text files.

Every layer is a PAX tar built with `tarfile`, with fixed mtimes and ownership, so the gzip image
is byte-for-byte reproducible; the expected tree is computed by applying the tars in order with
OCI whiteout semantics (image-spec layer.md), so it is checked against the tars themselves.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import platform
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import requests

MTIME = 1_700_000_000
BIG_SIZE = 60 << 20
SMALL_FILES = 300
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# podman injects these into /etc of every container (bind mounts or upper-dir placeholders)
INJECTED = frozenset({"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab"})
# the directories of the e2e image that tests list recursively in a container
E2E_ROOTS = ("/bin", "/etc", "/opt", "/data")
E2E_TOPS = ("/tmp", "/root")  # listed without their contents


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}.get(m, m)


def b64ref(ref: str) -> str:
    """The ALS directory name of an image reference (als-protocol.md §2.1)."""
    return base64.b64encode(ref.encode()).decode()


# -- building tars --------------------------------------------------------------------------------


class TarLayer:
    """A small tar DSL: entries are appended in call order, with fixed mtime and numeric owners."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed by bytes()
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT
        )

    def _info(self, name: str, type_: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> TarLayer:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))
        return self

    def file(
        self,
        name: str,
        data: bytes,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        xattrs: dict[str, str] | None = None,
    ) -> TarLayer:
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self._tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> TarLayer:
        ti = self._info(name, tarfile.SYMTYPE, 0o777, 0, 0)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str) -> TarLayer:
        ti = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def fifo(self, name: str, mode: int = 0o644) -> TarLayer:
        self._tar.addfile(self._info(name, tarfile.FIFOTYPE, mode, 0, 0))
        return self

    def whiteout(self, path: str) -> TarLayer:
        parent, _, base = path.rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, dirpath: str) -> TarLayer:
        return self.file(f"{dirpath}/.wh..wh..opq", b"")

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def busybox_layer(extra: Iterable[tuple[str, bytes]] = ()) -> TarLayer:
    """Static busybox, applet symlinks in /bin, passwd/group, the usual top-level dirs."""
    busybox = Path("/bin/busybox").read_bytes()
    applets = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    t = TarLayer()
    t.dir("bin")
    t.file("bin/busybox", busybox, mode=0o755)
    for a in sorted(set(applets) - {"busybox"}):
        if "/" not in a:
            t.symlink(f"bin/{a}", "busybox")
    t.dir("dev").dir("proc").dir("sys").dir("root", mode=0o700).dir("tmp", mode=0o1777)
    t.dir("etc")
    t.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    t.file("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n")
    for name, data in extra:
        t.file(name, data)
    return t


def base_layer() -> bytes:
    t = busybox_layer([("etc/motd", b"welcome to the layerstore e2e image\n")])
    t.dir("opt").dir("opt/replaced")
    t.file("opt/replaced/a.txt", b"a: removed by the opaque dir of layer 2\n")
    t.file("opt/replaced/b.txt", b"b: removed by the opaque dir of layer 2\n")
    return t.bytes()


def changes_layer() -> bytes:
    t = TarLayer()
    t.dir("etc").whiteout("etc/motd")
    t.dir("opt").dir("opt/replaced").opaque("opt/replaced")
    t.file("opt/replaced/new.txt", b"new: the only file of the opaque dir\n")
    return t.bytes()


def big_data(size: int = BIG_SIZE) -> bytes:
    # SHAKE-256 output is fully specified, so the bytes (and hashes) never depend on the Python
    # version, unlike random.Random.randbytes.
    return hashlib.shake_256(b"layerstore e2e big.bin v1").digest(size)


def small_text(i: int) -> bytes:
    lines = (f"file {i:03d} line {n:03d}: lazily pulled\n" for n in range(i % 40 + 1))
    return "".join(lines).encode()


def data_layer(big_size: int = BIG_SIZE) -> bytes:
    t = TarLayer()
    t.dir("data")
    t.file("data/big.bin", big_data(big_size))
    t.dir("data/hl")
    t.file("data/hl/original.txt", b"one inode, two names\n")
    t.hardlink("data/hl/second-name.txt", "data/hl/original.txt")
    t.dir("data/links")
    t.symlink("data/links/relative", "../hl/original.txt")
    t.symlink("data/links/absolute", "/etc/passwd")
    t.symlink("data/links/dangling", "/nonexistent/target")
    t.dir("data/bin")
    t.file("data/bin/suid-tool", b"#!/bin/sh\necho setuid\n", mode=0o4755)
    t.file("data/bin/sgid-tool", b"#!/bin/sh\necho setgid\n", mode=0o2755)
    t.dir("data/sticky", mode=0o1777)
    t.file("data/xattr.txt", b"has a user xattr\n", xattrs={"user.layerstore": "yes"})
    t.fifo("data/fifo", mode=0o600)
    t.file("data/owned-by-app.txt", b"uid 1000\n", mode=0o640, uid=1000, gid=1000)
    t.dir("data/small")
    for i in range(SMALL_FILES):
        t.file(f"data/small/f{i:03d}.txt", small_text(i))
    return t.bytes()


# -- the expected tree ----------------------------------------------------------------------------


class Entry(NamedTuple):
    """One file of a tree: type is dir/reg/symlink/fifo/chr/blk; content is `sha256:<hex>` for
    regular files, the target for symlinks and "" otherwise. mode = permission bits incl.
    setuid/setgid/sticky."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    content: str

    def __repr__(self) -> str:
        return f"<{self.type} {self.mode:04o} {self.uid}:{self.gid} {self.size} {self.content}>"


@dataclass
class Tree:
    entries: dict[str, Entry] = field(default_factory=dict)
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # each group: paths that must share one inode
    hardlinks: list[frozenset[str]] = field(default_factory=list)

    def restrict(self, roots: Iterable[str], tops: Iterable[str] = ()) -> dict[str, Entry]:
        """Entries at or below `roots`, plus the `tops` themselves."""
        roots = tuple(roots)
        out = {}
        for p, e in self.entries.items():
            if p in tops or any(p == r or p.startswith(r + "/") for r in roots):
                out[p] = e
        return out


def _norm(name: str) -> str:
    name = name.strip("/")
    while name.startswith("./"):
        name = name[2:]
    return "/" + name if name not in ("", ".") else "/"


def _type_of(ti: tarfile.TarInfo) -> str:
    if ti.isdir():
        return "dir"
    if ti.issym():
        return "symlink"
    if ti.isfifo():
        return "fifo"
    if ti.ischr():
        return "chr"
    if ti.isblk():
        return "blk"
    return "reg"


def apply_layers(tars: Iterable[bytes]) -> Tree:
    """The tree that results from extracting `tars` in order (OCI whiteouts and opaque dirs)."""
    tree = Tree(entries={"/": Entry("dir", 0o755, 0, 0, 0, "")})
    link_of: dict[str, str] = {}  # path -> hardlink group root

    def remove(path: str, *, keep_self: bool = False) -> None:
        for p in [p for p in tree.entries if p.startswith(path + "/") or (p == path)]:
            if p == path and keep_self:
                continue
            tree.entries.pop(p, None)
            tree.xattrs.pop(p, None)
            link_of.pop(p, None)

    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            # whiteouts refer to lower layers only, so apply them before this layer's entries
            for ti in members:
                path = _norm(ti.name)
                parent, base = path.rsplit("/", 1)
                if base == ".wh..wh..opq":
                    remove(parent or "/", keep_self=True)
                elif base.startswith(".wh."):
                    remove(f"{parent}/{base[4:]}")
            for ti in members:
                path = _norm(ti.name)
                base = path.rsplit("/", 1)[1]
                if base.startswith(".wh."):
                    continue
                if ti.islnk():
                    target = _norm(ti.linkname)
                    tree.entries[path] = tree.entries[target]
                    if target in tree.xattrs:
                        tree.xattrs[path] = tree.xattrs[target]
                    link_of[path] = link_of.setdefault(target, target)
                    continue
                old = tree.entries.get(path)
                if old is not None and not (old.type == "dir" and ti.isdir()):
                    remove(path)  # replaced (a dir replaced by a non-dir loses its contents)
                typ = _type_of(ti)
                if typ == "reg":
                    content = "sha256:" + sha256_hex(tar.extractfile(ti).read())
                    size = ti.size
                elif typ == "symlink":
                    content, size = ti.linkname, len(ti.linkname.encode())
                else:
                    content, size = "", 0
                mode = stat.S_IMODE(ti.mode)
                tree.entries[path] = Entry(typ, mode, ti.uid, ti.gid, size, content)
                xattrs = {
                    k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                    for k, v in ti.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                }
                if xattrs:
                    tree.xattrs[path] = xattrs
    groups: dict[str, set[str]] = {}
    for path, root in link_of.items():
        groups.setdefault(root, {root}).add(path)
    tree.hardlinks = [frozenset(g) for g in groups.values() if all(p in tree.entries for p in g)]
    return tree


# -- the tree a container sees -------------------------------------------------------------------

LISTING_SCRIPT = r"""
set -e
R="{roots}"
find $R -xdev -exec stat -c 'S|%f|%u|%g|%s|%i|%h|%n' {{}} +
stat -c 'S|%f|%u|%g|%s|%i|%h|%n' {tops}
find $R -xdev -type f -exec sha256sum {{}} + | sed 's/^\([0-9a-f]*\)  /H|\1|/'
find $R -xdev -type l | while read -r l; do echo "L|$l|$(readlink "$l")"; done
echo END
"""


def listing_command(roots: Iterable[str] = E2E_ROOTS, tops: Iterable[str] = E2E_TOPS) -> list[str]:
    """A `sh -c` command for busybox that prints every file under `roots` (see `parse_listing`)."""
    return ["/bin/sh", "-c", LISTING_SCRIPT.format(roots=" ".join(roots), tops=" ".join(tops))]


@dataclass
class Listing:
    entries: dict[str, Entry]
    inodes: dict[str, tuple[int, int]]  # path -> (st_ino, st_nlink)


_TYPES = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock",
}


def parse_listing(out: str, ignore: Iterable[str] = INJECTED) -> Listing:
    if not out.rstrip().endswith("END"):
        raise ValueError(f"listing output is truncated:\n{out[-2000:]}")
    ignore = set(ignore)
    raw: dict[str, list] = {}
    hashes: dict[str, str] = {}
    targets: dict[str, str] = {}
    inodes: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        kind, _, rest = line.partition("|")
        if kind == "S":
            mode, uid, gid, size, ino, nlink, path = rest.split("|", 6)
            m = int(mode, 16)
            raw[path] = [_TYPES.get(stat.S_IFMT(m), "?"), stat.S_IMODE(m), int(uid), int(gid),
                         int(size)]
            inodes[path] = (int(ino), int(nlink))
        elif kind == "H":
            digest, path = rest.split("|", 1)
            hashes[path] = "sha256:" + digest
        elif kind == "L":
            path, target = rest.split("|", 1)
            targets[path] = target
    entries = {}
    for path, (typ, mode, uid, gid, size) in raw.items():
        if path in ignore:
            continue
        content = hashes.get(path, "") if typ == "reg" else targets.get(path, "")
        if typ not in ("reg", "symlink"):
            size = 0
        entries[path] = Entry(typ, mode, uid, gid, size, content)
    return Listing(entries, {p: i for p, i in inodes.items() if p not in ignore})


def list_container(
    podman, ref: str, roots: Iterable[str] = E2E_ROOTS, tops: Iterable[str] = E2E_TOPS
) -> Listing:
    """Run a container of `ref` (a PodmanEnv) and list the tree it sees."""
    return parse_listing(podman.run_container(ref, listing_command(roots, tops)).stdout)


def tree_diff(expected: dict[str, Entry], actual: dict[str, Entry], limit: int = 40) -> list[str]:
    """Human-readable differences between two trees (empty when equal)."""
    problems = []
    for p in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing {p}: expected {expected[p]}")
    for p in sorted(actual.keys() - expected.keys()):
        problems.append(f"unexpected {p}: {actual[p]}")
    for p in sorted(expected.keys() & actual.keys()):
        if expected[p] != actual[p]:
            problems.append(f"differs {p}: expected {expected[p]}, got {actual[p]}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
    return problems


# -- images ---------------------------------------------------------------------------------------


@dataclass
class Layer:
    tar: bytes  # uncompressed
    blob: bytes  # as pushed
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def diff_id(self) -> str:
        return "sha256:" + sha256_hex(self.tar)


def gzip_layer(tar: bytes) -> Layer:
    return Layer(tar=tar, blob=gzip.compress(tar, compresslevel=6, mtime=0))


def estargz_layer(tar: bytes) -> tuple[Layer, str]:
    """Our own eStargz writer's output for `tar`; returns the layer and its DiffID."""
    from store.estargz.writer import build_estargz

    out = io.BytesIO()
    res = build_estargz(io.BytesIO(tar), out)
    layer = Layer(
        tar=b"",
        blob=out.getvalue(),
        annotations={
            TOC_DIGEST: str(res.toc_digest),
            UNCOMPRESSED_SIZE: str(res.uncompressed_size),
        },
    )
    return layer, str(res.diff_id)


def image_config(diff_ids: list[str]) -> dict:
    return {
        "created": "2023-11-14T22:13:20Z",
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


@dataclass
class TestImage:
    """An image pushed to the test registry."""

    __test__ = False  # not a pytest test class

    host: str
    repo: str
    tag: str
    manifest_digest: str
    manifest: dict
    config: dict
    tree: Tree

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repo}:{self.tag}"

    @property
    def layer_digests(self) -> list[str]:
        return [d["digest"] for d in self.manifest["layers"]]

    @property
    def layer_sizes(self) -> list[int]:
        return [d["size"] for d in self.manifest["layers"]]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config["rootfs"]["diff_ids"])

    def als_layer_dir(self, mountpoint: Path, index: int, ref: str | None = None) -> Path:
        """`<mount>/<b64(ref)>/<key>` for layer `index` (Podman 4.3.1 keys by blob digest)."""
        return Path(mountpoint) / b64ref(ref or self.ref) / self.layer_digests[index]


def push(registry, repo: str, tag: str, layers: list[Layer], diff_ids: list[str], tree: Tree):
    from .registry import LayerBlob

    config = image_config(diff_ids)
    pushed = registry.push_image(
        repo,
        tag,
        [LayerBlob(lay.blob, MT_GZIP, lay.annotations) for lay in layers],
        config,
    )
    return TestImage(
        host=registry.host,
        repo=repo,
        tag=tag,
        manifest_digest=str(pushed.manifest_digest),
        manifest=pushed.manifest,
        config=config,
        tree=tree,
    )


def fetch_image(host: str, repo: str, tag: str, tree: Tree) -> TestImage:
    """Read back an image someone else pushed (e.g. ctr-remote) from the registry."""
    base = f"http://{host}/v2/{repo}"
    r = requests.get(f"{base}/manifests/{tag}", headers={"Accept": MT_MANIFEST}, timeout=30)
    r.raise_for_status()
    manifest = r.json()
    c = requests.get(f"{base}/blobs/{manifest['config']['digest']}", timeout=30)
    c.raise_for_status()
    return TestImage(
        host=host,
        repo=repo,
        tag=tag,
        manifest_digest=r.headers["Docker-Content-Digest"],
        manifest=manifest,
        config=json.loads(c.content),
        tree=tree,
    )


def push_busybox(registry, *, estargz: bool = False, repo: str = "busybox") -> TestImage:
    """A small single-layer busybox image: `busybox:latest` (gzip) or `busybox:esgz` (our
    eStargz writer)."""
    tar = busybox_layer().bytes()
    tree = apply_layers([tar])
    if estargz:
        layer, diff_id = estargz_layer(tar)
        return push(registry, repo, "esgz", [layer], [diff_id], tree)
    return push(registry, repo, "latest", [gzip_layer(tar)], ["sha256:" + sha256_hex(tar)], tree)
