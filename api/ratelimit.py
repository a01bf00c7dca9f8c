"""Per-key rate limits: one atomic Redis script per admission, shared by every API replica.

Four limits per key (account defaults, per-key overrides, then the settings' defaults): requests,
input tokens and output tokens per minute, and requests in flight. The three rates are GCRA
(a token bucket stored as one "theoretical arrival time" per dimension): each unit costs
`60 s / limit`, and a full bucket holds `rate_limit_burst_s` seconds of it (60: a whole minute's
limit, as Anthropic's token bucket). A request larger than a whole bucket is admitted only when
its bucket is full, and then leaves it in debt, so a key is never locked out for good. In-flight
requests are a sorted set of request ids scored by lease expiry, so a replica that dies without
releasing its slots frees them when the lease runs out.

The script checks every dimension and writes only if all pass (all or nothing), with Redis's
own clock so replicas with skewed clocks agree. Redis unreachable or slow: 529 overloaded_error,
never unlimited traffic.
"""

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from api.errors import OverloadedError, RateLimitError
from api.settings import ApiSettings

log = logging.getLogger("abl.ratelimit")

HEADER_PREFIX = "anthropic-ratelimit-"
# Concurrency has no refill time to wait for; a second is a polite first guess.
CONCURRENCY_RETRY_MS = 1000
# How long a slot outlives the request timeout when its release never arrives.
LEASE_MARGIN_S = 60
# 2025-01-01T00:00:00Z: the script's times count from here (never change it: state depends on it).
CLOCK_EPOCH_MS = 1_735_689_600_000

