"""Money math: USD cost of tokens and its price in whole credits. Decimal only, never floats."""

from dataclasses import KW_ONLY, dataclass
from decimal import ROUND_CEILING, Decimal

MILLION = Decimal(1_000_000)
# Micro-dollar precision is what the API reports; the database keeps nine decimals.
USD_QUANTUM = Decimal("0.000001")


def cost_usd(
    input_tokens: int, output_tokens: int, input_per_mtok: Decimal, output_per_mtok: Decimal
) -> Decimal:
    """Exact USD cost of a request."""
    return (input_tokens * input_per_mtok + output_tokens * output_per_mtok) / MILLION


def credits_for(cost: Decimal, credit_price_usd: Decimal) -> int:
    """Whole credits for a USD cost, rounded up: any non-zero cost costs at least one credit."""
    if cost <= 0:
        return 0
    return int((cost / credit_price_usd).to_integral_value(rounding=ROUND_CEILING))


def report_usd(cost: Decimal) -> Decimal:
    """The cost as reported to clients: rounded up to the micro-dollar."""
    return cost.quantize(USD_QUANTUM, rounding=ROUND_CEILING)


@dataclass(frozen=True)
class Prices:
    """The prices a request is admitted at, stored on its row and charged at its settlement."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    credit_price_usd: Decimal
    _: KW_ONLY
    # A Message Batch item's discount (stored as the request's batch_multiplier); None: 1.
    batch_multiplier: Decimal | None = None

    # Prompt caching: tokens read from the cache, and written to it, cost the input price
    # times these (Anthropic's 0.1x and 1.25x by default; per model in the catalogue).
    cache_read_multiplier: Decimal = Decimal("0.1")
    cache_write_multiplier: Decimal = Decimal("1.25")

    def credits(
        self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
    ) -> int:
        """Whole credits for these tokens at these prices (the hold: output = max_tokens).
        `input_tokens` counts every prompt token, `cache_read` and `cache_write` among them."""
        return credits_for(
            self.cost(input_tokens, output_tokens, cache_read, cache_write), self.credit_price_usd
        )

    def cost(
        self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
    ) -> Decimal:
        """Exact USD cost; the same arithmetic as the settlement's SQL (db/ledger.py)."""
        uncached = input_tokens - cache_read - cache_write
        weighted = (
            uncached
            + cache_read * self.cache_read_multiplier
            + cache_write * self.cache_write_multiplier
        )
        cost = (weighted * self.input_per_mtok + output_tokens * self.output_per_mtok) / MILLION
        return cost * self.batch_multiplier if self.batch_multiplier is not None else cost

    def hold(self, input_tokens: int, max_tokens: int, cacheable: int) -> int:
        """The worst case of a request whose first `cacheable` prompt tokens may be read from
        or written to the cache: each of them at the dearest of the three input prices."""
        dearest = max(Decimal(1), self.cache_read_multiplier, self.cache_write_multiplier)
        weighted = input_tokens - cacheable + cacheable * dearest
        cost = (weighted * self.input_per_mtok + max_tokens * self.output_per_mtok) / MILLION
        if self.batch_multiplier is not None:
            cost *= self.batch_multiplier
        return credits_for(cost, self.credit_price_usd)
