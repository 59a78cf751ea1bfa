"""API keys: who is calling, which models they may use, and their limits.

Every configured key is kept as the SHA-256 digest of its secret, never as the secret: a
presented key is hashed once and its digest compared with `hmac.compare_digest` against
every configured digest (no early exit), so the comparison takes the same time whichever
key matches, if any. A key is known everywhere else (logs, metrics, `/v1/usage`) by its
`name`; plain `auth.api_keys` are named `api_keys[0]`, `api_keys[1]`..., admin keys
`admin_keys[0]`...

`inferbridge keys hash` and `inferbridge keys new NAME` (cli.py) use `digest_line` and
`new_key` so a config file can hold digests instead of secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from inferbridge.config import AuthConfig
from inferbridge.config_source import ConfigError
from inferbridge.errors import AuthenticationFailed

DIGEST_PREFIX = "sha256:"
IDENTITY = "api_key"
"""Where the gate leaves the caller's `Identity` in the ASGI scope's `state`."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The key a request was made with (never its secret)."""

    name: str
    models: frozenset[str] | None = None
    """Models and aliases this key may use (None: all)."""
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    expires_at: float | None = None
    """Unix time after which the key is refused."""
    admin: bool = False

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel)

    def allows(self, name: str, resolved: str | None = None) -> bool:
        """May this key use model `name` (which resolves to model `resolved`)?"""
        models = self.models
        return models is None or name in models or (resolved is not None and resolved in models)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def stored_digest(value: str) -> bytes:
    """A configured key as a digest: `sha256:<hex>` as given, anything else hashed."""
    if value.startswith(DIGEST_PREFIX):
        hexdigest = value[len(DIGEST_PREFIX) :].strip()
        try:
            raw = bytes.fromhex(hexdigest)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError(
                "invalid configuration:\n  auth: a 'sha256:' key must be followed by 64 hex "
                "digits (inferbridge keys hash prints one)"
            )
        return raw
    return digest(value)


class KeyRing:
    """The keys in force and their identities."""

    def __init__(self, auth: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self._now = clock
        entries: list[tuple[bytes, Identity]] = []
        if auth.enabled:
            for i, key in enumerate(auth.api_keys):
                entries.append((stored_digest(key), Identity(f"api_keys[{i}]")))
            for entry in auth.named_keys:
                secret = (
                    bytes.fromhex(entry.key_sha256)
                    if entry.key_sha256
                    else stored_digest(entry.key or "")
                )
                expires = entry.expires_at
                if expires is not None and expires.tzinfo is None:
                    expires = expires.replace(tzinfo=UTC)
                identity = Identity(
                    entry.name,
                    frozenset(entry.models) if entry.models is not None else None,
                    entry.rpm,
                    entry.tpm,
                    entry.max_parallel,
                    expires.timestamp() if expires is not None else None,
                )
                entries.append((secret, identity))
            for i, key in enumerate(auth.admin_keys):
                entries.append((stored_digest(key), Identity(f"admin_keys[{i}]", admin=True)))
        seen: dict[bytes, str] = {}
        for secret, identity in entries:
            if secret in seen:
                raise ConfigError(
                    f"invalid configuration:\n  auth: keys '{seen[secret]}' and "
                    f"'{identity.name}' have the same secret"
                )
            seen[secret] = identity.name
        self._entries = entries

    @property
    def required(self) -> bool:
        return bool(self._entries)

    @property
    def identities(self) -> list[Identity]:
        return [identity for _, identity in self._entries]

    def authenticate(self, presented: str | None) -> Identity:
        """The identity of `presented`; AuthenticationFailed (401) when it is missing,
        wrong or expired. The message never repeats the key."""
        if not presented:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY' "
                "(or in an 'x-api-key' header)."
            )
        candidate = digest(presented)
        found: Identity | None = None
        for secret, identity in self._entries:  # every digest, whichever matches
            if hmac.compare_digest(candidate, secret):
                found = identity
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if found.expires_at is not None and self._now() >= found.expires_at:
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return found


# -- the `inferbridge keys` command ---------------------------------------------------------
def digest_line(secret: str) -> str:
    """The config line that stands for `secret` without holding it."""
    return f"key_sha256: {hashlib.sha256(secret.encode()).hexdigest()}"


def new_key(name: str) -> tuple[str, str]:
    """A fresh random key and its `auth.keys` entry (one YAML line, the digest only)."""
    key = "sk-ib-" + secrets.token_urlsafe(32)
    line = f"- {{name: {json.dumps(name)}, key_sha256: {hashlib.sha256(key.encode()).hexdigest()}}}"
    return key, line
