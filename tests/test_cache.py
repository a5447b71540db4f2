"""TokenCache: single flight, refresh ahead, failure back-off and the LRU bound.

Name: test_cache
Scope: pure unit tests, one event loop per test.
Depends: azwi_netproxy.proxy.cache only; time is a FakeClock, Entra is a FakeFetcher.

No test sleeps for timing: fetches are held with an asyncio.Event and released when the
test says so, and `settle()` only lets already-runnable tasks take their turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from azwi_netproxy.errors import (
    BadRequest,
    IdentityRejected,
    NetproxyError,
    UpstreamError,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from azwi_netproxy.proxy.cache import STALE_SAFETY_S, CacheOutcome, TokenCache
from azwi_netproxy.proxy.tokens import CacheKey, Token

T0 = 1_700_000_000
LIFETIME_S = 3600
REFRESH_IN_S = 1800
MIN_REMAINING_S = 300.0
REFRESH_RETRY_S = 30.0
BACKOFF_S = 2.0

KEY = CacheKey(
    "https://login.microsoftonline.com/", "tenant", "client-a", "https://vault.azure.net/.default"
)
KEY_B = KEY._replace(client_id="client-b")


def key(n: int) -> CacheKey:
    return KEY._replace(client_id=f"client-{n}")


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = now


class FakeFetcher:
    """Entra stand-in: counts calls, issues numbered tokens, raises scripted errors.

    `gate`, when set, holds every fetch until the test sets it; `started` is set at each
    call so a test can wait until a fetch is really running.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[CacheKey] = []
        self.errors: list[BaseException] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.cancelled = 0
        self.lifetime_s = LIFETIME_S
        self.refresh_in_s = REFRESH_IN_S

    async def __call__(self, key: CacheKey) -> Token:
        self.calls.append(key)
        self.started.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.errors:
            raise self.errors.pop(0)
        issued = int(self.clock.now)
        return Token(
            access_token=f"secret-token-{key.client_id}-{len(self.calls)}",
            token_type="Bearer",
            issued_at=issued,
            expires_on=issued + self.lifetime_s,
            ext_expires_on=issued + self.lifetime_s,
            refresh_on=issued + self.refresh_in_s,
        )

    def hold(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        self.started.clear()
        return self.gate


async def settle() -> None:
    """Let every task that can run do so (a handful of loop turns, no wall-clock time)."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetcher(clock: FakeClock) -> FakeFetcher:
    return FakeFetcher(clock)


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
async def cache(
    fetcher: FakeFetcher, clock: FakeClock, events: list[str]
) -> AsyncIterator[TokenCache]:
    tc = TokenCache(
        fetcher,
        clock=clock,
        min_remaining_s=MIN_REMAINING_S,
        refresh_retry_s=REFRESH_RETRY_S,
        failure_backoff_s=BACKOFF_S,
        on_event=events.append,
    )
    yield tc
    await tc.aclose()


# ---- hits and misses ---------------------------------------------------------------


async def test_miss_fetches_once_then_hits_without_fetching(
    cache: TokenCache, fetcher: FakeFetcher, events: list[str]
) -> None:
    assert cache.peek(KEY) is None
    token, outcome = await cache.get(KEY)
    assert outcome is CacheOutcome.MISS
    assert fetcher.calls == [KEY]

    for _ in range(5):
        assert await cache.get(KEY) == (token, CacheOutcome.HIT)
        assert cache.peek(KEY) == (token, CacheOutcome.HIT)
    assert fetcher.calls == [KEY]
    assert events == ["miss"]  # hits are counted, not reported one call at a time
    assert cache.hits == 10
    assert len(cache) == 1


def test_can_be_built_before_the_loop_runs(fetcher: FakeFetcher) -> None:
    tc = TokenCache(fetcher)
    assert len(tc) == 0
    assert tc.peek(KEY) is None
    assert tc.earliest_expiry() is None


@pytest.mark.parametrize(
    ("elapsed_s", "expected"),
    [
        (0, CacheOutcome.HIT),
        (REFRESH_IN_S - 1, CacheOutcome.HIT),
        (REFRESH_IN_S, CacheOutcome.REFRESH),
        (LIFETIME_S - MIN_REMAINING_S - 1, CacheOutcome.REFRESH),
        (LIFETIME_S - MIN_REMAINING_S, None),
        (LIFETIME_S - 1, None),
        (LIFETIME_S + 100, None),
    ],
    ids=[
        "fresh",
        "just-before-refresh_on",
        "at-refresh_on",
        "301s-left",
        "300s-left-not-served",
        "1s-left",
        "expired",
    ],
)
async def test_peek_by_token_age(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    elapsed_s: float,
    expected: CacheOutcome | None,
) -> None:
    token, _ = await cache.get(KEY)
    fetcher.hold()  # a refresh started by peek stays pending: the answer is peek's own
    clock.advance(elapsed_s)
    served = cache.peek(KEY)
    if expected is None:
        assert served is None
    else:
        assert served == (token, expected)


async def test_token_near_expiry_is_replaced_by_get(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock
) -> None:
    fetcher.refresh_in_s = LIFETIME_S  # no refresh ahead: only min_remaining_s matters
    old, _ = await cache.get(KEY)
    clock.set(old.expires_on - MIN_REMAINING_S + 1)  # 299 s left

    assert cache.peek(KEY) is None
    new, outcome = await cache.get(KEY)
    assert outcome is CacheOutcome.MISS
    assert new.access_token != old.access_token
    assert new.expires_on - clock.now >= MIN_REMAINING_S
    assert len(fetcher.calls) == 2
    assert cache.peek(KEY) == (new, CacheOutcome.HIT)


# ---- single flight -----------------------------------------------------------------


async def test_hundred_concurrent_gets_share_one_fetch(
    cache: TokenCache, fetcher: FakeFetcher
) -> None:
    gate = fetcher.hold()
    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(100)]
    await fetcher.started.wait()
    await settle()
    assert not any(w.done() for w in waiters)
    assert len(fetcher.calls) == 1

    gate.set()
    results = await asyncio.gather(*waiters)

    assert len(fetcher.calls) == 1
    tokens = {token for token, _ in results}
    assert len(tokens) == 1
    assert {outcome for _, outcome in results} == {CacheOutcome.MISS}


async def test_different_keys_fetch_independently(cache: TokenCache, fetcher: FakeFetcher) -> None:
    gate = fetcher.hold()
    a = asyncio.create_task(cache.get(KEY))
    b = asyncio.create_task(cache.get(KEY_B))
    await settle()
    assert sorted(fetcher.calls) == sorted([KEY, KEY_B])  # both running at once

    gate.set()
    (token_a, outcome_a), (token_b, outcome_b) = await asyncio.gather(a, b)
    assert outcome_a is outcome_b is CacheOutcome.MISS
    assert "client-a" in token_a.access_token
    assert "client-b" in token_b.access_token
    assert len(cache) == 2


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    cache: TokenCache, fetcher: FakeFetcher
) -> None:
    gate = fetcher.hold()
    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(3)]
    await fetcher.started.wait()

    waiters[0].cancel()
    await settle()
    assert waiters[0].cancelled()
    assert fetcher.cancelled == 0

    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert fetcher.cancelled == 0
    assert len(fetcher.calls) == 1
    assert results[0] == results[1]
    assert results[0][1] is CacheOutcome.MISS


async def test_fetch_completes_and_is_cached_when_every_waiter_left(
    cache: TokenCache, fetcher: FakeFetcher
) -> None:
    gate = fetcher.hold()
    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(3)]
    await fetcher.started.wait()
    for w in waiters:
        w.cancel()
    await settle()
    assert all(w.cancelled() for w in waiters)

    gate.set()
    await settle()
    served = cache.peek(KEY)
    assert served is not None
    assert served[1] is CacheOutcome.HIT
    assert len(fetcher.calls) == 1


# ---- refresh ahead -----------------------------------------------------------------


async def test_refresh_ahead_runs_one_background_fetch(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, events: list[str]
) -> None:
    old, _ = await cache.get(KEY)
    gate = fetcher.hold()
    clock.set(old.refresh_on + 1)

    for _ in range(5):
        assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
        assert await cache.get(KEY) == (old, CacheOutcome.REFRESH)
    await fetcher.started.wait()
    await settle()
    assert len(fetcher.calls) == 2  # the first get() and exactly one refresh

    gate.set()
    await settle()
    served = cache.peek(KEY)
    assert served is not None
    new, outcome = served
    assert outcome is CacheOutcome.HIT
    assert new.access_token != old.access_token
    assert new.issued_at == clock.now
    assert len(fetcher.calls) == 2
    assert events == ["miss"] + ["refresh"] * 10
    assert cache.hits == 1


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("entra down"),
        IdentityRejected("AADSTS700016", entra_error="unauthorized_client"),
    ],
    ids=["transient", "permanent"],
)
async def test_failed_refresh_keeps_old_token_and_waits_before_retrying(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    events: list[str],
    caplog: pytest.LogCaptureFixture,
    error: NetproxyError,
) -> None:
    old, _ = await cache.get(KEY)
    fetcher.errors.append(error)
    clock.set(old.refresh_on)

    with caplog.at_level(logging.WARNING, logger="azwi_netproxy.proxy.cache"):
        assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
        await settle()
    assert len(fetcher.calls) == 2
    assert events.count("refresh_failed") == 1
    [record] = caplog.records
    assert record.getMessage() == "background token refresh failed; serving the cached token"
    assert record.__dict__["client_id"] == "client-a"
    assert record.__dict__["error_type"] == type(error).__name__
    assert "secret-token" not in repr(record.__dict__)

    # Within refresh_retry_s: the old token is served and nothing is fetched.
    for elapsed in (0.0, 1.0, REFRESH_RETRY_S - 0.5):
        clock.set(old.refresh_on + elapsed)
        assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
        await settle()
    assert len(fetcher.calls) == 2

    clock.set(old.refresh_on + REFRESH_RETRY_S)
    assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
    await settle()
    assert len(fetcher.calls) == 3
    served = cache.peek(KEY)
    assert served is not None
    assert served[1] is CacheOutcome.HIT
    assert served[0].access_token != old.access_token


async def test_get_joins_a_running_background_refresh(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock
) -> None:
    old, _ = await cache.get(KEY)
    gate = fetcher.hold()
    clock.set(old.refresh_on)
    assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
    await fetcher.started.wait()

    # The refresh is slow; meanwhile the old token drops under min_remaining_s.
    clock.set(old.expires_on - MIN_REMAINING_S)
    waiter = asyncio.create_task(cache.get(KEY))
    await settle()
    assert not waiter.done()
    gate.set()
    new, outcome = await waiter
    assert outcome is CacheOutcome.MISS
    assert new.access_token != old.access_token
    assert len(fetcher.calls) == 2


# ---- failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "seconds_left", "stale"),
    [
        (UpstreamError("bad gateway"), 100, True),
        (UpstreamThrottled("throttled", retry_after_s=5), 100, True),
        (UpstreamUnavailable("unreachable"), STALE_SAFETY_S + 1, True),
        (UpstreamUnavailable("unreachable"), STALE_SAFETY_S, False),
        (UpstreamUnavailable("unreachable"), -10, False),
        (IdentityRejected("AADSTS70021", entra_error="invalid_client"), 100, False),
        (BadRequest("bad scope"), 100, False),
        (RuntimeError("a bug in fetch"), 100, False),
    ],
    ids=[
        "upstream-error-stale",
        "throttled-stale",
        "31s-left-stale",
        "30s-left-raises",
        "expired-raises",
        "permanent-raises-despite-valid-token",
        "bad-request-raises",
        "unexpected-raises",
    ],
)
async def test_failure_with_cached_token(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    events: list[str],
    error: Exception,
    seconds_left: float,
    stale: bool,
) -> None:
    old, _ = await cache.get(KEY)
    fetcher.errors.append(error)
    clock.set(old.expires_on - seconds_left)

    if stale:
        assert await cache.get(KEY) == (old, CacheOutcome.STALE)
        assert events[-1] == "stale"
    else:
        with pytest.raises(type(error)) as excinfo:
            await cache.get(KEY)
        assert excinfo.value is error
    assert len(fetcher.calls) == 2


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable("entra down"), IdentityRejected("AADSTS700016")],
    ids=["transient", "permanent"],
)
async def test_failure_backoff_then_fetch_again(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, error: NetproxyError
) -> None:
    fetcher.errors.append(error)
    with pytest.raises(type(error)):
        await cache.get(KEY)
    assert len(fetcher.calls) == 1

    for elapsed in (0.0, 1.0, BACKOFF_S - 0.01):
        clock.set(T0 + elapsed)
        with pytest.raises(type(error)) as excinfo:
            await cache.get(KEY)
        assert excinfo.value is error
    assert len(fetcher.calls) == 1

    clock.set(T0 + BACKOFF_S)
    token, outcome = await cache.get(KEY)
    assert outcome is CacheOutcome.MISS
    assert len(fetcher.calls) == 2
    assert await cache.get(KEY) == (token, CacheOutcome.HIT)


async def test_failure_is_raised_to_every_waiter_of_the_shared_fetch(
    cache: TokenCache, fetcher: FakeFetcher
) -> None:
    gate = fetcher.hold()
    error = UpstreamThrottled("throttled", retry_after_s=7)
    fetcher.errors.append(error)
    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(10)]
    await fetcher.started.wait()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(r is error for r in results)
    assert len(fetcher.calls) == 1
    assert len(cache) == 0  # failures are never cached as tokens


async def test_backoff_serves_stale_for_transient_failure(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock
) -> None:
    old, _ = await cache.get(KEY)
    fetcher.errors.append(UpstreamUnavailable("down"))
    clock.set(old.expires_on - 100)
    assert await cache.get(KEY) == (old, CacheOutcome.STALE)
    clock.advance(BACKOFF_S / 2)
    assert await cache.get(KEY) == (old, CacheOutcome.STALE)
    assert len(fetcher.calls) == 2


async def test_reraising_from_backoff_does_not_grow_the_traceback(
    cache: TokenCache, fetcher: FakeFetcher
) -> None:
    fetcher.errors.append(UpstreamUnavailable("down"))
    depths = []
    for _ in range(20):
        with pytest.raises(UpstreamUnavailable) as excinfo:
            await cache.get(KEY)
        depths.append(len(excinfo.traceback))
    assert max(depths[1:]) == min(depths[1:])


# ---- LRU bound, metrics, shutdown --------------------------------------------------


async def test_lru_evicts_least_recently_used(
    fetcher: FakeFetcher, clock: FakeClock, events: list[str]
) -> None:
    cache = TokenCache(fetcher, clock=clock, max_entries=3, on_event=events.append)
    for n in (1, 2, 3):
        await cache.get(key(n))
    assert cache.peek(key(1)) is not None  # 1 is now the most recently used; 2 the least

    await cache.get(key(4))
    assert len(cache) == 3
    assert events.count("evict") == 1
    assert cache.peek(key(2)) is None
    for n in (1, 3, 4):
        assert cache.peek(key(n)) is not None

    await cache.get(key(5))  # the loop above touched 1 first: it is the least recent now
    assert cache.peek(key(1)) is None
    assert events.count("evict") == 2
    assert len(fetcher.calls) == 5


async def test_asking_again_for_the_last_key_keeps_lru_order_and_sees_every_new_token(
    fetcher: FakeFetcher, clock: FakeClock, events: list[str]
) -> None:
    # peek() answers the key it served last without a lookup or an LRU touch: that must
    # not let it serve a replaced token, nor keep a key that another touch made older.
    cache = TokenCache(
        fetcher, clock=clock, max_entries=2, min_remaining_s=MIN_REMAINING_S,
        refresh_retry_s=REFRESH_RETRY_S, failure_backoff_s=BACKOFF_S, on_event=events.append,
    )
    first, second, third = key(1), key(2), key(3)
    old, _ = await cache.get(first)
    await cache.get(second)
    for _ in range(3):  # once through the lookup, then as the key served last
        assert cache.peek(first) == (old, CacheOutcome.HIT)
    await cache.get(third)  # second is the least recently used, not first
    assert cache.peek(second) is None
    assert cache.peek(first) == (old, CacheOutcome.HIT)
    assert cache.hits == 4

    clock.set(old.refresh_on)
    assert cache.peek(first) == (old, CacheOutcome.REFRESH)
    await settle()  # the background refresh stored a new token for first
    served = cache.peek(first)
    assert served is not None
    new, outcome = served
    assert (new.access_token, outcome) == ("secret-token-client-1-4", CacheOutcome.HIT)
    assert cache.peek(first) == (new, CacheOutcome.HIT)

    clock.set(new.expires_on - MIN_REMAINING_S)  # too little left, even for the last key
    assert cache.peek(first) is None
    await cache.aclose()


async def test_peek_judges_by_the_reading_it_is_given(cache: TokenCache, clock: FakeClock) -> None:
    token, _ = await cache.get(KEY)
    assert cache.peek(KEY, token.refresh_on - 1) == (token, CacheOutcome.HIT)
    assert cache.peek(KEY, token.expires_on - MIN_REMAINING_S) is None
    assert cache.peek(KEY) == (token, CacheOutcome.HIT)  # the clock itself has not moved
    assert cache.clock is clock


async def test_earliest_expiry(cache: TokenCache, clock: FakeClock) -> None:
    assert cache.earliest_expiry() is None
    await cache.get(KEY)
    clock.advance(100)
    await cache.get(KEY_B)
    assert cache.earliest_expiry() == T0 + LIFETIME_S


async def test_aclose_cancels_background_refresh(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock
) -> None:
    old, _ = await cache.get(KEY)
    fetcher.hold()
    clock.set(old.refresh_on)
    assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
    await fetcher.started.wait()

    await cache.aclose()
    assert fetcher.cancelled == 1
    # No new background work once closed; the cached token is still served.
    assert cache.peek(KEY) == (old, CacheOutcome.REFRESH)
    await settle()
    assert len(fetcher.calls) == 2


async def test_aclose_cancels_a_foreground_fetch(cache: TokenCache, fetcher: FakeFetcher) -> None:
    fetcher.hold()
    waiter = asyncio.create_task(cache.get(KEY))
    await fetcher.started.wait()
    await cache.aclose()
    assert fetcher.cancelled == 1
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(cache) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_entries": 0},
        {"min_remaining_s": -1.0},
        {"refresh_retry_s": -1.0},
        {"failure_backoff_s": -1.0},
    ],
    ids=["no-entries", "negative-min-remaining", "negative-retry", "negative-backoff"],
)
def test_rejects_nonsense_settings(fetcher: FakeFetcher, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenCache(fetcher, **kwargs)  # type: ignore[arg-type]
