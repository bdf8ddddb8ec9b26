from __future__ import annotations

import json
from typing import Any

import pytest

from store import oci
from store.errors import FormatError, NotFound
from store.oci import Descriptor, Index, Manifest, Platform

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
TOC = "sha256:" + "a" * 64


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def oci_manifest(**extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": 123},
        "layers": [
            {
                "mediaType": oci.OCI_LAYER_GZIP,
                "digest": D2,
                "size": 4567,
                "annotations": {
                    oci.TOC_DIGEST_ANNOTATION: TOC,
                    oci.UNCOMPRESSED_SIZE_ANNOTATION: "10240",
                },
            },
            {"mediaType": oci.OCI_LAYER_ZSTD, "digest": D3, "size": 0},
        ],
        "annotations": {"org.opencontainers.image.created": "2026-12-03T00:00:00Z"},
    }
    m.update(extra)
    return m


# A Docker v2 schema 2 manifest as `podman push --format v2s2` writes it (no annotations).
DOCKER_V2 = {
    "schemaVersion": 2,
    "mediaType": oci.DOCKER_MANIFEST,
    "config": {"mediaType": oci.DOCKER_CONFIG, "size": 1469, "digest": D1},
    "layers": [{"mediaType": oci.DOCKER_LAYER_GZIP, "size": 2814446, "digest": D2}],
}


def index(*entries: tuple[str, dict[str, str] | None], media_type: str = oci.OCI_INDEX) -> bytes:
    manifests = []
    for digest, platform in entries:
        d: dict[str, Any] = {"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": 500}
        if platform is not None:
            d["platform"] = platform
        manifests.append(d)
    return _dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})


# --- manifests -------------------------------------------------------------------------------


def test_parse_oci_manifest() -> None:
    m = oci.parse_manifest(_dumps(oci_manifest()), oci.OCI_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.media_type == oci.OCI_MANIFEST
    assert m.config == Descriptor(oci.OCI_CONFIG, D1, 123)
    assert [layer.digest for layer in m.layers] == [D2, D3]
    assert m.layers[0].annotations[oci.TOC_DIGEST_ANNOTATION] == TOC
    assert oci.toc_digest_of(m.layers[0]) == TOC
    assert oci.uncompressed_size_of(m.layers[0]) == 10240
    assert oci.toc_digest_of(m.layers[1]) is None
    assert oci.uncompressed_size_of(m.layers[1]) is None
    assert m.annotations["org.opencontainers.image.created"].startswith("2026")


def test_parse_docker_v2_manifest() -> None:
    m = oci.parse_manifest(_dumps(DOCKER_V2), oci.DOCKER_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.media_type == oci.DOCKER_MANIFEST
    assert m.config.media_type == oci.DOCKER_CONFIG
    assert m.layers[0].size == 2814446
    assert oci.is_gzip_layer(m.layers[0].media_type)


@pytest.mark.parametrize("header", [None, "", "application/json", "text/plain; charset=utf-8"])
def test_media_type_detected_from_body(header: str | None) -> None:
    assert oci.parse_manifest(_dumps(DOCKER_V2), header).media_type == oci.DOCKER_MANIFEST
    idx = oci.parse_manifest(index((D1, {"os": "linux", "architecture": "amd64"})), header)
    assert isinstance(idx, Index)


def test_media_type_header_parameters_ignored() -> None:
    m = oci.parse_manifest(_dumps(oci_manifest()), oci.OCI_MANIFEST + "; charset=utf-8")
    assert m.media_type == oci.OCI_MANIFEST


def test_structure_decides_without_any_media_type() -> None:
    body = oci_manifest()
    del body["mediaType"]
    assert isinstance(oci.parse_manifest(_dumps(body), None), Manifest)
    idx = {"schemaVersion": 2, "manifests": []}
    assert oci.parse_manifest(_dumps(idx), None) == Index(oci.OCI_INDEX, ())


def test_header_contradicting_body_is_refused() -> None:
    with pytest.raises(FormatError, match="contradicts"):
        oci.parse_manifest(_dumps(oci_manifest()), oci.DOCKER_MANIFEST)


def test_descriptors_hashable_and_comparable() -> None:
    m = oci.parse_manifest(_dumps(oci_manifest()), None)
    assert isinstance(m, Manifest)
    again = oci.parse_manifest(_dumps(oci_manifest()), None)
    assert m == again
    assert len({*m.layers, *again.layers}) == 2


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b"\xff\xfe", "not valid JSON"),
        (_dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}), "schema 1"),
        (_dumps({"schemaVersion": 3, "manifests": []}), "schemaVersion"),
        (_dumps({"schemaVersion": True, "manifests": []}), "schemaVersion"),
        (_dumps({"manifests": []}), "schemaVersion"),
        (_dumps(oci_manifest(mediaType="application/x-unknown")), "unsupported media type"),
        (_dumps({"schemaVersion": 2, "foo": 1}), "neither"),
        (_dumps(oci_manifest(config=None)), "descriptor is not an object"),
        (_dumps({k: v for k, v in oci_manifest().items() if k != "config"}), "missing 'config'"),
        (_dumps(oci_manifest(layers={"a": 1})), "'layers' must be a list"),
        (_dumps(oci_manifest(manifests=[])), "'manifests' field"),
        (_dumps(oci_manifest(annotations={"a": 1})), "annotations"),
    ],
)
def test_malformed_manifests(body: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        oci.parse_manifest(body, None)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"digest": "sha256:abc"}, "invalid digest"),
        ({"digest": "md5:" + "0" * 32}, "invalid digest"),
        ({"digest": 5}, "not a string"),
        ({"size": -1}, "size"),
        ({"size": "12"}, "size"),
        ({"size": True}, "size"),
        ({"size": 1.5}, "size"),
        ({"mediaType": None}, "missing 'mediaType'"),
        ({"urls": "http://x"}, "urls"),
    ],
)
def test_malformed_layer_descriptor(change: dict[str, Any], match: str) -> None:
    body = oci_manifest()
    body["layers"][1].update(change)
    with pytest.raises(FormatError, match=match):
        oci.parse_manifest(_dumps(body), oci.OCI_MANIFEST)


