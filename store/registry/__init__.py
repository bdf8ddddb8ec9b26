"""Registry access: the distribution API client and its (sans-I/O) authentication helpers."""

from __future__ import annotations

from store.registry.auth import (
    Challenge,
    Credentials,
    NoCredentials,
    StaticCredentials,
    TokenCache,
    parse_www_authenticate,
    parse_www_authenticate_all,
    token_request_params,
)
from store.registry.client import FetchedManifest, RegistryClient

__all__ = [
    "Challenge",
    "Credentials",
    "FetchedManifest",
    "NoCredentials",
    "RegistryClient",
    "StaticCredentials",
    "TokenCache",
    "parse_www_authenticate",
    "parse_www_authenticate_all",
    "token_request_params",
]
