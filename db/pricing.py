"""Money math: USD cost of tokens and its price in whole credits. Decimal only, never floats."""

from dataclasses import dataclass
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
    # A Message Batch item's discount (stored as the request's batch_multiplier); None: 1.
    batch_multiplier: Decimal | None = None

    def credits(self, input_tokens: int, output_tokens: int) -> int:
        """Whole credits for these tokens at these prices (the hold: output = max_tokens)."""
        cost = cost_usd(input_tokens, output_tokens, self.input_per_mtok, self.output_per_mtok)
        if self.batch_multiplier is not None:
            cost *= self.batch_multiplier
        return credits_for(cost, self.credit_price_usd)
