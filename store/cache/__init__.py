"""What outlives one run of the store: verified chunks, layer resolutions, TOC tails."""

from __future__ import annotations

from store.cache.chunks import DiskChunkCache
from store.cache.state import LayerState, StateDB
from store.cache.tails import TailCache

__all__ = ["DiskChunkCache", "LayerState", "StateDB", "TailCache"]