@pytest.mark.parametrize("mt", [oci.DOCKER_MANIFEST_V1, oci.DOCKER_MANIFEST_V1_SIGNED])
def test_schema1_header_refused(mt: str) -> None:
    with pytest.raises(FormatError, match="schema 1"):
        oci.parse_manifest(b'{"schemaVersion": 1}', mt)


def test_bad_annotation_values() -> None:
    body = oci_manifest()
    body["layers"][0]["annotations"] = {
        oci.TOC_DIGEST_ANNOTATION: "nope",
        oci.UNCOMPRESSED_SIZE_ANNOTATION: "-5",
    }
    m = oci.parse_manifest(_dumps(body), None)
    assert isinstance(m, Manifest)
    with pytest.raises(FormatError):
        oci.toc_digest_of(m.layers[0])
    with pytest.raises(FormatError):
        oci.uncompressed_size_of(m.layers[0])


# --- indexes ---------------------------------------------------------------------------------


def test_parse_index_and_manifest_list() -> None:
    body = index(
        (D1, {"os": "linux", "architecture": "amd64"}),
        (D2, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (D3, None),
    )
    idx = oci.parse_manifest(body, oci.OCI_INDEX)
    assert isinstance(idx, Index)
    assert [d.platform for d in idx.manifests] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
        None,
    ]
    lst = oci.parse_manifest(index((D1, None), media_type=oci.DOCKER_MANIFEST_LIST), None)
    assert isinstance(lst, Index)
    assert lst.media_type == oci.DOCKER_MANIFEST_LIST


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"schemaVersion": 2, "mediaType": oci.OCI_INDEX}, "'manifests' must be a list"),
        (
            {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [], "layers": []},
            "config'/'layers",
        ),
        (
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": oci.OCI_MANIFEST,
                        "digest": D1,
                        "size": 1,
                        "platform": {"os": "linux"},
                    }
                ],
            },
            "architecture",
        ),
        (
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": oci.OCI_MANIFEST,
                        "digest": D1,
                        "size": 1,
                        "platform": "linux/amd64",
                    }
                ],
            },
            "platform",
        ),
    ],
)
def test_malformed_index(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        oci.parse_manifest(_dumps(obj), None)


# --- config ----------------------------------------------------------------------------------


def test_parse_config() -> None:
    raw = {
        "architecture": "arm",
        "variant": "v7",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
        "history": [{"created_by": "x"}],
    }
    cfg = oci.parse_config(_dumps(raw))
    assert cfg.diff_ids == (D1, D2)
    assert (cfg.os, cfg.architecture, cfg.variant) == ("linux", "arm", "v7")
    assert cfg.raw == raw


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"os": "linux", "architecture": "amd64"}, "rootfs"),
        ({"os": "linux", "architecture": "amd64", "rootfs": {"type": "x", "diff_ids": []}}, "type"),
        ({"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers"}}, "diff_ids"),
        (
            {
                "os": "linux",
                "architecture": "amd64",
                "rootfs": {"type": "layers", "diff_ids": ["sha256:x"]},
            },
            "diff_ids",
        ),
        ({"architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": []}}, "'os'"),
        ({"os": "linux", "architecture": 1, "rootfs": {"type": "layers", "diff_ids": []}}, "arch"),
    ],
)
def test_malformed_config(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        oci.parse_config(_dumps(obj))


def test_config_not_json() -> None:
    with pytest.raises(FormatError):
        oci.parse_config(b"{")


# --- layer media types -----------------------------------------------------------------------


def test_layer_compression_predicates() -> None:
    assert oci.is_gzip_layer(oci.OCI_LAYER_GZIP)
    assert oci.is_gzip_layer(oci.DOCKER_LAYER_GZIP)
    assert oci.is_gzip_layer("application/vnd.docker.image.rootfs.diff.tar.gzip")
    assert oci.is_gzip_layer(oci.OCI_LAYER_NONDIST_GZIP)
    assert not oci.is_gzip_layer(oci.OCI_LAYER_ZSTD)
    assert not oci.is_gzip_layer(oci.OCI_LAYER_TAR)
    assert oci.is_zstd_layer(oci.OCI_LAYER_ZSTD)
    assert not oci.is_zstd_layer(oci.OCI_LAYER_GZIP)
    assert oci.ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION.startswith("io.github.containers.")
    assert oci.ZSTD_CHUNKED_LEGACY_MANIFEST_POSITION_ANNOTATION.startswith("io.containers.")


# --- platforms -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", Platform("linux", "amd64")),
        ("aarch64", Platform("linux", "arm64", "v8")),
        ("armv7l", Platform("linux", "arm", "v7")),
        ("armv6l", Platform("linux", "arm", "v6")),
        ("i686", Platform("linux", "386")),
        ("ppc64le", Platform("linux", "ppc64le")),
        ("s390x", Platform("linux", "s390x")),
        ("riscv64", Platform("linux", "riscv64")),
    ],
)
def test_host_platform(monkeypatch: pytest.MonkeyPatch, machine: str, expected: Platform) -> None:
    monkeypatch.setattr(oci._platform, "machine", lambda: machine)
    monkeypatch.setattr(oci._platform, "system", lambda: "Linux")
    assert oci.host_platform() == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (Platform("Linux", "x86_64"), Platform("linux", "amd64")),
        (Platform("linux", "amd64", "v1"), Platform("linux", "amd64")),
        (Platform("linux", "aarch64"), Platform("linux", "arm64", "v8")),
        (Platform("linux", "arm64", "8"), Platform("linux", "arm64", "v8")),
        (Platform("linux", "arm64", "v8.0"), Platform("linux", "arm64", "v8")),
        (Platform("linux", "arm"), Platform("linux", "arm", "v7")),
        (Platform("linux", "arm", "6"), Platform("linux", "arm", "v6")),
        (Platform("linux", "armhf"), Platform("linux", "arm", "v7")),
        (Platform("linux", "armel"), Platform("linux", "arm", "v6")),
    ],
)
def test_normalize_platform(given: Platform, expected: Platform) -> None:
    assert oci.normalize_platform(given) == expected


