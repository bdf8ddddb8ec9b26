"""OCI / Docker v2 image models: media types, annotations, manifest/index/config parsing,
platform choice.

Pure module (tier T1): stdlib plus store.digest/store.errors only. It never performs I/O and
never logs; malformed input raises FormatError, a missing platform raises NotFound.

Both the OCI image spec and Docker's "image manifest v2, schema 2" are accepted because
registries and Podman produce either; schema 1 manifests (signed or not) are refused, since
they carry no layer descriptors with sizes and no config digest.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from store.digest import is_digest
from store.errors import FormatError, NotFound

# --- media types -------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Deprecated by image-spec 1.1 but still found in the wild (Windows base layers).
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1: recognised only to give a clear "unsupported" error.
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: Everything the registry client puts in its manifest Accept header, most preferred first.
ACCEPTED_MANIFEST_TYPES: tuple[str, ...] = (
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
)
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

_GZIP_LAYERS = frozenset(
    {OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER_GZIP}
)
_ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_ZSTD})
_SCHEMA1 = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})

# --- annotation keys ---------------------------------------------------------------------------

#: eStargz: digest of the uncompressed TOC JSON (estargz-format.md; set by ctr-remote/podman).
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
#: eStargz: size of the uncompressed layer tar, decimal string.
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
#: zstd:chunked, current keys (c/storage pkg/chunked/toc).
ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_MANIFEST_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
#: zstd:chunked tar-split section ("<offset>:<length>:<uncompressed length>"), c/storage >= 1.48.
ZSTD_CHUNKED_TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
#: Digest of the compressed tar-split, c/storage 1.48-1.53 only (later in the TOC's tarSplitDigest).
ZSTD_CHUNKED_TARSPLIT_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-checksum"
# Older keys, written by Podman 4.x (test-environment.md §5 shows them on a 4.3.1 push).
ZSTD_CHUNKED_LEGACY_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_LEGACY_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"


def is_gzip_layer(media_type: str) -> bool:
    return media_type in _GZIP_LAYERS


def is_zstd_layer(media_type: str) -> bool:
    return media_type in _ZSTD_LAYERS


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture]
        if self.variant:
            parts.append(self.variant)
        return "/".join(parts)


# Mappings are excluded from the hash (a dict is unhashable) but still compared, so equal
# descriptors hash equal and descriptors can live in sets and dict keys.
@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class ImageConfig:
    diff_ids: tuple[str, ...]
    os: str
    architecture: str
    raw: dict[str, Any] = field(hash=False, repr=False)
    variant: str | None = None


# --- parsing -----------------------------------------------------------------------------------


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: top-level JSON value is not an object")
    return obj


def _str_field(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise FormatError(f"{what}: missing {key!r}")
        return None
    if not isinstance(value, str):
        raise FormatError(f"{what}: {key!r} is not a string")
    return value


def _annotations(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    raw = obj.get("annotations")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise FormatError(f"{what}: 'annotations' must map strings to strings")
    return dict(raw)


def _parse_platform(raw: Any, what: str) -> Platform:
    if not isinstance(raw, dict):
        raise FormatError(f"{what}: 'platform' is not an object")
    os_ = _str_field(raw, "os", what)
    arch = _str_field(raw, "architecture", what)
    variant = _str_field(raw, "variant", what, required=False)
    assert os_ is not None and arch is not None
    return Platform(os_, arch, variant or None)


def _parse_descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise FormatError(f"{what}: descriptor is not an object")
    media_type = _str_field(raw, "mediaType", what)
    digest = _str_field(raw, "digest", what)
    assert media_type is not None and digest is not None
    if not is_digest(digest):
        raise FormatError(f"{what}: invalid digest {digest[:80]!r}")
    size = raw.get("size")
    # bool is an int subclass; JSON `true` must not pass as size 1.
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: 'size' must be a non-negative integer")
    urls = raw.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise FormatError(f"{what}: 'urls' must be a list of strings")
    platform = raw.get("platform")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_annotations(raw, what),
        platform=None if platform is None else _parse_platform(platform, what),
        urls=tuple(urls),
    )


def sniff_media_type(data: bytes) -> str | None:
    """The `mediaType` field of a manifest body, or None if absent/unparseable.

    Used when a registry answers with a generic Content-Type (application/json, text/plain).
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("mediaType"), str):
        return obj["mediaType"]
    return None


