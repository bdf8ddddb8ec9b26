"""Mounting, serving until a signal, and unmounting; plus clearing a stale mount.

A store that crashed leaves its mount point dead (ENOTCONN); containers/storage stats the
additional layer store at start-up, so every Podman command then fails (G7). `serve` therefore
detaches any mount left on the mount point before mounting again.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import structlog
import trio

from store.fuse.ops import Operations

log = structlog.get_logger(__name__)

# suid/dev: files in the layers keep setuid bits and device nodes (libfuse defaults to
# nosuid,nodev). allow_other: Podman, overlayfs and container users of any uid must see it.
# No default_permissions: the kernel must forward ACCESS, CREATE(use) and RMDIR to us.
MOUNT_OPTIONS = frozenset({"fsname=layerstore", "subtype=layerstore", "allow_other", "suid", "dev"})
# Kernel read-ahead of the mount (KiB); the kernel default for FUSE is 128. A sequential reader
# then has several FUSE reads of the next MiBs in flight, so the chunk fetches, inflates and
# hashes behind them overlap (about +15% cold throughput measured; 16 MiB was slower again).
# One eStargz chunk (4 MiB by default).
READ_AHEAD_KB = 4096


def mounted_at(mountpoint: Path) -> bool:
    """True if anything is mounted at *mountpoint* (works for dead FUSE mounts too)."""
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        pass
    return False


def _unescape(path: str) -> str:
    return (
        path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mount_device(target: str) -> str | None:
    """"major:minor" of what is mounted at *target* (a resolved path; the last mount on it),
    from mountinfo: stat() of our own mount point, realpath() included, before the loop
    serves it would hang."""
    device = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    device = fields[2]
    except OSError:
        return None
    return device


def set_read_ahead(target: str, kib: int = READ_AHEAD_KB) -> bool:
    """Raise the kernel read-ahead of the mount at *target* (a resolved path) through its bdi
    (needs root; speed only, never fatal)."""
    device = mount_device(target)
    if device is None:
        return False
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.info("mount.read_ahead_unchanged", device=device, cause=repr(exc))
        return False
    return True


def clear_stale_mount(mountpoint: Path) -> bool:
    """Detach whatever is mounted at *mountpoint*. Returns True if something was removed."""
    if not mounted_at(mountpoint):
        return False
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            subprocess.run(cmd, check=False, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not mounted_at(mountpoint):
            log.warning("mount.stale_cleared", mountpoint=str(mountpoint))
            return True
    raise OSError(f"a stale mount at {mountpoint} could not be removed")


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", cause=repr(exc))


def serve(ops: Operations, mountpoint: Path, *, on_stop: Callable[[], None] | None = None) -> None:
    """Mount *ops* at *mountpoint* and serve until SIGINT/SIGTERM or an external unmount."""
    clear_stale_mount(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    ops._mount_time_ns = time.time_ns()
    target = os.path.realpath(mountpoint)  # now: once mounted, resolving it needs our loop
    # Not now: the kernel caps read-ahead at what it had when it sent INIT, once our reply to
    # INIT arrives. The first lookup comes after that, and before any file is opened.
    ops.after_init = functools.partial(set_read_ahead, target)
    pyfuse3.init(ops, str(mountpoint), MOUNT_OPTIONS)
    log.info("store.mounted", mountpoint=str(mountpoint), pid=os.getpid())
    _sd_notify("READY=1")
    try:
        trio.run(_main)
    finally:
        _sd_notify("STOPPING=1")
        try:
            # Unmount first: nothing serves the mount any more, and every access to it would
            # hang while on_stop finishes its work (read-ahead jobs, disk cache writes).
            pyfuse3.close(unmount=True)
            log.info("store.unmounted", mountpoint=str(mountpoint))
        finally:
            if on_stop is not None:
                on_stop()


async def _main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()  # unmounted from outside: stop the signal watcher


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("store.stopping", signal=signal.Signals(signum).name)
            pyfuse3.terminate()
            return