MULTI = index(
    (D1, {"os": "linux", "architecture": "amd64"}),
    (D2, {"os": "linux", "architecture": "arm", "variant": "v6"}),
    (D3, {"os": "linux", "architecture": "arm64"}),  # no variant: means v8 for arm64
    ("sha256:" + "4" * 64, {"os": "unknown", "architecture": "unknown"}),  # attestation
    ("sha256:" + "5" * 64, {"os": "windows", "architecture": "amd64"}),
)


def _choose(body: bytes, want: Platform) -> str:
    idx = oci.parse_manifest(body, None)
    assert isinstance(idx, Index)
    return oci.choose_platform(idx, want).digest


def test_choose_exact() -> None:
    assert _choose(MULTI, Platform("linux", "amd64")) == D1


def test_choose_arm64_missing_variant_is_v8() -> None:
    assert _choose(MULTI, Platform("linux", "arm64", "v8")) == D3
    assert _choose(MULTI, Platform("linux", "aarch64")) == D3


def test_choose_arm_falls_back_to_older_variant() -> None:
    # a v7 CPU runs v6 binaries; there is no v7 entry
    assert _choose(MULTI, Platform("linux", "arm", "v7")) == D2
    body = index(
        (D1, {"os": "linux", "architecture": "arm", "variant": "v5"}),
        (D2, {"os": "linux", "architecture": "arm", "variant": "v7"}),
        (D3, {"os": "linux", "architecture": "arm", "variant": "v6"}),
    )
    assert _choose(body, Platform("linux", "arm", "v7")) == D2
    assert _choose(body, Platform("linux", "arm", "v6")) == D3
    assert _choose(body, Platform("linux", "arm", "v8")) == D2


