"""What outlives one run of the store: verified chunks on disk and layer resolutions."""

from __future__ import annotations

from store.cache.chunks import DiskChunkCache
from store.cache.state import LayerState, StateDB

__all__ = ["DiskChunkCache", "LayerState", "StateDB"]
