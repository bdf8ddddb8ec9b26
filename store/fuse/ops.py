"""pyfuse3 Operations: unpack the request, ask the namespace / resolver / layer, pack the reply.

Errno policy, in one place:
- a name Podman probes that we cannot serve (bad base64, unknown ref or digest, a layer that
  is not lazily servable, a registry failure while resolving) -> ENOENT, so Podman pulls the
  layer normally (als-protocol.md §2.2);
- `use` does not exist; creating it counts +1 and answers ENOENT; `rmdir <key>` counts -1 and
  answers ENOENT (§5);
- a read that cannot be completed after `info` was served -> EIO, one structured log line;
- any write -> EROFS;
- anything unexpected -> EIO, logged with its traceback the first time (the `boundary`
  decorator): an exception escaping a handler would end pyfuse3's loop and leave a dead
  mount that breaks every Podman command.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import structlog
import trio

from store.als import RefCounts, decode_ref, is_key_name
from store.diffview import Attr
from store.errors import LayerstoreError, NotFound, NotLazyLayer, ReferenceError_
from store.fuse.namespace import ROOT_INODE, Inode, Kind, Located, Namespace
from store.layer import RemoteLayer
from store.memory import release_free_memory
from store.resolver import LayerHandle, Resolver

log = structlog.get_logger(__name__)

# The layer tree never changes while mounted: let the kernel cache it.
DIFF_TIMEOUT = 3600.0
# Control nodes: short, so a restarted or reconfigured store is seen quickly.
CONTROL_TIMEOUT = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_reported: set[tuple[str, str]] = set()


def boundary(fn: F) -> F:
    """Let FUSEError through; turn everything else into EIO, logged once per kind."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            sig = (fn.__name__, type(exc).__name__)
            if sig not in _reported:
                _reported.add(sig)
                log.error("fuse.unexpected_error", op=fn.__name__, cause=repr(exc), exc_info=True)
            else:
                log.debug("fuse.unexpected_error", op=fn.__name__, cause=repr(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, resolver: Resolver, *, io_threads: int = 16) -> None:
        super().__init__()
        self.resolver = resolver
        self.ns = Namespace()
        self.refcounts = RefCounts()
        self._resolve_limiter = trio.CapacityLimiter(max(2, io_threads // 2))
        self._read_limiter = trio.CapacityLimiter(io_threads)
        self._mount_time_ns = 0
        self._trim_pending = False
        # Run once in a thread at the first lookup, when the kernel has taken our INIT reply
        # (mount-time tuning that INIT would undo); must not raise.
        self.after_init: Callable[[], object] | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _locate(self, inode: int) -> Located:
        loc = self.ns.locate(inode)
        if loc is None:
            raise _err(errno.ENOENT)
        return loc

    def _attrs(self, inode: int, loc: Located) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.st_blksize = 4096
        if loc.kind is Kind.DIFF:
            assert loc.layer is not None
            attr = loc.layer.view.attr(loc.node_id)
            timeout = DIFF_TIMEOUT
        else:
            attr = self._control_attr(loc)
            timeout = CONTROL_TIMEOUT
        a.st_mode = attr.mode
        a.st_nlink = attr.nlink
        a.st_uid = attr.uid
        a.st_gid = attr.gid
        a.st_rdev = attr.rdev
        a.st_size = attr.size
        a.st_blocks = (attr.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = attr.mtime_ns
        a.entry_timeout = a.attr_timeout = timeout
        return a

    def _control_attr(self, loc: Located) -> Attr:
        t = self._mount_time_ns
        if loc.kind is Kind.INFO:
            assert loc.key is not None
            size = len(loc.key.handle.record.info_json())
            return Attr(stat.S_IFREG | 0o444, 0, 0, size, t, 1, 0)
        if loc.kind is Kind.BLOB:
            assert loc.key is not None
            return Attr(stat.S_IFREG | 0o444, 0, 0, loc.key.handle.record.compressed_size, t, 1, 0)
        return Attr(stat.S_IFDIR | 0o755, 0, 0, 0, t, 2, 0)

    async def _resolve(self, ref: str, key: str) -> LayerHandle | None:
        known = self.resolver.known(ref, key)
        if known is not None:
            return known
        try:
            return await trio.to_thread.run_sync(
                self.resolver.resolve,
                ref,
                key,
                limiter=self._resolve_limiter,
                abandon_on_cancel=True,
            )
        except (NotFound, NotLazyLayer, ReferenceError_) as exc:
            log.info("layer.not_served", ref=ref, key=key, reason=str(exc))
        except LayerstoreError as exc:
            log.warning("layer.unavailable", ref=ref, key=key, cause=repr(exc))
        except Exception as exc:  # still a lookup: Podman must fall back, not fail
            log.error("layer.resolve_failed", ref=ref, key=key, cause=repr(exc), exc_info=True)
        return None

    # -- lookups and attributes ----------------------------------------------------------------

    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if self.after_init is not None:
            job, self.after_init = self.after_init, None
            await trio.to_thread.run_sync(job)
        loc = self._locate(parent_inode)
        text = os.fsdecode(name)
        if loc.kind is Kind.ROOT:
            try:
                ref = decode_ref(text)
            except ReferenceError_:
                raise _err(errno.ENOENT) from None
            ino = self.ns.ref_inode(text, ref)
        elif loc.kind is Kind.REF:
            assert loc.ref is not None
            if not is_key_name(text):
                raise _err(errno.ENOENT)
            handle = await self._resolve(loc.ref.ref, text)
            if handle is not None and handle.layer.closed:
                # its layer was dropped while this lookup waited: resolve it afresh
                handle = await self._resolve(loc.ref.ref, text)
            if handle is None or handle.layer.closed:
                raise _err(errno.ENOENT)
            ino = self.ns.key_inode(Inode(parent_inode), handle)
        elif loc.kind is Kind.KEY:
            assert loc.key is not None
            if text == "info":
                ino = Inode(parent_inode + 1)
            elif text == "blob":
                ino = Inode(parent_inode + 2)
            elif text == "diff":
                layer = loc.key.handle.layer
                ino = self.ns.diff_inode(layer, layer.view.root)
            else:  # includes `use`, which must look absent (§5)
                raise _err(errno.ENOENT)
        elif loc.kind is Kind.DIFF:
            assert loc.layer is not None
            child = loc.layer.view.lookup(loc.node_id, text)
            if child is None:
                raise _err(errno.ENOENT)
            ino = self.ns.diff_inode(loc.layer, child)
        else:
            raise _err(errno.ENOTDIR)
        attrs = self._attrs(ino, self._locate(ino))
        self.ns.remember(ino)  # the kernel now holds a reference until it forgets it
        return attrs

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, self._locate(inode))

    @boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        loc = self._locate(inode)
        target = (
            loc.layer.view.readlink(loc.node_id) if loc.kind is Kind.DIFF and loc.layer else None
        )
        if target is None:
            raise _err(errno.EINVAL)
        return os.fsencode(target)

    @boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # No default_permissions: overlayfs and Podman run as root; faccessat(F_OK) must pass.
        self._locate(inode)
        return True

    @boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        # Required: overlayfs refuses a lower dir whose statfs fails.
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        loc = self._locate(inode)
        if loc.kind in (Kind.INFO, Kind.BLOB):
            raise _err(errno.ENOTDIR)
        if loc.kind is Kind.DIFF:
            assert loc.layer is not None
            if not stat.S_ISDIR(loc.layer.view.attr(loc.node_id).mode):
                raise _err(errno.ENOTDIR)
        return inode

    def _listing(self, inode: int, loc: Located) -> list[tuple[str, int]]:
        if loc.kind is Kind.ROOT:
            return list(self.ns.ref_children())
        if loc.kind is Kind.REF:
            return list(self.ns.key_children(Inode(inode)))
        if loc.kind is Kind.KEY:
            assert loc.key is not None
            layer = loc.key.handle.layer
            return [
                ("blob", inode + 2),
                ("diff", self.ns.diff_inode(layer, layer.view.root)),
                ("info", inode + 1),
            ]
        assert loc.layer is not None
        layer = loc.layer
        return sorted(
            (name, self.ns.diff_inode(layer, child))
            for name, child in layer.view.children(loc.node_id).items()
        )

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        loc = self._locate(fh)
        entries = self._listing(fh, loc)
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            attrs = self._attrs(ino, self._locate(ino))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break
            self.ns.remember(ino)  # readdirplus: each entry passed is a lookup

    @boundary
    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ---------------------------------------------------------------------------------

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        loc = self._locate(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _err(errno.EROFS)
        if loc.kind is Kind.DIFF:
            assert loc.layer is not None
            entry = loc.layer.view.entry(loc.node_id)
            if entry is None or entry.type != "reg":
                raise _err(errno.EISDIR if entry and entry.type == "dir" else errno.EACCES)
        elif loc.kind not in (Kind.INFO, Kind.BLOB):
            raise _err(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        loc = self._locate(fh)
        if loc.kind is Kind.INFO:
            assert loc.key is not None
            return loc.key.handle.record.info_json()[off : off + size]
        if loc.kind is Kind.BLOB:
            assert loc.key is not None
            handle = loc.key.handle
            return await self._read_or_eio(
                handle.layer.read_blob, off, size, ref=handle.ref, layer=handle.key, file="blob"
            )
        if loc.kind is Kind.DIFF:
            assert loc.layer is not None
            layer = loc.layer
            entry = layer.view.entry(loc.node_id)
            if entry is None or entry.type != "reg":
                raise _err(errno.EISDIR)
            cached = layer.read_cached(entry, off, size)
            if cached is not None:
                return cached
            return await self._read_or_eio(
                layer.read_file,
                entry,
                off,
                size,
                ref=None,
                layer=layer.source.digest,
                file=entry.name,
            )
        raise _err(errno.EISDIR)

    async def _read_or_eio(self, fn: Callable[..., bytes], *args: Any, **where: Any) -> bytes:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args), limiter=self._read_limiter, abandon_on_cancel=True
            )
        except LayerstoreError as exc:
            # Verification or fetch failed: nothing is served, a later read tries again.
            if not where.get("ref"):
                # a diff inode knows its layer, not the ref: name one ref that uses the layer
                layer = where.get("layer")
                refs = (h.ref for h in self.resolver.handles() if h.layer.source.digest == layer)
                where["ref"] = next(refs, None)
            log.error("read.failed", cause=repr(exc), **{k: v for k, v in where.items() if v})
            raise _err(errno.EIO) from None

    @boundary
    async def release(self, fh: int) -> None:
        return None

    # -- extended attributes -------------------------------------------------------------------

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        loc = self._locate(inode)
        if loc.kind is Kind.DIFF and loc.layer is not None:
            value = loc.layer.view.xattrs(loc.node_id).get(os.fsdecode(name))
            if value is not None:
                return value
        # ENODATA, never ENOSYS: ENOSYS would turn xattrs off for the whole mount.
        raise _err(errno.ENODATA)

    @boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        loc = self._locate(inode)
        if loc.kind is Kind.DIFF and loc.layer is not None:
            return [os.fsencode(n) for n in loc.layer.view.xattrs(loc.node_id)]
        return []

    # -- the protocol's two notifications --------------------------------------------------------

    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        loc = self._locate(parent_inode)
        if loc.kind is Kind.KEY and name == b"use":
            assert loc.key is not None
            h = loc.key.handle
            n = self.refcounts.use(h.ref, h.key)
            log.info("layer.use", ref=h.ref, key=h.key, count=n)
            raise _err(errno.ENOENT)  # the answer a GC-aware store gives (§5)
        raise _err(errno.EROFS)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        loc = self._locate(parent_inode)
        if loc.kind is Kind.REF:
            assert loc.ref is not None
            key = os.fsdecode(name)
            n = self.refcounts.release(loc.ref.ref, key)
            log.info("layer.release", ref=loc.ref.ref, key=key, count=n)
            ino = self.ns.find_key(Inode(parent_inode), key) if n == 0 else None
            found = self.ns.locate(ino) if ino is not None else None
            if found is not None and found.key is not None:
                self._release_unused(found.key.handle.layer)
            raise _err(errno.ENOENT)
        raise _err(errno.EROFS)

    # -- everything that would write ---------------------------------------------------------

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        raise _err(errno.EROFS)

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise _err(errno.EROFS)

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise _err(errno.EROFS)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise _err(errno.EROFS)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise _err(errno.EROFS)

    @boundary
    async def rename(
        self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ctx: Any
    ) -> None:
        raise _err(errno.EROFS)

    @boundary
    async def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Any) -> Any:
        raise _err(errno.EROFS)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _err(errno.EROFS)

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise _err(errno.EROFS)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise _err(errno.EROFS)

    # -- dropping layers nobody uses -------------------------------------------------------------

    async def forget(self, inode_list: Any) -> None:
        # No reply and no error path: an exception here would end pyfuse3's main loop, and one
        # pair failing must not keep the others from being counted.
        dropped = False
        for inode, nlookup in inode_list:
            try:
                layer = self.ns.forget(inode, nlookup)
                if layer is not None:
                    dropped = self._drop_if_unused(layer) or dropped
            except Exception as exc:  # noqa: BLE001 - see above
                self._report_once("forget", exc)
        if dropped:
            self._trim_soon()

    def _release_unused(self, layer: RemoteLayer) -> None:
        """Podman released its last use of a path to *layer*: drop the layer now if the
        kernel holds none of its inodes, else ask the kernel to let go of the cached entries of
        every unused path to it (it keeps what is in use, e.g. an overlay lower dir); the
        layer is dropped when the last of its inodes is forgotten."""
        if self.ns.kernel_refs(layer) == 0:
            if self._drop_if_unused(layer):
                self._trim_soon()
            return
        for ref_inode, ref, key in self.ns.key_paths(layer):
            if self.refcounts.count(ref, key) == 0:
                # async: the kernel holds the directory's lock until this rmdir is answered
                pyfuse3.invalidate_entry_async(ref_inode, os.fsencode(key), ignore_enoent=True)

    def _drop_if_unused(self, layer: RemoteLayer) -> bool:
        """Free a layer the kernel holds no inode of and Podman uses through no path."""
        paths = [(h.ref, h.key) for h in self.resolver.handles() if h.layer is layer]
        paths += [(ref, key) for _, ref, key in self.ns.key_paths(layer)]
        if any(self.refcounts.count(ref, key) for ref, key in paths):
            return False  # Podman still has it; kept until released (or the store restarts)
        if not self.ns.drop_layer(layer):
            return False
        self.resolver.drop(layer)
        log.info("layer.dropped", blob=layer.source.digest, paths=len(set(paths)))
        return True

    def _trim_soon(self) -> None:
        """Return a dropped layer's memory to the system, off the event loop (malloc_trim
        takes milliseconds on a big heap); drops close together share one trim."""
        if self._trim_pending:
            return
        self._trim_pending = True

        async def trim() -> None:
            try:
                await trio.to_thread.run_sync(release_free_memory)
            except Exception as exc:  # noqa: BLE001 - a system task must not raise
                self._report_once("trim", exc)
            finally:
                self._trim_pending = False

        trio.lowlevel.spawn_system_task(trim)

    @staticmethod
    def _report_once(op: str, exc: Exception) -> None:
        sig = (op, type(exc).__name__)
        if sig not in _reported:
            _reported.add(sig)
            log.error("fuse.unexpected_error", op=op, cause=repr(exc), exc_info=exc)


ROOT = ROOT_INODE