def test_choose_never_picks_newer_variant() -> None:
    body = index((D1, {"os": "linux", "architecture": "arm", "variant": "v7"}))
    idx = oci.parse_manifest(body, None)
    assert isinstance(idx, Index)
    with pytest.raises(NotFound, match="linux/arm/v6"):
        oci.choose_platform(idx, Platform("linux", "arm", "v6"))


def test_choose_prefers_plain_amd64_over_microarch_variant() -> None:
    body = index(
        (D1, {"os": "linux", "architecture": "amd64", "variant": "v3"}),
        (D2, {"os": "linux", "architecture": "amd64"}),
    )
    assert _choose(body, Platform("linux", "amd64")) == D2
    assert _choose(body, Platform("linux", "amd64", "v3")) == D1
    assert _choose(body, Platform("linux", "amd64", "v2")) == D2


def test_choose_first_in_index_order_wins_ties() -> None:
    body = index(
        (D1, {"os": "linux", "architecture": "amd64"}),
        (D2, {"os": "linux", "architecture": "amd64"}),
    )
    assert _choose(body, Platform("linux", "amd64")) == D1


def test_choose_no_match_lists_available() -> None:
    idx = oci.parse_manifest(MULTI, None)
    assert isinstance(idx, Index)
    with pytest.raises(NotFound) as info:
        oci.choose_platform(idx, Platform("linux", "s390x"))
    assert "linux/amd64" in str(info.value)
    assert "linux/s390x" in str(info.value)


def test_choose_skips_nested_index_and_entries_without_platform() -> None:
    nested = _dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": oci.OCI_INDEX,
                    "digest": D1,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
                {"mediaType": oci.OCI_MANIFEST, "digest": D2, "size": 1},
            ],
        }
    )
    idx = oci.parse_manifest(nested, None)
    assert isinstance(idx, Index)
    with pytest.raises(NotFound):
        oci.choose_platform(idx, Platform("linux", "amd64"))


def test_platform_str() -> None:
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"
    assert str(Platform("linux", "amd64")) == "linux/amd64"
