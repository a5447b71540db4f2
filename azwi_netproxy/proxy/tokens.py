"""Value types shared by the exchange, the cache and the IMDS renderer.

Pure: no I/O. Times are epoch seconds (the IMDS wire uses them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol


class CacheKey(NamedTuple):
    """What makes two token requests interchangeable.

    `endpoint` is the authority host, or the identity-binding token proxy URL, so that a
    change of mode never serves a token obtained through the other.
    """

    endpoint: str
    tenant_id: str
    client_id: str
    scope: str


@dataclass(frozen=True, slots=True)
class Token:
    """An access token from Entra, with the times the IMDS answer is computed from."""

    access_token: str
    token_type: str
    issued_at: int
    expires_on: int
    ext_expires_on: int
    # When to renew in the background (Entra's refresh_in, else a share of the lifetime).
    refresh_on: int

    def __repr__(self) -> str:  # never let a token reach a log line through repr()
        return (
            f"Token(token_type={self.token_type!r}, issued_at={self.issued_at}, "
            f"expires_on={self.expires_on}, refresh_on={self.refresh_on})"
        )


class Clock(Protocol):
    def __call__(self) -> float: ...


class TokenFetcher(Protocol):
    async def __call__(self, key: CacheKey) -> Token: ...
