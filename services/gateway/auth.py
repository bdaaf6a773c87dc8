"""Bearer-token authentication. Tokens are stored only as SHA-256 hashes (a file or an env variable),
so a leaked configuration does not leak a credential; a token is checked by
looking up its SHA-256 digest (timing cannot reveal a stored digest).

A hash line looks like ``sha256:<64 hex>``; ``wlcad serve token`` prints a new token and its hash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
from pathlib import Path

from services.core.errors import InputError

ENV_HASHES = "WLCAD_GATEWAY_TOKEN_HASHES"
_PREFIX = "sha256:"


def hash_token(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


class TokenSet:
    """The accepted token hashes."""

    def __init__(self, hashes: list[str]) -> None:
        parsed = []
        for number, line in enumerate(hashes, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            digest = line.removeprefix(_PREFIX)
            if (
                not line.startswith(_PREFIX)
                or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)
            ):
                raise InputError(f"entry {number} is not 'sha256:<64 lowercase hex>'", field="tokens")
            parsed.append(bytes.fromhex(digest))
        if not parsed:
            raise InputError("no token hashes given", field="tokens")
        self._digests = frozenset(parsed)

    @classmethod
    def load(cls, path: Path | None) -> TokenSet | None:
        """From ``path`` (one hash a line) and/or ``$WLCAD_GATEWAY_TOKEN_HASHES`` (comma-separated)."""
        lines: list[str] = []
        if path is not None:
            try:
                lines += Path(path).read_text().splitlines()
            except OSError as exc:
                raise InputError(f"cannot read the token file ({exc.strerror})", field="tokens-file") from exc
        lines += [h for h in os.environ.get(ENV_HASHES, "").split(",") if h.strip()]
        return cls(lines) if lines else None

    def check(self, authorization: str | None) -> bool:
        """True for ``Bearer <token>`` with an accepted token: one SHA-256 and one set lookup, so the
        cost does not grow with the number of tokens. Looking up the *digest* of the presented token
        leaks nothing by timing: a caller cannot steer the digest towards a stored one.

        The scheme is matched case-insensitively (RFC 7235 §2.1: ``bearer`` and ``BEARER`` are
        ``Bearer``); everything else stays strict: one space after the scheme, a non-empty token."""
        scheme, space, token = (authorization or "").partition(" ")
        if not space or scheme.lower() != "bearer" or not token.strip():
            return False
        return hashlib.sha256(token.strip().encode()).digest() in self._digests

    def check_metadata(self, metadata) -> bool:
        """:meth:`check` on the ``authorization`` entry of a gRPC call's invocation metadata."""
        return self.check(next((value for key, value in metadata or () if key == "authorization"), None))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
