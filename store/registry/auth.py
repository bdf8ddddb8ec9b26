"""Registry authentication, sans-I/O: challenge parsing, token requests, token cache, credentials.

Nothing here talks to the network; `store.registry.client` does the HTTP and asks this module
what to send. This is the only module that handles secrets, and none of its objects shows one
in its repr (they end up in tracebacks and structlog events otherwise).

Flow (distribution "token authentication specification"): a request answered 401 carries
`WWW-Authenticate: Bearer realm="https://auth/token",service="registry",scope="repository:x:pull"`.
The client GETs `realm?service=..&scope=..` (with Basic credentials if it has any), receives
`{"token": ..., "expires_in": ...}` and repeats the request with `Authorization: Bearer <token>`.
A `Basic realm=".."` challenge instead asks for the credentials on every request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from store.errors import AuthError

#: Token lifetime when the token endpoint does not say (distribution token spec).
DEFAULT_TOKEN_TTL = 60.0

# --- WWW-Authenticate parsing (RFC 7235 §4.1) --------------------------------------------------

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Challenge:
    """One auth challenge. `scheme` is lowercased ("bearer", "basic"), as are param names."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def skip_ws_commas(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t,":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _TCHARS:
            self.i += 1
        return self.s[start : self.i]

    def quoted(self) -> str:
        assert self.s[self.i] == '"'
        self.i += 1
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                out.append(self.s[self.i + 1])
                self.i += 2
            elif c == '"':
                self.i += 1
                return "".join(out)
            else:
                out.append(c)
                self.i += 1
        raise AuthError("malformed WWW-Authenticate header: unterminated quoted string")

    def bare_value(self) -> str:
        # Lenient: an unquoted value runs to the next comma or blank, so a bare
        # realm=https://host/token (not a valid RFC token) still parses.
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in " \t,":
            self.i += 1
        return self.s[start : self.i]

    def at_param(self) -> bool:
        """True if the input continues with `name =` (an auth-param, not a new challenge)."""
        save = self.i
        try:
            if not self.token():
                return False
            self.skip_ws()
            if self.peek() != "=":
                return False
            # token68 ends in '=' padding followed by ',' or end, e.g. "Negotiate abc=="
            rest = self.s[self.i :].lstrip("=").lstrip(" \t")
            return not (rest == "" or rest.startswith(","))
        finally:
            self.i = save


def parse_www_authenticate_all(header: str) -> list[Challenge]:
    """All challenges in a WWW-Authenticate value, in order.

    Handles quoted values containing commas and escaped quotes, unquoted values, optional
    whitespace around `=`, several comma-separated challenges and token68 credentials.
    """
    sc = _Scanner(header)
    challenges: list[Challenge] = []
    sc.skip_ws_commas()
    while sc.i < len(sc.s):
        scheme = sc.token()
        if not scheme:
            raise AuthError(f"malformed WWW-Authenticate header at offset {sc.i}")
        params: dict[str, str] = {}
        sc.skip_ws()
        if sc.peek() not in ("", ",") and not sc.at_param():
            # token68 form: a single opaque value right after the scheme
            start = sc.i
            while sc.i < len(sc.s) and sc.s[sc.i] not in " \t,":
                sc.i += 1
            params["token68"] = sc.s[start : sc.i]
            sc.skip_ws()
        while True:
            save = sc.i
            sc.skip_ws_commas()
            if not sc.at_param():
                sc.i = save
                break
            name = sc.token().lower()
            sc.skip_ws()
            sc.i += 1  # the '='
            sc.skip_ws()
            value = sc.quoted() if sc.peek() == '"' else sc.bare_value()
            params[name] = value
            sc.skip_ws()
        challenges.append(Challenge(scheme.lower(), params))
        sc.skip_ws_commas()
    if not challenges:
        raise AuthError("empty WWW-Authenticate header")
    return challenges


