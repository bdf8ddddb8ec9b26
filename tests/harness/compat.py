"""Record what the e2e suites prove, for the README compatibility table.

Any e2e test may record the outcome of one (Podman version, image format, operation) cell:

    with compat.check(version, compat.ESGZ_CTR, "pull", keys="toc"):
        ...  # the operation and its assertions; an exception records ok=false and propagates

or `compat.record(version, fmt, op, ok)`. Each call appends one JSON line to
bench/results/compat.jsonl; `scripts/compat_table.py` renders the newest outcome of every cell
into README.md. Nothing here decides an outcome: a cell is only as true as the test around it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(
    os.environ.get("LAYERSTORE_COMPAT_RESULTS", REPO_ROOT / "bench" / "results" / "compat.jsonl")
)

OPERATIONS = ("pull", "run", "save", "push")
# image format labels, shared so that rows of different suites line up
ESGZ_CTR = "eStargz (ctr-remote)"
ESGZ_OURS = "eStargz (layerstore writer)"
GZIP = "gzip (no TOC: normal pull)"
ZSTD_CHUNKED_PODMAN = "zstd:chunked (podman push)"
ZSTD_CHUNKED_CTR = "zstd:chunked (ctr-remote)"
ZSTD_CHUNKED_OURS = "zstd:chunked (layerstore convert)"

_RUN_ID = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def record(
    podman_version: str, image_format: str, operation: str, ok: bool, **extra: object
) -> None:
    """Append one outcome. `extra` (e.g. keys="toc", test=nodeid) is kept in the line."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, not {operation!r}")
    line = {
        "podman": podman_version,
        "format": image_format,
        "operation": operation,
        "ok": bool(ok),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": _RUN_ID,
        **extra,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(line, sort_keys=True) + "\n").encode()
    # one write of one line under a lock: sessions running side by side never interleave
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


@contextlib.contextmanager
def check(
    podman_version: str, image_format: str, operation: str, **extra: object
) -> Iterator[None]:
    """Record ok=True if the block completes, ok=False (and re-raise) if it raises."""
    try:
        yield
    except BaseException as exc:
        record(podman_version, image_format, operation, False, error=type(exc).__name__, **extra)
        raise
    record(podman_version, image_format, operation, True, **extra)
