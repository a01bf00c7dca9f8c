"""Rate limits: one atomic Redis script per admission, shared by every API replica.

A request spends from its credential's budget (an API key's; all the account's JWTs share one)
and, when its account sets one, from the account's shared budget: every budget must admit it or
none is charged. Four limits per budget (a credential's: its own values, its account's defaults,
then the settings' defaults; the shared budget's: only what it sets): requests, input tokens and
output tokens per minute, and requests in flight. The three rates are GCRA
(a token bucket stored as one "theoretical arrival time" per dimension): each unit costs
`60 s / limit`, and a full bucket holds `rate_limit_burst_s` seconds of it (60: a whole minute's
limit, as Anthropic's token bucket). A request larger than a whole bucket is admitted only when
its bucket is full, and then leaves it in debt, so a key is never locked out for good. In-flight
requests are a sorted set of request ids scored by lease expiry, so a replica that dies without
releasing its slots frees them when the lease runs out.

The script checks every dimension of every budget and writes only if all pass (all or
nothing), with Redis's own clock so replicas with skewed clocks agree. Redis unreachable or
slow: 529 overloaded_error, never unlimited traffic.
"""

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from api.errors import OverloadedError, RateLimitError
from api.ratelimit_script import LUA, LUA_SHA
from api.settings import ApiSettings

log = logging.getLogger("abl.ratelimit")

HEADER_PREFIX = "anthropic-ratelimit-"
# Concurrency has no refill time to wait for; a second is a polite first guess.
CONCURRENCY_RETRY_MS = 1000
# How long a slot outlives the request timeout when its release never arrives.
LEASE_MARGIN_S = 60
# 2025-01-01T00:00:00Z: the script's times count from here (never change it: state depends on it).
CLOCK_EPOCH_MS = 1_735_689_600_000


@dataclass(frozen=True)
class Limits:
    """Effective limits of one budget; every one is set (defaults fill the gaps)."""

    requests_per_minute: int
    input_tokens_per_minute: int
    output_tokens_per_minute: int
    concurrent_requests: int

    @classmethod
    def resolve(cls, configured: Mapping[str, Any] | None, settings: ApiSettings) -> "Limits":
        """A credential's limits (account defaults merged with key overrides), else defaults."""
        return cls._with_defaults(
            configured,
            settings.default_requests_per_minute,
            settings.default_input_tokens_per_minute,
            settings.default_output_tokens_per_minute,
            settings.default_concurrent_requests,
        )

    @classmethod
    def shared(cls, configured: Mapping[str, Any]) -> "Limits":
        """An account's shared budget: what it leaves unset is not limited by it."""
        return cls._with_defaults(configured, UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED)

    @classmethod
    def _with_defaults(
        cls, configured: Mapping[str, Any] | None, rpm: int, itpm: int, otpm: int, slots: int
    ) -> "Limits":
        given = configured or {}

        def pick(name: str, default: int) -> int:
            value = given.get(name)
            return value if isinstance(value, int) and value > 0 else default

        return cls(
            requests_per_minute=pick("requests_per_minute", rpm),
            input_tokens_per_minute=pick("input_tokens_per_minute", itpm),
            output_tokens_per_minute=pick("output_tokens_per_minute", otpm),
            concurrent_requests=pick("concurrent_requests", slots),
        )


# A dimension an account's shared budget leaves unset: never the one that refuses.
UNLIMITED = 10**12


@dataclass(frozen=True)
class Budget:
    """One set of buckets: a credential's own (an API key's, or all the account's JWTs'
    together), or the budget every credential of the account shares."""

    account_id: str
    # The key id, "jwt", or "shared".
    name: str
    limits: Limits

    @property
    def shared(self) -> bool:
        return self.name == SHARED

    def redis_keys(self) -> list[str]:
        # The account id is the hash tag: one admission's keys sit in one Redis Cluster slot.
        stem = f"abl:rl:{{{self.account_id}}}:{self.name}"
        return [f"{stem}:rates", f"{stem}:inflight"]


