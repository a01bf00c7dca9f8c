"""Failed admin authentications, counted per client address in Redis (shared by replicas).

After `admin_auth_max_failures` wrong admin tokens from one address within
`admin_auth_window_s`, every admin request from that address gets a 429 (with retry-after)
until the window ends, whatever token it carries: answering a right token while refusing
wrong ones would let a guesser go on at full speed. A success clears the address's count.
Only wrong tokens count: no token at all, or an API key / account JWT (403), guesses nothing.
Redis unreachable: the count is skipped (logged), and the token check alone decides, so
operators keep the admin API during a Redis outage.
"""

import logging
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import RateLimitError
from api.settings import ApiSettings

log = logging.getLogger("abl.admin")


class AdminThrottle(Protocol):
    async def check(self, address: str) -> int:
        """The failures counted for `address`; RateLimitError (429) while it is over them."""

    async def failed(self, address: str) -> None:
        """Count one failed authentication from `address`."""

    async def succeeded(self, address: str) -> None:
        """Forget `address`'s failures."""


class RedisAdminThrottle:
    """A fixed window per address: the first failure starts it, its key expires with it."""

    def __init__(self, redis: aioredis.Redis, settings: ApiSettings) -> None:
        self.redis = redis
        self.max_failures = settings.admin_auth_max_failures
        self.window_ms = settings.admin_auth_window_s * 1000

    @staticmethod
    def _key(address: str) -> str:
        return f"abl:admin-auth-failures:{address}"

    async def check(self, address: str) -> int:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._key(address))
                pipe.pttl(self._key(address))
                count, ttl_ms = await pipe.execute()
        except RedisError as exc:
            log.warning("admin throttle unavailable (%s): not counting failures", exc)
            return 0
        failures = int(count or 0)
        if failures >= self.max_failures:
            retry_after = max(1, -(-int(ttl_ms) // 1000))
            raise RateLimitError(
                f"too many failed admin authentications from {address}; retry after"
                f" {retry_after} s",
                retry_after=retry_after,
            )
        return failures

    async def failed(self, address: str) -> None:
        key = self._key(address)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, px=self.window_ms, nx=True)
                pipe.incr(key)
                await pipe.execute()
        except RedisError as exc:
            log.warning(
                "admin throttle unavailable (%s): failure from %s not counted", exc, address
            )
            return
        log.warning("failed admin authentication from %s", address)

    async def succeeded(self, address: str) -> None:
        try:
            await self.redis.delete(self._key(address))
        except RedisError as exc:
            log.warning("admin throttle unavailable (%s)", exc)
