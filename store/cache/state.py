"""What each `<ref>/<key>` resolved to, kept in SQLite so that it survives restarts.

Podman records a layer once and then keeps using `<ref>/<key>` for as long as the image and its
containers exist; it never pulls again just because the store restarted. So the store must
answer for that pair after a restart (even a SIGKILL) exactly as before, even if the tag has
moved since: the key names the content, and the record says where that content is (repository
and blob digest) and what `info` said about it. A record is written once the layer was fully
prepared (TOC verified), in WAL mode with a synchronous commit, so a crash loses at most the
layer being prepared at that moment.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    ref TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    blob_digest TEXT NOT NULL,
    compressed_size INTEGER NOT NULL,
    uncompressed_size INTEGER NOT NULL,
    toc_digest TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    compression INTEGER NOT NULL,
    layer_index INTEGER NOT NULL,
    layer_count INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (ref, key)
)
"""


@dataclass(frozen=True, slots=True)
class LayerState:
    """One resolution: enough to serve the layer again without its manifest or config."""

    ref: str
    key: str
    kind: str  # als.KeyKind value
    registry: str
    repository: str
    manifest_digest: str  # the manifest the tag pointed at when Podman pulled
    config_digest: str
    blob_digest: str
    compressed_size: int
    uncompressed_size: int
    toc_digest: str
    diff_id: str
    compression: int
    layer_index: int  # position in the manifest (config facts: diff_ids[layer_index])
    layer_count: int
    recorded_at: float = 0.0


_COLUMNS = tuple(f.name for f in fields(LayerState))


class StateDB:
    """Thread-safe: one connection guarded by a lock (calls are rare: one per layer)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: state schema {version} is newer than this store")
        self._db.execute(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def get(self, ref: str, key: str) -> LayerState | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM layers WHERE ref = ? AND key = ?", (ref, key)
            ).fetchone()
        return LayerState(*row) if row is not None else None

    def put(self, state: LayerState) -> None:
        if not state.recorded_at:
            state = LayerState(**{**_asdict(state), "recorded_at": time.time()})
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO layers ({', '.join(_COLUMNS)}) VALUES ({marks})",
                tuple(getattr(state, c) for c in _COLUMNS),
            )

    def forget(self, ref: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM layers WHERE ref = ? AND key = ?", (ref, key))

    def all(self) -> list[LayerState]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM layers ORDER BY recorded_at"
            ).fetchall()
        return [LayerState(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _asdict(state: LayerState) -> dict[str, object]:
    return {c: getattr(state, c) for c in _COLUMNS}