# KEYS[1]: hash of theoretical arrival times (ms) per rate dimension; KEYS[2]: zset of
# in-flight request ids scored by lease expiry (ms).
# ARGV: mode (acquire | release | peek), burst (ms), request id, lease (ms), concurrency limit,
# clock override (ms, "" = Redis TIME), then limit and cost for requests, input, output, the
# concurrency retry (ms) and the epoch (ms). Times are kept relative to the epoch so that
# doubles stay precise to a few nanoseconds, far below one unit of any limit.
# Release passes negative costs (a refund) and frees the request's slot.
# Returns: blocked (bits: 1 requests, 2 input, 4 output, 8 in flight; 0 = admitted), wait (ms),
# now (ms), in flight, then remaining and reset (ms) per dimension.
_LUA = """
local epoch = tonumber(ARGV[14])
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
now = now - epoch
local mode, burst, rid = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local lease, max_inflight = tonumber(ARGV[4]), tonumber(ARGV[5])
local fields = {'requests', 'input', 'output'}
local stored = redis.call('HMGET', KEYS[1], 'requests', 'input', 'output')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local inflight = redis.call('ZCARD', KEYS[2])
local blocked, wait = 0, 0
local interval, current, after = {}, {}, {}
for i = 1, 3 do
  local limit, cost = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  interval[i] = 60000 / limit
  current[i] = math.max(tonumber(stored[i]) or now, now)
  after[i] = current[i] + cost * interval[i]
  -- A full bucket (current == now) admits any single request, leaving it in debt.
  if mode == 'acquire' and after[i] - now > burst and current[i] > now then
    blocked = blocked + 2 ^ (i - 1)
    wait = math.max(wait, math.min(after[i] - burst, current[i]) - now)
  end
end
if mode == 'acquire' and inflight >= max_inflight then
  blocked = blocked + 8
  wait = math.max(wait, tonumber(ARGV[13]))
end
local state = current
if blocked == 0 and mode ~= 'peek' then
  state = after
  local horizon = 0
  for i = 1, 3 do
    redis.call('HSET', KEYS[1], fields[i], string.format('%.3f', after[i]))
    horizon = math.max(horizon, after[i] - now)
  end
  redis.call('PEXPIRE', KEYS[1], math.floor(horizon) + 1000)
  if mode == 'acquire' then
    redis.call('ZADD', KEYS[2], now + lease, rid)
    redis.call('PEXPIRE', KEYS[2], lease + 1000)
    inflight = inflight + 1
  else
    inflight = inflight - redis.call('ZREM', KEYS[2], rid)
  end
end
local out = {blocked, math.ceil(wait), now + epoch, inflight}
for i = 1, 3 do
  local level = (burst - (math.max(state[i], now) - now)) / interval[i]
  out[#out + 1] = math.max(0, math.floor(level + 1e-3))
  out[#out + 1] = math.ceil(math.max(state[i], now)) + epoch
end
return out
"""
_LUA_SHA = hashlib.sha1(_LUA.encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """Effective limits of one key; every one is set (defaults fill the gaps)."""

    requests_per_minute: int
    input_tokens_per_minute: int
    output_tokens_per_minute: int
    concurrent_requests: int

    @classmethod
    def resolve(cls, configured: Mapping[str, Any] | None, settings: ApiSettings) -> "Limits":
        """The configured limits (account defaults merged with key overrides), else defaults."""
        given = configured or {}

        def pick(name: str, default: int) -> int:
            value = given.get(name)
            return value if isinstance(value, int) and value > 0 else default

        return cls(
            requests_per_minute=pick("requests_per_minute", settings.default_requests_per_minute),
            input_tokens_per_minute=pick(
                "input_tokens_per_minute", settings.default_input_tokens_per_minute
            ),
            output_tokens_per_minute=pick(
                "output_tokens_per_minute", settings.default_output_tokens_per_minute
            ),
            concurrent_requests=pick("concurrent_requests", settings.default_concurrent_requests),
        )


@dataclass(frozen=True)
class Cost:
    """What one request takes from each rate (negative: given back)."""

    requests: int
    input_tokens: int
    output_tokens: int


# Bits of the script's `blocked` answer.
BLOCKED_REQUESTS, BLOCKED_INPUT, BLOCKED_OUTPUT, BLOCKED_IN_FLIGHT = 1, 2, 4, 8


@dataclass(frozen=True)
class Bucket:
    """One rate as reported: the per-minute limit, units left now, when it is full again."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Decision:
    """What the script answered: which limits refused (none: admitted), and the state."""

    blocked: int
    retry_after_ms: int
    now_ms: int
    in_flight: int
    requests: Bucket
    input_tokens: Bucket
    output_tokens: Bucket

    @property
    def allowed(self) -> bool:
        return self.blocked == 0

    def headers(self) -> dict[str, str]:
        """`anthropic-ratelimit-*`; `tokens` is input plus output (no combined limit exists)."""
        tokens = Bucket(
            self.input_tokens.limit + self.output_tokens.limit,
            self.input_tokens.remaining + self.output_tokens.remaining,
            max(self.input_tokens.reset_ms, self.output_tokens.reset_ms),
        )
        out: dict[str, str] = {}
        for name, bucket in (
            ("requests", self.requests),
            ("tokens", tokens),
            ("input-tokens", self.input_tokens),
            ("output-tokens", self.output_tokens),
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


def parse_reply(reply: list[Any], limits: Limits) -> Decision:
    """The script's flat integer reply as a Decision."""
    values = [int(v) for v in reply]
    blocked, wait, now, in_flight = values[:4]
    per_minute = (
        limits.requests_per_minute,
        limits.input_tokens_per_minute,
        limits.output_tokens_per_minute,
    )
    buckets = [
        Bucket(limit, values[4 + 2 * i], values[5 + 2 * i]) for i, limit in enumerate(per_minute)
    ]
    return Decision(blocked, wait, now, in_flight, *buckets)


def rate_limit_message(decision: Decision, limits: Limits) -> str:
    """Which limits refused the request, and when to come back."""
    reasons = []
    if decision.blocked & BLOCKED_REQUESTS:
        reasons.append(
            "Number of requests has exceeded your rate limit of"
            f" {limits.requests_per_minute} per minute"
        )
    if decision.blocked & BLOCKED_INPUT:
        reasons.append(
            "Number of input tokens has exceeded your rate limit of"
            f" {limits.input_tokens_per_minute} per minute"
        )
    if decision.blocked & BLOCKED_OUTPUT:
        reasons.append(
            "Number of output tokens (counted as max_tokens until a request ends) has exceeded"
            f" your rate limit of {limits.output_tokens_per_minute} per minute"
        )
    if decision.blocked & BLOCKED_IN_FLIGHT:
        reasons.append(
            f"Number of concurrent requests has exceeded your limit of {limits.concurrent_requests}"
        )
    return "; ".join(reasons) + f". Retry after {decision.retry_after_s()} s."


@dataclass(frozen=True)
class Ticket:
    """One admitted request's claim: what to give back and which slot to free."""

    subject: str
    request_id: str
    limits: Limits
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
        self, subject: str, limits: Limits, cost: Cost, request_id: str
    ) -> tuple[Ticket, Decision]:
        """Take `cost` and a slot, or raise RateLimitError (429) carrying the headers."""
        decision = await self._run("acquire", subject, limits, cost, request_id)
        if not decision.allowed:
            raise RateLimitError(
                rate_limit_message(decision, limits),
                retry_after=decision.retry_after_s(),
                headers=decision.headers(),
            )
        return Ticket(subject, request_id, limits, cost), decision

    async def release(self, ticket: Ticket, refund: Cost) -> Decision:
        """Free the ticket's slot and give `refund` back to the rates."""
        negative = Cost(-refund.requests, -refund.input_tokens, -refund.output_tokens)
        return await self._run(
            "release", ticket.subject, ticket.limits, negative, ticket.request_id
        )

    async def peek(self, subject: str, limits: Limits) -> Decision:
        """The current state, changing nothing."""
        return await self._run("peek", subject, limits, Cost(0, 0, 0), "")

    async def _run(
        self,
        mode: str,
        subject: str,
        limits: Limits,
        cost: Cost,
        request_id: str,
    ) -> Decision:
        burst_s = self.settings.rate_limit_burst_s
        lease_ms = int((self.settings.request_timeout_s + LEASE_MARGIN_S) * 1000)
        keys = [f"abl:rl:{{{subject}}}:rates", f"abl:rl:{{{subject}}}:inflight"]
        args: list[str | int | float] = [
            mode,
            burst_s * 1000,
            request_id,
            lease_ms,
            limits.concurrent_requests,
            "" if self.clock_ms is None else self.clock_ms(),
            limits.requests_per_minute,
            cost.requests,
            limits.input_tokens_per_minute,
            cost.input_tokens,
            limits.output_tokens_per_minute,
            cost.output_tokens,
            CONCURRENCY_RETRY_MS,
            CLOCK_EPOCH_MS,
        ]
        try:
            async with asyncio.timeout(self.settings.rate_limit_timeout_s):
                reply = await self._eval(keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("rate limiter unavailable (%s): refusing the request", exc)
            raise OverloadedError(
                "the rate limiter is unavailable; retry shortly", retry_after=1
            ) from exc
        return parse_reply(reply, limits)

    async def _eval(self, keys: list[str], args: list[str | int | float]) -> list[Any]:
        try:
            reply = await self.redis.evalsha(_LUA_SHA, len(keys), *keys, *args)
        except NoScriptError:
            reply = await self.redis.eval(_LUA, len(keys), *keys, *args)
        return list(reply)
