"""The token cache: one Entra exchange per identity and scope, shared by every request.

What this module owns:

1. A bounded LRU of `Token`s keyed by `CacheKey`. `peek()` is the synchronous hot path
   (one dict lookup, one clock call, one LRU touch) and never serves a token with less
   than `min_remaining_s` left.
2. Single flight: at most one fetch per key is running at any time, whether a request
   is waiting for it (`get()`) or it refreshes ahead in the background (`peek()` past
   `refresh_on`). The fetch is its own task; waiters `await asyncio.shield(task)` so a
   client that disconnects cannot cancel the exchange the others wait for.
3. What a failure means: a transient one (`UpstreamError`) with a still-valid token
   cached serves that token as STALE; anything else is raised to every waiter. A failure
   is remembered for `failure_backoff_s` only (so a burst of requests cannot turn into a
   burst of exchanges) and is never cached as if it were a token.

What it must not know: HTTP, IMDS, Entra, httpx, files. It calls an async `fetch(key)`
and reads a `clock()`; both are injected, so tests drive time and failures directly.
Times are epoch seconds, as in `Token`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from azwi_netproxy.errors import NetproxyError, UpstreamError
from azwi_netproxy.proxy.tokens import CacheKey, Clock, Token, TokenFetcher

log = logging.getLogger(__name__)

# A STALE token must still be usable by the app when it reaches it: keep this margin for
# the hop to the app and clock skew between this node and the resource server.
STALE_SAFETY_S: Final = 30.0


class CacheOutcome(enum.StrEnum):
    HIT = "hit"  # served from cache, no I/O
    MISS = "miss"  # fetched (this caller waited for an exchange, possibly shared)
    REFRESH = "refresh"  # served from cache and a background refresh was started
    STALE = "stale"  # the exchange failed transiently; a still-valid cached token was served


# Read on every hit: a module global is a dict lookup, an enum member an attribute
# lookup through the enum's metaclass.
_HIT: Final = CacheOutcome.HIT


@dataclass(frozen=True, slots=True)
class _Failure:
    until: float
    error: BaseException
    # Kept apart because every raise of a shared exception instance grows its
    # __traceback__; re-raising with the original one is what asyncio.Future does too.
    traceback: TracebackType | None


class TokenCache:
    """Single-flight, refresh-ahead cache of Entra tokens in front of an async `fetch`.

    `on_event`, when given, is called with the outcome's value each time a token is
    served ("miss", "refresh", "stale"), and with "evict" and "refresh_failed". Hits are
    counted in `hits` instead: a call per hit cost as much as the lookup itself.
    """

    def __init__(
        self,
        fetch: TokenFetcher,
        *,
        clock: Clock = time.time,
        max_entries: int = 1024,
        min_remaining_s: float = 300.0,
        refresh_retry_s: float = 30.0,
        failure_backoff_s: float = 2.0,
        on_event: Callable[[str], None] | None = None,
        log_extra: Mapping[str, object] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if min_remaining_s < 0 or refresh_retry_s < 0 or failure_backoff_s < 0:
            raise ValueError("durations must not be negative")
        self._fetch = fetch
        self._clock = clock
        self._max_entries = max_entries
        self._min_remaining_s = min_remaining_s
        self._refresh_retry_s = refresh_retry_s
        self._failure_backoff_s = failure_backoff_s
        self._on_event = on_event
        # Fields every log line of this cache carries (node mode: the pod's name).
        self._log_extra = dict(log_extra or {})
        self._entries: OrderedDict[CacheKey, Token] = OrderedDict()
        # The one running fetch per key, background or not (single flight across both).
        self._inflight: dict[CacheKey, asyncio.Task[Token]] = {}
        # Insertion order is expiry order (constant back-off, re-inserted on each failure),
        # which lets _remember_failure drop expired entries from the front.
        self._failures: dict[CacheKey, _Failure] = {}
        self._refresh_not_before: dict[CacheKey, float] = {}
        self._tasks: set[asyncio.Task[Token]] = set()
        self._closed = False
        self.hits = 0

    @property
    def clock(self) -> Clock:
        """The clock every expiry is judged by; a reading of it may be passed to peek()."""
        return self._clock

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: CacheKey, now: float | None = None) -> tuple[Token, CacheOutcome] | None:
        """The cached token for `key` if it may be served now, else None (then await get()).

        `now`, when given, is a reading of `clock` the caller already took.
        Past the token's `refresh_on` this starts a background refresh (one per key, not
        again within `refresh_retry_s` of a failed one) and answers REFRESH.
        Must be called from the event loop's thread while it runs.
        """
        token = self._entries.get(key)
        if token is None:
            return None
        if now is None:
            now = self._clock()
        if now >= token.expires_on - self._min_remaining_s:
            return None
        self._entries.move_to_end(key)
        if now < token.refresh_on:
            self.hits += 1
            return token, _HIT
        if not self._closed and key not in self._inflight:
            not_before = self._refresh_not_before.get(key)
            if not_before is None or now >= not_before:
                self._spawn(key, background=True)
        if self._on_event is not None:
            self._on_event("refresh")
        return token, CacheOutcome.REFRESH

    async def get(self, key: CacheKey) -> tuple[Token, CacheOutcome]:
        """The token for `key`: from the cache, else from the one shared fetch.

        Raises:
            NetproxyError: what the fetch raised (also re-raised without fetching while
                the failure's back-off lasts), unless it was an `UpstreamError` and a
                cached token still has more than STALE_SAFETY_S left: that one is
                served as STALE instead.
        """
        served = self.peek(key)
        if served is not None:
            return served
        failure = self._failures.get(key)
        if failure is not None:
            if self._clock() < failure.until:
                return self._stale_or_raise(key, failure.error.with_traceback(failure.traceback))
            del self._failures[key]
        task = self._inflight.get(key)
        if task is None:
            task = self._spawn(key, background=False)
        try:
            token = await asyncio.shield(task)
        except NetproxyError as exc:
            return self._stale_or_raise(key, exc)
        if self._on_event is not None:
            self._on_event("miss")
        return token, CacheOutcome.MISS

    def earliest_expiry(self) -> float | None:
        """The smallest `expires_on` among cached tokens (for a metric), None when empty."""
        earliest = min((token.expires_on for token in self._entries.values()), default=None)
        return None if earliest is None else float(earliest)

    async def aclose(self) -> None:
        """Cancel the running fetches and refreshes, and wait until they have ended."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, key: CacheKey, *, background: bool) -> asyncio.Task[Token]:
        task = asyncio.create_task(
            self._run_fetch(key, background=background), name="azwi-netproxy token fetch"
        )
        self._inflight[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._fetch_done(key, done))
        return task

    def _fetch_done(self, key: CacheKey, task: asyncio.Task[Token]) -> None:
        self._tasks.discard(task)
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # A background refresh nobody joined would otherwise log "exception never retrieved".
        if not task.cancelled():
            task.exception()

    async def _run_fetch(self, key: CacheKey, *, background: bool) -> Token:
        try:
            token = await self._fetch(key)
        except Exception as exc:
            now = self._clock()
            self._remember_failure(key, exc, now)
            if background:
                self._refresh_not_before[key] = now + self._refresh_retry_s
                self._log_refresh_failure(key, exc)
                if self._on_event is not None:
                    self._on_event("refresh_failed")
            raise
        self._store(key, token)
        return token

    def _store(self, key: CacheKey, token: Token) -> None:
        self._entries[key] = token
        self._entries.move_to_end(key)
        self._failures.pop(key, None)
        self._refresh_not_before.pop(key, None)
        while len(self._entries) > self._max_entries:
            evicted, _ = self._entries.popitem(last=False)
            self._refresh_not_before.pop(evicted, None)
            if self._on_event is not None:
                self._on_event("evict")

    def _remember_failure(self, key: CacheKey, exc: Exception, now: float) -> None:
        self._failures.pop(key, None)
        # Many distinct failing keys (an app asking for resources that do not exist) must
        # not grow this without bound: drop expired failures, then the oldest.
        while self._failures:
            oldest_key, oldest = next(iter(self._failures.items()))
            if now < oldest.until and len(self._failures) < self._max_entries:
                break
            del self._failures[oldest_key]
        self._failures[key] = _Failure(now + self._failure_backoff_s, exc, exc.__traceback__)

    def _stale_or_raise(self, key: CacheKey, exc: BaseException) -> tuple[Token, CacheOutcome]:
        token = self._entries.get(key)
        if (
            isinstance(exc, UpstreamError)
            and token is not None
            and self._clock() < token.expires_on - STALE_SAFETY_S
        ):
            if self._on_event is not None:
                self._on_event("stale")
            return token, CacheOutcome.STALE
        raise exc

    def _log_refresh_failure(self, key: CacheKey, exc: Exception) -> None:
        extra: dict[str, object] = {
            **self._log_extra,
            "tenant_id": key.tenant_id,
            "client_id": key.client_id,
            "scope": key.scope,
            "error_type": type(exc).__name__,
            "retry_in_s": self._refresh_retry_s,
        }
        # Only our own public error texts are known to hold nothing sensitive.
        if isinstance(exc, NetproxyError) and exc.public:
            extra["error_description"] = str(exc)
        log.warning("background token refresh failed; serving the cached token", extra=extra)
