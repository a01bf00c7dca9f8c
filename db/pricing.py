"""Money math: USD cost of tokens and its price in whole credits. Decimal only, never floats."""

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
