import pytest

from store.errors import ReferenceError_
from store.reference import Reference

D = "sha256:" + "1" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("127.0.0.1:5000/big:esgz", "127.0.0.1:5000", "big", "esgz", None),
        ("localhost/a/b", "localhost", "a/b", "latest", None),
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("quay.io/org/img@" + D, "quay.io", "org/img", None, D),
        ("reg.example:443/x:v1@" + D, "reg.example:443", "x", "v1", D),
    ],
)
def test_parse(text: str, registry: str, repo: str, tag: str | None, digest: str | None) -> None:
    r = Reference.parse(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert r.manifest_ref == (digest or tag)


def test_round_trip_of_fully_qualified() -> None:
    for text in ["127.0.0.1:5000/big:esgz", "quay.io/org/img@" + D]:
        assert str(Reference.parse(text)) == text


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a b", "x@sha256:12", "reg:5000/:tag", "x:"])
def test_rejects(bad: str) -> None:
    with pytest.raises(ReferenceError_):
        Reference.parse(bad)
