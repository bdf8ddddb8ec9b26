"""Small process and mount helpers shared by the harness modules."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1]))
    return out


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest (last mounted) first."""
    base = str(Path(path).resolve())
    found = [m for m, _ in mounts() if m == base or m.startswith(base + "/")]
    return list(reversed(found))


def is_mounted(path: Path) -> bool:
    p = str(Path(path).resolve())
    return any(m == p for m, _ in mounts())


def unmount(path: str | Path) -> None:
    """Unmount `path`: plain, then (FUSE) fusermount3 -u -z, then lazily. Never raises."""
    p = str(path)
    fuse = any(m == p and t.startswith("fuse") for m, t in mounts())
    attempts = [["umount", p]]
    if fuse:
        attempts.append(["fusermount3", "-u", "-z", p])
    attempts.append(["umount", "-l", p])
    for cmd in attempts:
        if not any(m == p for m, _ in mounts()):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=30)


def stop_process(
    proc: subprocess.Popen, *, timeout: float = 10.0, sig: int = signal.SIGTERM
) -> int:
    """Send `sig` to `proc` (started by us), wait, SIGKILL if it does not exit. Returns the code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Poll `cond` until true or `timeout`; gives up early when `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if alive is not None and not alive():
            return cond()
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
