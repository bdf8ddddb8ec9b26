import threading
import time

import pytest

from store.chunkcache import ChunkCache
from store.singleflight import SingleFlight


def test_concurrent_callers_share_one_call() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    gate = threading.Event()

    def work() -> int:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(flight.run("k", work))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while flight.in_flight() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [42] * 8
    assert calls == 1


def test_failures_are_not_remembered() -> None:
    flight: SingleFlight[int] = SingleFlight()
    with pytest.raises(RuntimeError):
        flight.run("k", lambda: (_ for _ in ()).throw(RuntimeError("down")))
    assert flight.run("k", lambda: 7) == 7


def test_chunk_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = ChunkCache(10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # a is now most recent
    cache.put("c", b"90ab")  # 12 bytes > 10: evict b
    assert cache.get("b") is None
    assert cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    assert cache.size == 8
    cache.put("huge", b"x" * 11)  # larger than the cache: not stored
    assert cache.get("huge") is None
