"""The registry client against the fault proxy in front of the real registry, registries.conf
mirrors/rewrites in front of real registries, and auth.json credentials against htpasswd."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.errors import AuthError, Denied, DigestMismatch, NotFound, TransientRegistryError
from store.reference import Reference
from store.registry.client import RegistryClient
from store.registry.credentials import AuthFileCredentials, AuthPath
from store.registry.registries_conf import RegistriesConf, parse
from tests.harness.faultproxy import FaultProxy, Faults
from tests.harness.registry import LayerBlob, LocalRegistry, write_htpasswd

REPO = "faults/blob"
TAR = "application/vnd.oci.image.layer.v1.tar"
BLOB = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(scope="module")
def pushed(registry: LocalRegistry) -> str:
    img = registry.push_image(REPO, "v1", [LayerBlob(BLOB, TAR)])
    return img.manifest_digest


@pytest.fixture
def proxy(registry: LocalRegistry, pushed: str) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


def client(**kw: object) -> RegistryClient:
    opts: dict[str, object] = dict(
        deadline=15.0,
        read_timeout=3.0,
        connect_timeout=2.0,
        backoff_initial=0.01,
        backoff_max=0.05,
    )
    opts.update(kw)
    return RegistryClient(**opts)  # type: ignore[arg-type]


RANGES = [(0, 1000), (50_000, 70_000), (299_000, 1000)]


def read_all(c: RegistryClient, host: str) -> None:
    for off, ln in RANGES:
        assert c.read_range(host, REPO, DIGEST, off, ln) == BLOB[off : off + ln]
    out = io.BytesIO()
    assert c.download_blob(host, REPO, DIGEST, out, expected_size=len(BLOB)) == len(BLOB)
    assert out.getvalue() == BLOB


@pytest.mark.parametrize(
    "faults,stat",
    [
        (Faults(burst_5xx=2), "injected_5xx"),
        (Faults(reset_after=5000), "resets"),
        (Faults(slow_delay=0.002), "slow_pieces"),
        (Faults(ignore_range=True), "range_ignored"),
        (Faults(redirect_blobs=True), "redirected_requests"),
        (Faults(token_ttl=60), "token_requests"),
    ],
    ids=["5xx", "reset", "slow", "ignore-range", "redirect", "token"],
)
def test_fault_is_absorbed(proxy: FaultProxy, faults: Faults, stat: str) -> None:
    proxy.faults = faults
    with client() as c:
        read_all(c, proxy.host)
        ref = Reference.parse(f"{proxy.host}/{REPO}:v1")
        assert c.get_manifest(ref).digest
    assert proxy.stats[stat] > 0
    assert proxy.stats["auth_leaked_to_redirect"] == 0


def test_redirect_with_token_does_not_leak_authorization(proxy: FaultProxy) -> None:
    proxy.faults = Faults(redirect_blobs=True, token_ttl=60)
    with client() as c:
        read_all(c, proxy.host)
    assert proxy.stats["redirected_requests"] >= 4
    assert proxy.stats["auth_leaked_to_redirect"] == 0


def test_token_expiring_between_reads_is_renewed(proxy: FaultProxy) -> None:
    import time

    proxy.faults = Faults(token_ttl=1)
    with client() as c:
        assert c.read_range(proxy.host, REPO, DIGEST, 0, 10) == BLOB[:10]
        first = proxy.stats["token_requests"]
        time.sleep(1.2)  # not a timing assertion: lets the token expire on the proxy
        assert c.read_range(proxy.host, REPO, DIGEST, 10, 10) == BLOB[10:20]
    assert proxy.stats["token_requests"] > first


def test_flipped_byte_is_never_served(proxy: FaultProxy) -> None:
    proxy.faults = Faults(flip_byte=True)
    with client() as c:
        with pytest.raises(DigestMismatch):
            c.download_blob(proxy.host, REPO, DIGEST, io.BytesIO(), expected_size=len(BLOB))
        with pytest.raises(DigestMismatch):
            c.get_blob(proxy.host, REPO, DIGEST)
        proxy.faults = Faults()
        read_all(c, proxy.host)  # a later read works again
    assert proxy.stats["flipped"] >= 2


def test_permanent_5xx_fails_within_the_deadline(proxy: FaultProxy) -> None:
    proxy.faults = Faults(burst_5xx=1)  # every request
    with client(max_attempts=3) as c, pytest.raises(TransientRegistryError, match="gave up"):
        c.read_range(proxy.host, REPO, DIGEST, 0, 10)
    assert proxy.stats["injected_5xx"] == 3


# --- registries.conf against real registries -------------------------------------------------


@pytest.fixture(scope="module")
def empty_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    with LocalRegistry() as reg:
        reg.start(tmp_path_factory.mktemp("mirror"))
        yield reg


def test_mirror_lacking_blob_falls_through(
    registry: LocalRegistry, empty_mirror: LocalRegistry, pushed: str
) -> None:
    conf = RegistriesConf(
        parse(
            f'[[registry]]\nprefix = "origin.example/team"\nlocation = "{registry.host}/faults"\n'
            f'[[registry.mirror]]\nlocation = "{empty_mirror.host}/cache"\n'
        )
    )
    mark_m, mark_o = empty_mirror.mark(), registry.mark()
    with client(registries=conf) as c:
        ref = Reference.parse("origin.example/team/blob:v1")
        assert c.get_manifest(ref).digest == pushed
        for off, ln in RANGES:
            assert (
                c.read_range("origin.example", "team/blob", DIGEST, off, ln) == BLOB[off : off + ln]
            )
    mirror_paths = [e.path for e in empty_mirror.requests_since(mark_m)]
    assert "/v2/cache/blob/manifests/v1" in mirror_paths  # tried first (rewritten)
    assert [p for p in mirror_paths if "/blobs/" in p] == [f"/v2/cache/blob/blobs/{DIGEST}"]
    origin = registry.requests_since(mark_o)
    assert len([e for e in origin if e.status == 206 and e.path.endswith(DIGEST)]) == 3


def test_mirror_serves_when_it_has_the_content(
    registry: LocalRegistry, empty_mirror: LocalRegistry, pushed: str
) -> None:
    empty_mirror.push_image("copy/faults/blob", "v1", [LayerBlob(BLOB, TAR)])
    conf = RegistriesConf(
        parse(
            f'[[registry]]\nlocation = "{registry.host}"\n'
            f'[[registry.mirror]]\nlocation = "{empty_mirror.host}/copy"\n'
        )
    )
    mark_o = registry.mark()
    with client(registries=conf) as c:
        assert c.read_range(registry.host, REPO, DIGEST, 5, 5) == BLOB[5:10]
    assert not [e for e in registry.requests_since(mark_o) if DIGEST in e.path]


def test_blocked_and_not_found(registry: LocalRegistry, pushed: str) -> None:
    conf = RegistriesConf(
        parse(f'[[registry]]\nprefix = "{registry.host}/faults"\nblocked = true\n')
    )
    mark = registry.mark()
    with client(registries=conf) as c:
        with pytest.raises(Denied, match="blocked"):
            c.get_manifest(Reference.parse(f"{registry.host}/{REPO}:v1"))
        with pytest.raises(NotFound):
            c.get_manifest(Reference.parse(f"{registry.host}/other/repo:v1"))
    assert not [e for e in registry.requests_since(mark) if "/faults/" in e.path]


# --- credentials from auth files ------------------------------------------------------------


def _auth_file(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_auth_file_basic_against_htpasswd_registry(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", "alice", "s3cret")
    with LocalRegistry() as reg:
        reg.start(tmp_path / "reg", htpasswd=htpasswd, credentials=("alice", "s3cret"))
        blob = gzip.compress(b"private" * 100, mtime=0)
        img = reg.push_image("private/app", "v1", [LayerBlob(blob)])
        ref = Reference.parse(f"{reg.host}/private/app:v1")
        wrong = AuthFileCredentials(
            [AuthPath(_auth_file(tmp_path / "w.json", reg.host, "alice", "no"))]
        )
        with client(credentials=wrong) as c, pytest.raises(AuthError):
            c.get_manifest(ref)
        # a per-repository entry beats the (wrong) host entry
        f = tmp_path / "auth.json"
        f.write_text(
            json.dumps(
                {
                    "auths": {
                        reg.host: {"auth": base64.b64encode(b"alice:no").decode()},
                        f"{reg.host}/private": {"auth": base64.b64encode(b"alice:s3cret").decode()},
                    }
                }
            )
        )
        with client(credentials=AuthFileCredentials([AuthPath(f)])) as c:
            assert c.get_manifest(ref).digest == img.manifest_digest
            d = img.manifest["layers"][0]["digest"]
            assert c.read_range(reg.host, "private/app", d, 0, 10) == blob[:10]
            assert "s3cret" not in repr(c)


def test_auth_file_bearer_through_token_proxy(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.faults = Faults(token_ttl=60, token_users={"bob": "pw-bob"})
    with client() as anon, pytest.raises(AuthError):
        anon.read_range(proxy.host, REPO, DIGEST, 0, 10)
    creds = AuthFileCredentials(
        [AuthPath(_auth_file(tmp_path / "a.json", proxy.host, "bob", "pw-bob"))]
    )
    with client(credentials=creds) as c:
        read_all(c, proxy.host)
