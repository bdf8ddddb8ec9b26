"""The SQLite record of what each <ref>/<key> resolved to."""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from store.cache.state import LayerState, StateDB


def sample(ref: str = "127.0.0.1:5000/app:v1", key: str = "sha256:" + "a" * 64) -> LayerState:
    return LayerState(
        ref=ref,
        key=key,
        kind="blob",
        registry="127.0.0.1:5000",
        repository="app",
        manifest_digest="sha256:" + "b" * 64,
        config_digest="sha256:" + "c" * 64,
        blob_digest=key,
        compressed_size=1234,
        uncompressed_size=5678,
        toc_digest="sha256:" + "d" * 64,
        diff_id="sha256:" + "e" * 64,
        compression=2,
        layer_index=1,
        layer_count=3,
    )


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    assert db.get("r", "k") is None
    rec = sample()
    db.put(rec)
    got = db.get(rec.ref, rec.key)
    assert got is not None and got.recorded_at > 0
    assert got == replace(rec, recorded_at=got.recorded_at)
    db.close()
    again = StateDB(tmp_path / "state.db")
    back = again.get(rec.ref, rec.key)
    assert back == got
    assert [r.key for r in again.all()] == [rec.key]
    again.close()


def test_same_key_under_two_refs_and_replace(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.db")
    db.put(sample(ref="a:1"))
    db.put(sample(ref="b:1"))
    moved = sample(ref="a:1")
    db.put(replace(moved, repository="x"))
    assert db.get("a:1", moved.key).repository == "x"
    assert db.get("b:1", moved.key).repository == "app"
    db.forget("a:1", moved.key)
    assert db.get("a:1", moved.key) is None
    db.close()


def _write_then_die(path: str) -> None:
    db = StateDB(Path(path))
    db.put(sample())
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no clean shutdown


def test_record_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    proc = multiprocessing.get_context("fork").Process(target=_write_then_die, args=(str(path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    db = StateDB(path)
    rec = db.get(sample().ref, sample().key)
    assert rec is not None and rec.diff_id == sample().diff_id
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        StateDB(path)