def _known(media_type: str | None) -> bool:
    return media_type in MANIFEST_MEDIA_TYPES or media_type in INDEX_MEDIA_TYPES


def parse_manifest(data: bytes, media_type: str | None) -> Manifest | Index:
    """Parse an image manifest or index.

    *media_type* is the registry's Content-Type (parameters are ignored); when it is missing or
    generic the body's `mediaType` field decides, and failing that the structure does (an OCI
    index may legally omit `mediaType`).
    """
    header = media_type.split(";", 1)[0].strip().lower() if media_type else None
    if header in _SCHEMA1:
        raise FormatError(f"manifest: schema 1 ({header}) is not supported")
    obj = _load_object(data, "manifest")
    version = obj.get("schemaVersion")
    if isinstance(version, bool) or version not in (1, 2):
        raise FormatError(f"manifest: unsupported schemaVersion {version!r}")
    if version == 1:
        raise FormatError("manifest: schema 1 manifests are not supported")
    body_type = _str_field(obj, "mediaType", "manifest", required=False)
    if body_type in _SCHEMA1:
        raise FormatError(f"manifest: schema 1 ({body_type}) is not supported")
    # A body that contradicts the header is refused rather than guessed at: image-spec asks
    # for this to avoid one blob being interpreted as two different kinds of object.
    if _known(header) and _known(body_type) and header != body_type:
        raise FormatError(f"manifest: Content-Type {header} contradicts mediaType {body_type}")
    kind = header if _known(header) else body_type
    if not _known(kind):
        if body_type is not None:
            raise FormatError(f"manifest: unsupported media type {body_type!r}")
        if "manifests" in obj:
            kind = OCI_INDEX
        elif "config" in obj and "layers" in obj:
            kind = OCI_MANIFEST
        else:
            raise FormatError("manifest: neither an image manifest nor an index")
    assert kind is not None
    if kind in INDEX_MEDIA_TYPES:
        return _parse_index(obj, kind)
    return _parse_image_manifest(obj, kind)


def _parse_index(obj: dict[str, Any], kind: str) -> Index:
    if "config" in obj or "layers" in obj:
        raise FormatError("index: has 'config'/'layers' fields of an image manifest")
    raw = obj.get("manifests")
    if not isinstance(raw, list):
        raise FormatError("index: 'manifests' must be a list")
    manifests = tuple(_parse_descriptor(d, f"index.manifests[{i}]") for i, d in enumerate(raw))
    return Index(media_type=kind, manifests=manifests, annotations=_annotations(obj, "index"))


def _parse_image_manifest(obj: dict[str, Any], kind: str) -> Manifest:
    if "manifests" in obj:
        raise FormatError("manifest: has the 'manifests' field of an index")
    if "config" not in obj:
        raise FormatError("manifest: missing 'config'")
    config = _parse_descriptor(obj["config"], "manifest.config")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list):
        raise FormatError("manifest: 'layers' must be a list")
    layers = tuple(_parse_descriptor(d, f"manifest.layers[{i}]") for i, d in enumerate(raw_layers))
    return Manifest(
        media_type=kind,
        config=config,
        layers=layers,
        annotations=_annotations(obj, "manifest"),
    )


def parse_config(data: bytes) -> ImageConfig:
    """Parse an image config blob (OCI or Docker), keeping the whole object in `raw`."""
    obj = _load_object(data, "config")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict):
        raise FormatError("config: missing 'rootfs'")
    if rootfs.get("type") != "layers":
        raise FormatError(f"config: unsupported rootfs.type {rootfs.get('type')!r}")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and is_digest(d) for d in diff_ids
    ):
        raise FormatError("config: rootfs.diff_ids must be a list of digests")
    os_ = _str_field(obj, "os", "config")
    arch = _str_field(obj, "architecture", "config")
    variant = _str_field(obj, "variant", "config", required=False)
    assert os_ is not None and arch is not None
    return ImageConfig(
        diff_ids=tuple(diff_ids), os=os_, architecture=arch, raw=obj, variant=variant or None
    )