SHARED = "shared"


@dataclass(frozen=True)
class Cost:
    """What one request takes from each rate (negative: given back)."""

    requests: int
    input_tokens: int
    output_tokens: int


# Bits of the script's `blocked` answer for one budget.
BLOCKED_REQUESTS, BLOCKED_INPUT, BLOCKED_OUTPUT, BLOCKED_IN_FLIGHT = 1, 2, 4, 8
_BITS_PER_BUDGET = 4


@dataclass(frozen=True)
class Bucket:
    """One rate as reported: the per-minute limit, units left now, when it is full again."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class BudgetState:
    """One budget as the script left it: which of its limits refused (0: none), and its rates."""

    budget: Budget
    blocked: int
    in_flight: int
    requests: Bucket
    input_tokens: Bucket
    output_tokens: Bucket


@dataclass(frozen=True)
class Decision:
    """What the script answered for every budget of a request."""

    retry_after_ms: int
    now_ms: int
    states: tuple[BudgetState, ...]

    @property
    def allowed(self) -> bool:
        return all(state.blocked == 0 for state in self.states)

    def headers(self) -> dict[str, str]:
        """`anthropic-ratelimit-*` of the budget with the least left, per family; `tokens` is
        input plus output (no combined limit exists)."""

        def tightest(family: str) -> Bucket:
            buckets: list[Bucket] = [getattr(state, family) for state in self.states]
            return min(buckets, key=lambda bucket: bucket.remaining)

        input_tokens, output_tokens = tightest("input_tokens"), tightest("output_tokens")
        tokens = Bucket(
            input_tokens.limit + output_tokens.limit,
            input_tokens.remaining + output_tokens.remaining,
            max(input_tokens.reset_ms, output_tokens.reset_ms),
        )
        out: dict[str, str] = {}
        for name, bucket in (
            ("requests", tightest("requests")),
            ("tokens", tokens),
            ("input-tokens", input_tokens),
            ("output-tokens", output_tokens),
        ):
            out[f"{HEADER_PREFIX}{name}-limit"] = str(bucket.limit)
            out[f"{HEADER_PREFIX}{name}-remaining"] = str(bucket.remaining)
            out[f"{HEADER_PREFIX}{name}-reset"] = rfc3339_ms(bucket.reset_ms)
        return out

    def retry_after_s(self) -> int:
        """Whole seconds, rounded up: a client that waits this long is not refused again."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


def rfc3339_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC, rounded up to the second: `2026-01-01T00:00:01Z`."""
    moment = datetime.fromtimestamp(math.ceil(epoch_ms / 1000), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_reply(reply: list[Any], budgets: Sequence[Budget]) -> Decision:
    """The script's flat integer reply as a Decision."""
    values = [int(v) for v in reply]
    blocked, wait, now = values[:3]
    states = []
    for b, budget in enumerate(budgets):
        at = 3 + 7 * b
        limits = budget.limits
        per_minute = (
            limits.requests_per_minute,
            limits.input_tokens_per_minute,
            limits.output_tokens_per_minute,
        )
        buckets = [
            Bucket(limit, values[at + 1 + 2 * i], values[at + 2 + 2 * i])
            for i, limit in enumerate(per_minute)
        ]
        bits = (blocked >> (_BITS_PER_BUDGET * b)) & 0b1111
        states.append(BudgetState(budget, bits, values[at], *buckets))
    return Decision(wait, now, tuple(states))


