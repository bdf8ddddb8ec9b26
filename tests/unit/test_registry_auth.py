from __future__ import annotations

import pytest

from store.errors import AuthError
from store.registry.auth import (
    Challenge,
    NoCredentials,
    StaticCredentials,
    Token,
    TokenCache,
    basic_header,
    parse_token_response,
    parse_www_authenticate,
    parse_www_authenticate_all,
    pull_scope,
    token_request_params,
)

# Header values as registries send them (Docker Hub, GHCR, distribution htpasswd, Quay, ECR).
DOCKER_HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)
GHCR = 'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"'
DISTRIBUTION_BASIC = 'Basic realm="layerstore-test"'
ECR = 'Basic realm="https://123456789012.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com"'
PUSH_PULL = (
    'Bearer realm="https://auth.example/token", service="reg.example", '
    'scope="repository:a/b:pull,push", error="insufficient_scope"'
)


def test_docker_hub_challenge() -> None:
    c = parse_www_authenticate(DOCKER_HUB)
    assert c == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/alpine:pull",
        },
    )
    assert c.realm == "https://auth.docker.io/token"


def test_ghcr_and_basic_challenges() -> None:
    assert parse_www_authenticate(GHCR).params["service"] == "ghcr.io"
    assert parse_www_authenticate(DISTRIBUTION_BASIC) == Challenge(
        "basic", {"realm": "layerstore-test"}
    )
    ecr = parse_www_authenticate(ECR)
    assert ecr.scheme == "basic"
    assert ecr.params["service"] == "ecr.amazonaws.com"


def test_quoted_value_with_commas_and_spaces() -> None:
    c = parse_www_authenticate(PUSH_PULL)
    assert c.params["scope"] == "repository:a/b:pull,push"
    assert c.params["error"] == "insufficient_scope"
    assert c.params["service"] == "reg.example"


def test_escaped_quotes_case_and_whitespace() -> None:
    c = parse_www_authenticate('BEARER  Realm = "https://x/t?a=\\"b\\"" ,Service=svc')
    assert c.scheme == "bearer"
    assert c.params == {"realm": 'https://x/t?a="b"', "service": "svc"}


def test_unquoted_url_value() -> None:
    c = parse_www_authenticate("Bearer realm=https://auth.example/token,service=reg")
    assert c.params == {"realm": "https://auth.example/token", "service": "reg"}


def test_multiple_challenges_bearer_preferred() -> None:
    header = 'Basic realm="r1", Bearer realm="https://a/t",service="s" , Negotiate'
    all_ = parse_www_authenticate_all(header)
    assert [c.scheme for c in all_] == ["basic", "bearer", "negotiate"]
    assert all_[1].params == {"realm": "https://a/t", "service": "s"}
    assert parse_www_authenticate(header).scheme == "bearer"


def test_token68() -> None:
    all_ = parse_www_authenticate_all('Negotiate abc123==, Basic realm="x"')
    assert all_[0] == Challenge("negotiate", {"token68": "abc123=="})
    assert all_[1] == Challenge("basic", {"realm": "x"})


@pytest.mark.parametrize("header", ["", "  ,  ", 'Bearer realm="unterminated', '"quoted"'])
def test_malformed_challenges(header: str) -> None:
    with pytest.raises(AuthError):
        parse_www_authenticate(header)


def test_token_request_params() -> None:
    c = parse_www_authenticate(DOCKER_HUB)
    url, params = token_request_params(c, pull_scope("library/busybox"))
    assert url == "https://auth.docker.io/token"
    assert params == {"service": "registry.docker.io", "scope": "repository:library/busybox:pull"}
    # without a scope of our own, the challenge's scope is used
    assert token_request_params(c, None)[1]["scope"] == "repository:library/alpine:pull"
    # no service param -> none sent
    url, params = token_request_params(Challenge("bearer", {"realm": "http://127.0.0.1:1/t"}), "s")
    assert params == {"scope": "s"}


@pytest.mark.parametrize(
    "challenge",
    [
        Challenge("basic", {"realm": "https://x"}),
        Challenge("bearer", {}),
        Challenge("bearer", {"realm": "ftp://x/token"}),
        Challenge("bearer", {"realm": "/relative/token"}),
    ],
)
def test_token_request_params_refused(challenge: Challenge) -> None:
    with pytest.raises(AuthError):
        token_request_params(challenge, "repository:x:pull")


def test_parse_token_response() -> None:
    assert parse_token_response(b'{"token": "t1", "expires_in": 300}') == ("t1", 300.0)
    assert parse_token_response(b'{"access_token": "t2"}') == ("t2", 60.0)
    # distribution sends both spellings with the same value
    assert parse_token_response(b'{"token": "t3", "access_token": "t3", "expires_in": 0}') == (
        "t3",
        60.0,
    )
    for bad in (b"nope", b"[]", b"{}", b'{"token": ""}', b'{"token": 5}'):
        with pytest.raises(AuthError):
            parse_token_response(bad)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_cache_expiry() -> None:
    clock = FakeClock()
    cache = TokenCache(clock)
    cache.put("r", "repository:a:pull", "tok-a", 300)
    cache.put("r", "repository:b:pull", "tok-b")  # default 60 s
    assert cache.get("r", "repository:a:pull").value == "tok-a"  # type: ignore[union-attr]
    assert cache.get("other", "repository:a:pull") is None
    clock.now += 53  # default TTL 60 s minus a 6 s safety margin
    assert cache.get("r", "repository:b:pull") is not None
    clock.now += 2
    assert cache.get("r", "repository:b:pull") is None
    assert cache.get("r", "repository:a:pull") is not None
    clock.now += 300
    assert cache.get("r", "repository:a:pull") is None
    assert len(cache) == 0


def test_token_cache_invalidate_and_purge() -> None:
    clock = FakeClock()
    cache = TokenCache(clock)
    cache.put("r", "s1", "t1", 10)
    cache.put("r", "s2", "t2", 100)
    cache.invalidate("r", "s2")
    assert cache.get("r", "s2") is None
    clock.now += 50
    cache.put("r", "s3", "t3", 100)  # put purges the expired s1 entry
    assert len(cache) == 1


def test_secrets_not_in_repr() -> None:
    tok = Token("super-secret-token", 5.0)
    assert "super-secret" not in repr(tok)
    cache = TokenCache()
    cache.put("r", "s", "super-secret-token", 60)
    assert "super-secret" not in repr(cache)
    creds = StaticCredentials({"reg.example": ("alice", "hunter2")})
    assert "hunter2" not in repr(creds)
    assert "alice" not in repr(creds)
    assert creds.lookup("reg.example") == ("alice", "hunter2")
    assert creds.lookup("other") is None
    assert NoCredentials().lookup("reg.example") is None


def test_basic_header() -> None:
    assert basic_header("aladdin", "opensesame") == "Basic YWxhZGRpbjpvcGVuc2VzYW1l"