# --- annotations helpers -----------------------------------------------------------------------


def toc_digest_of(desc: Descriptor) -> str | None:
    """The eStargz TOC digest annotation of a layer, validated, or None."""
    value = desc.annotations.get(TOC_DIGEST_ANNOTATION)
    if value is None:
        return None
    if not is_digest(value):
        raise FormatError(f"layer {desc.digest}: invalid {TOC_DIGEST_ANNOTATION} {value[:80]!r}")
    return value


def uncompressed_size_of(desc: Descriptor) -> int | None:
    """The eStargz uncompressed-size annotation of a layer, validated, or None."""
    value = desc.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise FormatError(
            f"layer {desc.digest}: invalid {UNCOMPRESSED_SIZE_ANNOTATION} {value[:40]!r}"
        )
    return int(value)


# --- platforms ---------------------------------------------------------------------------------

# platform.machine() values and GOARCH-style aliases -> (GOARCH, default variant)
_MACHINE_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),  # 32-bit userland on an ARMv8 CPU
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5l": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "mips64": ("mips64", None),
    "mips64el": ("mips64le", None),
    "loongarch64": ("loong64", None),
}

# Variants an image built for may run on a CPU of the wanted variant, best first. A manifest
# entry without any variant is accepted after these, as containers/image does.
_COMPATIBLE_VARIANTS: dict[str, tuple[str, ...]] = {
    "arm": ("v8", "v7", "v6", "v5"),
    "arm64": ("v9", "v8"),
    "amd64": ("v4", "v3", "v2", "v1"),
}


def normalize_platform(p: Platform) -> Platform:
    """Canonical spelling: lowercase, GOARCH names, arm64 => v8, arm => v7 when unspecified."""
    os_ = p.os.lower()
    arch = p.architecture.lower()
    variant = p.variant.lower() if p.variant else None
    if arch in _MACHINE_ARCH:
        arch, default_variant = _MACHINE_ARCH[arch]
        # "armhf"/"armel" carry their variant in the name; it only fills a missing one.
        variant = variant or default_variant
    if variant and variant[0].isdigit():
        variant = "v" + variant  # "7" -> "v7", as containerd normalises
    if arch == "arm64" and variant in (None, "v8.0"):
        variant = "v8"
    elif arch == "arm" and variant is None:
        variant = "v7"
    elif arch == "amd64" and variant == "v1":
        variant = None  # v1 is the baseline; images never need it spelled out
    return Platform(os_, arch, variant)


def host_platform() -> Platform:
    """The platform Podman would pull for on this machine (no --platform/--arch given)."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, None))
    return normalize_platform(Platform(_platform.system().lower() or "linux", arch, variant))


def _variant_preference(want: Platform) -> list[str | None]:
    chain = _COMPATIBLE_VARIANTS.get(want.architecture, ())
    if want.variant is not None and want.variant in chain:
        prefs: list[str | None] = list(chain[chain.index(want.variant) :])
    elif want.variant is not None:
        prefs = [want.variant]
    else:
        prefs = []
    if want.architecture == "amd64":
        prefs = [v for v in prefs if v != "v1"]
    prefs.append(None)
    return prefs


def choose_platform(index: Index, want: Platform) -> Descriptor:
    """Pick the index entry Podman would pick for *want*.

    Entries are ranked by how well their variant fits (exact, then older compatible variants,
    then "no variant"); within a rank the first entry in index order wins. Nested indexes and
    entries without a platform (e.g. attestations) are never chosen.
    """
    want = normalize_platform(want)
    candidates: list[tuple[Descriptor, Platform]] = [
        (d, normalize_platform(d.platform))
        for d in index.manifests
        if d.platform is not None and d.media_type not in INDEX_MEDIA_TYPES
    ]
    matching = [
        (d, p) for d, p in candidates if p.os == want.os and p.architecture == want.architecture
    ]
    for variant in _variant_preference(want):
        for d, p in matching:
            if p.variant == variant:
                return d
    # No variant requested: any variant of the right architecture will do (first in order).
    if want.variant is None and matching:
        return matching[0][0]
    available = ", ".join(sorted({str(p) for _, p in candidates})) or "none"
    raise NotFound(f"no manifest for platform {want} in index (available: {available})")
