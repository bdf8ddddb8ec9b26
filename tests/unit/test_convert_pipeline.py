"""`layerstore convert` between OCI layouts on disk: the whole pipeline, offline."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from store import cli
from store.convert import ConvertOptions, LayoutSource, LayoutTarget, convert, parse_platform
from store.estargz import build_estargz_bytes
from store.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from store.ocilayout import Layout, LayoutRef
from tests.unit.test_convert_support import (
    MT_GZIP,
    MT_TAR,
    MT_ZSTD,
    OCI_INDEX,
    OCI_MANIFEST,
    TOC_DIGEST,
    USIZE,
    content_files,
    image_config,
    make_tar,
    read_estargz,
    sha,
    tar_files,
    write_layout,
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.fixture(autouse=True)
def _keep_logging_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # cli.main() configures structlog process-wide; other tests capture warnings afterwards.
    monkeypatch.setattr(cli.logsetup, "setup", lambda *args, **kwargs: None)


def _tars() -> list[bytes]:
    return [
        make_tar(
            {"etc/hello": b"hello\n", "bin/tool": b"\x7fELF" + bytes(range(256)) * 300},
            dirs=("etc", "bin"),
        ),
        make_tar({"data/big.bin": bytes(range(251)) * 40_000}, dirs=("data",)),
        make_tar({"data/z.txt": b"zstd layer\n" * 1000}, dirs=("data",)),
    ]


def _source_layout(root: Path, **kw: Any) -> tuple[list[bytes], dict[str, Any]]:
    tars = _tars()
    layers = [
        (gzip.compress(tars[0], mtime=0), MT_GZIP),
        (tars[1], MT_TAR),
        (zstandard.ZstdCompressor().compress(tars[2]), MT_ZSTD),
    ]
    config = image_config([sha(t) for t in tars])
    desc = write_layout(root, layers, config, **kw)
    return tars, desc


def _read_image(layout_dir: Path, tag: str | None) -> tuple[dict, dict, Layout]:
    layout = Layout(layout_dir)
    desc = layout.resolve(tag)
    manifest = json.loads(layout.read_blob(desc.digest))
    config = json.loads(layout.read_blob(manifest["config"]["digest"]))
    return manifest, config, layout


def _check_converted(layout_dir: Path, tag: str | None, tars: list[bytes]) -> dict:
    manifest, config, layout = _read_image(layout_dir, tag)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert len(manifest["layers"]) == len(tars)
    for desc, tar, diff_id in zip(manifest["layers"], tars, config["rootfs"]["diff_ids"],
                                  strict=True):
        assert desc["mediaType"] == MT_GZIP
        blob = layout.blob_path(desc["digest"]).read_bytes()
        assert sha(blob) == desc["digest"] and len(blob) == desc["size"]
        toc, files = read_estargz(blob, desc["annotations"][TOC_DIGEST])
        assert content_files(files) == tar_files(tar)
        inner = gzip.decompress(blob)  # every member concatenated: the new layer tar
        assert sha(inner) == diff_id  # diff_ids rewritten to the eStargz DiffID
        assert int(desc["annotations"][USIZE]) == len(inner)
    return manifest


def test_layout_to_layout_gzip_tar_zstd(tmp_path: Path) -> None:
    tars, _ = _source_layout(tmp_path / "src")
    result = convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:v1")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst:esgz")),
        ConvertOptions(chunk_size=64 << 10),
    )
    manifest = _check_converted(tmp_path / "dst", "esgz", tars)
    _, config, _ = _read_image(tmp_path / "dst", "esgz")
    assert config["history"] == image_config(["sha256:" + "0" * 64] * 3)["history"]
    assert result.digest == sha(Layout(tmp_path / "dst").read_blob(result.digest))
    assert [r.kept for r in result.layers] == [False, False, False]
    assert "toc entries" in result.summary()
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"


def test_reproducible_and_kept_when_converted_again(tmp_path: Path) -> None:
    _source_layout(tmp_path / "src")
    digests = []
    for name in ("a", "b"):
        res = convert(
            LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:v1")),
            LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/{name}:t")),
            ConvertOptions(),
        )
        digests.append(res.digest)
    assert digests[0] == digests[1]
    # converting the output again keeps every (already eStargz) layer: same digest
    again = convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/a:t")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/c:t")),
        ConvertOptions(),
    )
    assert [r.kept for r in again.layers] == [True, True, True]
    assert again.digest == digests[0]


def test_estargz_layer_without_size_annotation_is_kept_and_annotated(tmp_path: Path) -> None:
    tar = make_tar({"a.txt": b"already estargz\n"})
    blob, res = build_estargz_bytes(tar)
    write_layout(
        tmp_path / "src", [(blob, MT_GZIP)], image_config([res.diff_id]),
        layer_annotations=[{TOC_DIGEST: res.toc_digest}],
    )
    out = convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst")),
        ConvertOptions(),
    )
    assert out.layers[0].kept
    manifest, _, _ = _read_image(tmp_path / "dst", None)
    assert manifest["layers"][0]["digest"] == sha(blob)
    assert manifest["layers"][0]["annotations"] == {
        TOC_DIGEST: res.toc_digest, USIZE: str(res.uncompressed_size)
    }


def test_wrong_toc_annotation_means_convert_not_keep(tmp_path: Path) -> None:
    tar = make_tar({"a.txt": b"x"})
    blob, res = build_estargz_bytes(tar)
    write_layout(
        tmp_path / "src", [(blob, MT_GZIP)], image_config([res.diff_id]),
        layer_annotations=[{TOC_DIGEST: sha(b"something else")}],
    )
    out = convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst")),
        ConvertOptions(),
    )
    assert not out.layers[0].kept
    manifest, _, layout = _read_image(tmp_path / "dst", None)
    desc = manifest["layers"][0]
    _, files = read_estargz(layout.blob_path(desc["digest"]).read_bytes(),
                            desc["annotations"][TOC_DIGEST])
    assert content_files(files) == {"a.txt": b"x"}


def test_docker_v2_input_gives_oci_output(tmp_path: Path) -> None:
    tar = make_tar({"hello": b"docker\n"})
    write_layout(
        tmp_path / "src", [(gzip.compress(tar, mtime=0), DOCKER_GZIP)],
        image_config([sha(tar)]),
        manifest_media_type=DOCKER_MANIFEST, config_media_type=DOCKER_CONFIG,
    )
    convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:v1")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst:v1")),
        ConvertOptions(),
    )
    _check_converted(tmp_path / "dst", "v1", [tar])


def test_prioritize_places_files_first_per_layer(tmp_path: Path) -> None:
    tars, _ = _source_layout(tmp_path / "src")
    convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:v1")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst:v1")),
        # bin/tool is only in layer 0, data/z.txt only in layer 2; layer 1 has neither
        ConvertOptions(prioritized=("/bin/tool", "data/z.txt")),
    )
    manifest, _, layout = _read_image(tmp_path / "dst", "v1")
    names = []
    for desc in manifest["layers"]:
        toc, _ = read_estargz(layout.blob_path(desc["digest"]).read_bytes(),
                              desc["annotations"][TOC_DIGEST])
        names.append([e.name for e in toc.entries])
    assert names[0][:3] == ["bin", "bin/tool", PREFETCH_LANDMARK]
    assert names[1][0] == NO_PREFETCH_LANDMARK
    assert names[2][:3] == ["data", "data/z.txt", PREFETCH_LANDMARK]


def _multi_platform_layout(root: Path) -> list[bytes]:
    tars = [make_tar({"arch": a.encode()}) for a in ("amd64", "arm64")]
    tops = [
        write_layout(root, [(gzip.compress(t, mtime=0), MT_GZIP)],
                     image_config([sha(t)], arch=a), tag=None)
        for t, a in zip(tars, ("amd64", "arm64"), strict=True)
    ]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**tops[0], "platform": {"os": "linux", "architecture": "amd64"}},
            {**tops[1], "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    }
    data = json.dumps(index).encode()
    (root / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
    (root / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": OCI_INDEX, "digest": sha(data), "size": len(data),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    }))
    return tars


def test_all_platforms_gives_an_index(tmp_path: Path) -> None:
    tars = _multi_platform_layout(tmp_path / "src")
    res = convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:multi")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst:multi")),
        ConvertOptions(all_platforms=True),
    )
    layout = Layout(tmp_path / "dst")
    assert layout.resolve("multi").media_type == OCI_INDEX
    index = json.loads(layout.read_blob(res.digest))
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    assert index["manifests"][1]["platform"]["variant"] == "v8"
    for entry, tar in zip(index["manifests"], tars, strict=True):
        manifest = json.loads(layout.read_blob(entry["digest"]))
        desc = manifest["layers"][0]
        _, files = read_estargz(layout.blob_path(desc["digest"]).read_bytes(),
                                desc["annotations"][TOC_DIGEST])
        assert content_files(files) == tar_files(tar)


def test_platform_picks_one_manifest(tmp_path: Path) -> None:
    tars = _multi_platform_layout(tmp_path / "src")
    convert(
        LayoutSource(LayoutRef.parse(f"oci:{tmp_path}/src:multi")),
        LayoutTarget(LayoutRef.parse(f"oci:{tmp_path}/dst:one")),
        ConvertOptions(platform=parse_platform("linux/arm64")),
    )
    _check_converted(tmp_path / "dst", "one", [tars[1]])


def test_layout_ref_parsing() -> None:
    assert LayoutRef.parse("oci:/a/b:tag") == LayoutRef(Path("/a/b"), "tag")
    assert LayoutRef.parse("oci:/a/b") == LayoutRef(Path("/a/b"), None)
    assert LayoutRef.parse("oci:rel/dir:v1.2") == LayoutRef(Path("rel/dir"), "v1.2")
    assert parse_platform("linux/arm/v7").variant == "v7"
    with pytest.raises(ValueError):
        parse_platform("linux")


# --- bad input: one-line error, exit != 0, DST tag absent --------------------------------------


def _evil_tar(name: str = "../../etc/evil") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo(name)
        ti.size = 4
        tar.addfile(ti, io.BytesIO(b"evil"))
    return buf.getvalue()


def _bad_layouts(root: Path) -> dict[str, Path]:
    good = make_tar({"ok": b"fine"})
    cases: dict[str, tuple[list[tuple[bytes, str]], list[bytes]]] = {
        "dotdot": ([(gzip.compress(_evil_tar(), mtime=0), MT_GZIP)], [_evil_tar()]),
        "absolute": ([(gzip.compress(_evil_tar("/etc/evil"), mtime=0), MT_GZIP)],
                     [_evil_tar("/etc/evil")]),
        "corrupt-gzip": ([(gzip.compress(good, mtime=0)[:-30] + b"\x00" * 30, MT_GZIP)], [good]),
        "foreign": ([(gzip.compress(good, mtime=0),
                      "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")], [good]),
        "unknown": ([(good, "application/x-unknown")], [good]),
    }
    out = {}
    for name, (layers, tars) in cases.items():
        write_layout(root / name, layers, image_config([sha(t) for t in tars]))
        out[name] = root / name
    # a manifest whose layer blob is missing
    write_layout(root / "missing", [(gzip.compress(good, mtime=0), MT_GZIP)],
                 image_config([sha(good)]))
    manifest_desc = Layout(root / "missing").resolve("v1")
    manifest = json.loads(Layout(root / "missing").read_blob(manifest_desc.digest))
    Layout(root / "missing").blob_path(manifest["layers"][0]["digest"]).unlink()
    out["missing"] = root / "missing"
    return out


@pytest.mark.parametrize(
    "case", ["dotdot", "absolute", "corrupt-gzip", "foreign", "unknown", "missing"]
)
def test_bad_input_one_line_error_and_no_tag(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _bad_layouts(tmp_path)[case]
    dst = tmp_path / "dst"
    # DST already holds another tag: it must survive untouched
    write_layout(dst, [(make_tar({"keep": b"me"}), MT_TAR)], image_config([sha(b"x")]),
                 tag="other")
    before = (dst / "index.json").read_bytes()
    code = cli.main(["convert", f"oci:{src}:v1", f"oci:{dst}:new"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("layerstore: convert: ")
    assert (dst / "index.json").read_bytes() == before
    with pytest.raises(Exception, match="no image tagged"):
        Layout(dst).resolve("new")


def test_cli_layout_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tars, _ = _source_layout(tmp_path / "src")
    prio = tmp_path / "prio.txt"
    prio.write_text("# read first\n/etc/hello\n\n")
    code = cli.main([
        "convert", "--chunk-size", "65536", "--compression-level", "6", "--prioritize", str(prio),
        f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v2",
    ])
    out = capsys.readouterr()
    assert code == cli.EXIT_OK, out.err
    assert "toc entries" in out.out and out.err == ""  # stderr is not a TTY: no progress
    _check_converted(tmp_path / "dst", "v2", tars)


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["convert", "--compression-level", "12", "oci:/x", "oci:/y"]) == cli.EXIT_USAGE
    assert cli.main(["convert", "--platform", "linux", "oci:/x", "oci:/y"]) == cli.EXIT_USAGE
    code = cli.main(["convert", f"oci:{tmp_path}/nothing:v1", f"oci:{tmp_path}/dst"])
    assert code == cli.EXIT_FAILURE
    assert "not an OCI image layout" in capsys.readouterr().err
