"""Give memory freed by a big parse back to the operating system.

Parsing a TOC with 100,000 entries builds and drops hundreds of MB of JSON objects. CPython
returns them to glibc's heap, which keeps most of it mapped: the store's RSS would stay at the
parse peak for good. `malloc_trim` returns the free pages. Elsewhere (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
