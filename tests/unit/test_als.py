import json

import pytest

from store.als import (
    COMPRESSION_GZIP,
    KeyKind,
    LayerRecord,
    RefCounts,
    decode_ref,
    encode_ref,
    is_key_name,
)
from store.errors import ReferenceError_

BLOB = "sha256:" + "a" * 64
TOC = "sha256:" + "b" * 64
DIFF = "sha256:" + "c" * 64


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        # values observed in strace of Podman 4.3.1 and 5.4 (test-environment.md §8)
        ("127.0.0.1:5000/big:esgz", "MTI3LjAuMC4xOjUwMDAvYmlnOmVzZ3o="),
        ("127.0.0.1:5000/alstest:v1", "MTI3LjAuMC4xOjUwMDAvYWxzdGVzdDp2MQ=="),
        ("docker.io/library/alpine:latest", "ZG9ja2VyLmlvL2xpYnJhcnkvYWxwaW5lOmxhdGVzdA=="),
    ],
)
def test_ref_codec_matches_podman(ref: str, name: str) -> None:
    assert encode_ref(ref) == name
    assert decode_ref(name) == ref


def test_decode_accepts_missing_padding() -> None:
    assert decode_ref("MTI3LjAuMC4xOjUwMDAvYWxzdGVzdDp2MQ") == "127.0.0.1:5000/alstest:v1"


@pytest.mark.parametrize("bad", ["", "!!!", "a" * 300, "w6k=\u00e9", "/w==", "_-_-"])
def test_decode_rejects_garbage(bad: str) -> None:
    with pytest.raises(ReferenceError_):
        decode_ref(bad)


def test_key_names() -> None:
    assert is_key_name(BLOB)
    assert not is_key_name("sha256:abc")
    assert not is_key_name("use")
    assert not is_key_name("SHA256:" + "a" * 64)


def _record(kind: KeyKind) -> LayerRecord:
    return LayerRecord(
        key=BLOB if kind is KeyKind.BLOB else TOC,
        kind=kind,
        blob_digest=BLOB,
        compressed_size=1234,
        diff_id=DIFF,
        uncompressed_size=5678,
        toc_digest=TOC,
    )


def test_info_for_blob_key_is_what_podman4_needs() -> None:
    info = json.loads(_record(KeyKind.BLOB).info_json())
    assert info == {
        "compressed-diff-digest": BLOB,
        "compressed-size": 1234,
        "diff-digest": DIFF,
        "diff-size": 5678,
        "compression": COMPRESSION_GZIP,
    }


def test_info_for_toc_key_is_what_podman5_needs() -> None:
    info = json.loads(_record(KeyKind.TOC).info_json())
    assert info == {
        "toc-digest": TOC,
        "compressed-size": 1234,
        "diff-size": 5678,
        "compression": COMPRESSION_GZIP,
        "flags": {"expected-layer-diffid": DIFF},
    }
    # G10: no compressed-diff-digest without diff-digest in TOC mode
    assert "compressed-diff-digest" not in info and "diff-digest" not in info


def test_info_bytes_are_stable() -> None:
    assert _record(KeyKind.TOC).info_json() == _record(KeyKind.TOC).info_json()


def test_refcounts_never_negative_and_tolerate_unknown_release() -> None:
    rc = RefCounts()
    assert rc.release("r", "k") == 0  # release after a restart: accepted
    assert rc.use("r", "k") == 1
    assert rc.use("r", "k") == 2
    assert rc.release("r", "k") == 1
    assert rc.release("r", "k") == 0
    assert rc.release("r", "k") == 0
    assert rc.in_use() == {}
