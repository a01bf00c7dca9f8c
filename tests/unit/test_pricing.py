from decimal import Decimal

from db.pricing import MILLION, Prices, cost_usd, credits_for, report_usd


def test_seed_example() -> None:
    cost = cost_usd(42, 128, Decimal(5), Decimal(5))
    assert cost == Decimal("0.00085")
    assert credits_for(cost, Decimal("0.001")) == 1


def test_rounding_up_to_whole_credits() -> None:
    price = Decimal("0.001")
    assert credits_for(Decimal(0), price) == 0
    assert credits_for(Decimal("0.000000001"), price) == 1
    assert credits_for(Decimal("0.001"), price) == 1
    assert credits_for(Decimal("0.0010001"), price) == 2
    assert credits_for(Decimal("2.5"), price) == 2500


def test_different_input_and_output_prices() -> None:
    cost = cost_usd(1_000_000, 500_000, Decimal("0.5"), Decimal("1.5"))
    assert cost == Decimal("1.25")
    assert report_usd(Decimal("0.0000001")) == Decimal("0.000001")


def test_cache_reads_and_writes_cost_their_multiple_of_the_input_price() -> None:
    prices = Prices(Decimal(10), Decimal(20), Decimal("0.000001"))  # 0.1x and 1.25x by default
    # 1,000 prompt tokens: 600 read, 300 written, 100 plain; 50 output.
    cost = prices.cost(1000, 50, cache_read=600, cache_write=300)
    expected = (100 * 10 + 600 * Decimal("1.0") + 300 * Decimal("12.5") + 50 * 20) / MILLION
    assert cost == expected
    assert prices.credits(1000, 50, 600, 300) == credits_for(expected, Decimal("0.000001"))
    assert prices.cost(1000, 50) == (1000 * 10 + 50 * 20) / MILLION


def test_the_hold_prices_every_cacheable_token_at_the_dearest_rate() -> None:
    prices = Prices(Decimal(10), Decimal(20), Decimal("0.000001"))
    hold = prices.hold(1000, 50, cacheable=800)
    # Whatever the worker reports (reads, writes, neither), the charge fits the hold.
    for read, write in [(0, 0), (800, 0), (0, 800), (400, 400), (768, 0), (0, 768)]:
        assert prices.credits(1000, 50, read, write) <= hold
    assert hold == prices.credits(1000, 50, 0, 800)
    assert prices.hold(1000, 50, cacheable=0) == prices.credits(1000, 50)
