"""store.registry.push against a real docker-registry: uploads, mounts, manifests, auth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from store.errors import AuthError
from store.registry import RegistryClient, StaticCredentials
from store.registry.push import Pusher
from tests.harness.registry import LocalRegistry, sha256_digest, write_htpasswd


@pytest.fixture
def client() -> RegistryClient:
    c = RegistryClient(deadline=60.0)
    yield c
    c.close()


def _blob(tmp_path: Path, data: bytes) -> tuple[str, Path]:
    path = tmp_path / sha256_digest(data)[7:]
    path.write_bytes(data)
    return sha256_digest(data), path


def _get(registry: LocalRegistry, path: str) -> requests.Response:
    return requests.get(registry.url + path, timeout=30)


def test_monolithic_upload_then_exists(registry: LocalRegistry, client, tmp_path) -> None:
    data = os.urandom(100_000)
    digest, path = _blob(tmp_path, data)
    pusher = Pusher(client)
    assert not pusher.blob_exists(registry.host, "push/mono", digest)
    mark = registry.mark()
    assert pusher.push_blob(registry.host, "push/mono", digest, path) == "uploaded"
    methods = [e.method for e in registry.requests_since(mark)]
    assert "PATCH" not in methods and methods.count("PUT") == 1
    assert pusher.push_blob(registry.host, "push/mono", digest, path) == "exists"
    assert _get(registry, f"/v2/push/mono/blobs/{digest}").content == data


def test_chunked_upload(registry: LocalRegistry, client, tmp_path) -> None:
    data = os.urandom(20_000)
    digest, path = _blob(tmp_path, data)
    pusher = Pusher(client, chunked_threshold=1000, patch_size=4096)
    mark = registry.mark()
    assert pusher.push_blob(registry.host, "push/chunked", digest, path) == "uploaded"
    patches = [e for e in registry.requests_since(mark) if e.method == "PATCH"]
    assert len(patches) == 5 and all(e.status == 202 for e in patches)
    assert _get(registry, f"/v2/push/chunked/blobs/{digest}").content == data


def test_cross_repository_mount(registry: LocalRegistry, client, tmp_path) -> None:
    data = os.urandom(50_000)
    digest, path = _blob(tmp_path, data)
    pusher = Pusher(client)
    pusher.push_blob(registry.host, "push/origin", digest, path)
    mark = registry.mark()
    how = pusher.push_blob(registry.host, "push/other", digest, path, mount_from="push/origin")
    assert how == "mounted"
    entries = registry.requests_since(mark)
    assert [e.status for e in entries if e.method == "POST" and "mount=" in e.path] == [201]
    assert not [e for e in entries if e.method in ("PUT", "PATCH")]
    assert _get(registry, f"/v2/push/other/blobs/{digest}").content == data


def test_mount_from_a_repo_without_the_blob_falls_back(
    registry: LocalRegistry, client, tmp_path
) -> None:
    data = os.urandom(1000)
    digest, path = _blob(tmp_path, data)
    how = Pusher(client).push_blob(
        registry.host, "push/fallback", digest, path, mount_from="push/nothing-here"
    )
    assert how == "uploaded"
    assert _get(registry, f"/v2/push/fallback/blobs/{digest}").content == data


def test_put_manifest(registry: LocalRegistry, client, tmp_path) -> None:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    digest, path = _blob(tmp_path, config)
    pusher = Pusher(client)
    pusher.push_blob(registry.host, "push/manifest", digest, path)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest, "size": len(config)},
        "layers": [],
    }).encode()
    got = pusher.put_manifest(registry.host, "push/manifest", "v1", manifest,
                              "application/vnd.oci.image.manifest.v1+json")
    assert got == sha256_digest(manifest)
    r = requests.get(registry.url + "/v2/push/manifest/manifests/v1", timeout=30,
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.content == manifest


def test_auth_required_and_credentials(tmp_path: Path) -> None:
    try:
        htpasswd = write_htpasswd(tmp_path / "htpasswd", "alice", "secret")
    except (ImportError, RuntimeError) as exc:  # crypt without bcrypt: fail loudly, no skip
        pytest.fail(f"cannot write an htpasswd file here: {exc}")
    data = b"authenticated blob"
    digest, path = _blob(tmp_path, data)
    with LocalRegistry().start(tmp_path / "reg", htpasswd=htpasswd,
                               credentials=("alice", "secret")) as reg:
        with RegistryClient() as anonymous, pytest.raises(AuthError):
            Pusher(anonymous).push_blob(reg.host, "push/auth", digest, path)
        wrong = StaticCredentials({reg.host: ("alice", "wrong")})
        with RegistryClient(credentials=wrong) as c, pytest.raises(AuthError):
            Pusher(c).push_blob(reg.host, "push/auth", digest, path)
        right = StaticCredentials({reg.host: ("alice", "secret")})
        with RegistryClient(credentials=right) as c:
            assert Pusher(c).push_blob(reg.host, "push/auth", digest, path) == "uploaded"
        r = requests.get(f"{reg.url}/v2/push/auth/blobs/{digest}", auth=("alice", "secret"),
                         timeout=30)
        assert r.content == data