def rate_limit_message(decision: Decision) -> str:
    """Which limits refused the request, and when to come back."""
    reasons = []
    for state in decision.states:
        limits = state.budget.limits
        whose = "your account's shared" if state.budget.shared else "your"
        if state.blocked & BLOCKED_REQUESTS:
            reasons.append(
                f"Number of requests has exceeded {whose} rate limit of"
                f" {limits.requests_per_minute} per minute"
            )
        if state.blocked & BLOCKED_INPUT:
            reasons.append(
                f"Number of input tokens has exceeded {whose} rate limit of"
                f" {limits.input_tokens_per_minute} per minute"
            )
        if state.blocked & BLOCKED_OUTPUT:
            reasons.append(
                "Number of output tokens (counted as max_tokens until a request ends) has"
                f" exceeded {whose} rate limit of {limits.output_tokens_per_minute} per minute"
            )
        if state.blocked & BLOCKED_IN_FLIGHT:
            reasons.append(
                f"Number of concurrent requests has exceeded {whose} limit of"
                f" {limits.concurrent_requests}"
            )
    return "; ".join(reasons) + f". Retry after {decision.retry_after_s()} s."


@dataclass(frozen=True)
class Ticket:
    """One admitted request's claim: what to give back and which slots to free."""

    budgets: tuple[Budget, ...]
    request_id: str
    cost: Cost


class RateLimiter:
    """Runs the script against the platform's Redis; cheap to construct per request."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: ApiSettings,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        # None: Redis's own clock, the same for every replica. Tests pass a fake one.
        self.clock_ms = clock_ms

    async def acquire(
        self, budgets: Sequence[Budget], cost: Cost, request_id: str
    ) -> tuple[Ticket, Decision]:
        """Take `cost` and a slot from every budget, or raise RateLimitError (429) carrying
        the headers."""
        decision = await self._run("acquire", budgets, cost, request_id)
        self._raise_if_refused(decision)
        return Ticket(tuple(budgets), request_id, cost), decision

    async def spend(self, budgets: Sequence[Budget], cost: Cost) -> Decision:
        """Take `cost` from every budget without a slot (nothing stays in flight), or 429."""
        decision = await self._run("spend", budgets, cost, "")
        self._raise_if_refused(decision)
        return decision

    async def release(self, ticket: Ticket, refund: Cost) -> Decision:
        """Free the ticket's slots and give `refund` back to the rates."""
        negative = Cost(-refund.requests, -refund.input_tokens, -refund.output_tokens)
        return await self._run("release", ticket.budgets, negative, ticket.request_id)

    async def peek(self, budgets: Sequence[Budget]) -> Decision:
        """The current state, changing nothing."""
        return await self._run("peek", budgets, Cost(0, 0, 0), "")

    @staticmethod
    def _raise_if_refused(decision: Decision) -> None:
        if not decision.allowed:
            raise RateLimitError(
                rate_limit_message(decision),
                retry_after=decision.retry_after_s(),
                headers=decision.headers(),
            )

    async def _run(
        self, mode: str, budgets: Sequence[Budget], cost: Cost, request_id: str
    ) -> Decision:
        burst_s = self.settings.rate_limit_burst_s
        lease_ms = int((self.settings.request_timeout_s + LEASE_MARGIN_S) * 1000)
        keys = [key for budget in budgets for key in budget.redis_keys()]
        args: list[str | int | float] = [
            mode,
            burst_s * 1000,
            request_id,
            lease_ms,
            "" if self.clock_ms is None else self.clock_ms(),
            CONCURRENCY_RETRY_MS,
            CLOCK_EPOCH_MS,
            cost.requests,
            cost.input_tokens,
            cost.output_tokens,
        ]
        for budget in budgets:
            limits = budget.limits
            args += [
                limits.concurrent_requests,
                limits.requests_per_minute,
                limits.input_tokens_per_minute,
                limits.output_tokens_per_minute,
            ]
        try:
            async with asyncio.timeout(self.settings.rate_limit_timeout_s):
                reply = await self._eval(keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("rate limiter unavailable (%s): refusing the request", exc)
            raise OverloadedError(
                "the rate limiter is unavailable; retry shortly", retry_after=1
            ) from exc
        return parse_reply(reply, budgets)

    async def _eval(self, keys: list[str], args: list[str | int | float]) -> list[Any]:
        try:
            reply = await self.redis.evalsha(LUA_SHA, len(keys), *keys, *args)
        except NoScriptError:
            reply = await self.redis.eval(LUA, len(keys), *keys, *args)
        return list(reply)