def parse_www_authenticate(header: str) -> Challenge:
    """The challenge to answer: the Bearer one if offered, else the first."""
    challenges = parse_www_authenticate_all(header)
    for c in challenges:
        if c.scheme == "bearer":
            return c
    return challenges[0]


# --- token requests ----------------------------------------------------------------------------


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def token_request_params(challenge: Challenge, scope: str | None) -> tuple[str, dict[str, str]]:
    """URL and query parameters of the token request answering a Bearer *challenge*.

    *scope* is what we need (`repository:<repo>:pull`); if None, the challenge's own scope is
    used. The realm must be an absolute http(s) URL.
    """
    if challenge.scheme != "bearer":
        raise AuthError(f"cannot request a token for a {challenge.scheme!r} challenge")
    realm = challenge.realm
    if not realm:
        raise AuthError("Bearer challenge without realm")
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AuthError(f"Bearer realm is not an http(s) URL: {realm[:200]!r}")
    params: dict[str, str] = {}
    if challenge.params.get("service"):
        params["service"] = challenge.params["service"]
    scope = scope or challenge.params.get("scope")
    if scope:
        params["scope"] = scope
    return realm, params


def parse_token_response(body: bytes) -> tuple[str, float]:
    """(token, expires_in seconds) from a token endpoint's JSON answer."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthError("token endpoint answered with invalid JSON") from exc
    if not isinstance(obj, dict):
        raise AuthError("token endpoint answered with a non-object")
    # "access_token" is the OAuth2 spelling; distribution says both may appear, same value.
    token = obj.get("token") or obj.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError("token endpoint answer has no token")
    expires_in = obj.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_TOKEN_TTL
    return token, float(expires_in)


def bearer_header(token: str) -> str:
    return f"Bearer {token}"


def basic_header(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


# --- token cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(<redacted>, expires_at={self.expires_at:.1f})"


class TokenCache:
    """Bearer tokens keyed by (registry, scope), expiring after `expires_in`.

    Thread-safe. A token is treated as expired a little early (10 % of its lifetime, at most
    5 s) so a request is not sent with a token that dies in flight.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], Token] = {}

    def get(self, registry: str, scope: str) -> Token | None:
        with self._lock:
            tok = self._tokens.get((registry, scope))
            if tok is None:
                return None
            if tok.expires_at <= self._clock():
                del self._tokens[(registry, scope)]
                return None
            return tok

    def put(self, registry: str, scope: str, token: str, expires_in: float | None = None) -> Token:
        ttl = DEFAULT_TOKEN_TTL if expires_in is None or expires_in <= 0 else float(expires_in)
        now = self._clock()
        tok = Token(token, now + ttl - min(5.0, ttl / 10))
        with self._lock:
            # Drop expired entries so a long-running service does not accumulate them.
            for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[key]
            self._tokens[(registry, scope)] = tok
        return tok

    def invalidate(self, registry: str, scope: str) -> None:
        with self._lock:
            self._tokens.pop((registry, scope), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def __repr__(self) -> str:
        return f"TokenCache({len(self)} tokens)"


# --- credentials -------------------------------------------------------------------------------


class Credentials(Protocol):
    """Where usernames/passwords come from. A later issue adds auth.json / credential helpers;
    anything with this one method plugs into RegistryClient(credentials=...)."""

    def lookup(self, registry: str) -> tuple[str, str] | None: ...


class NoCredentials:
    """Anonymous access only (the default)."""

    def lookup(self, registry: str) -> tuple[str, str] | None:
        return None

    def __repr__(self) -> str:
        return "NoCredentials()"


class StaticCredentials:
    """Fixed (username, password) per registry host; for tests and simple configurations."""

    def __init__(self, entries: Mapping[str, tuple[str, str]]) -> None:
        self._entries = dict(entries)

    def lookup(self, registry: str) -> tuple[str, str] | None:
        return self._entries.get(registry)

    def __repr__(self) -> str:
        return f"StaticCredentials(registries={sorted(self._entries)!r})"
