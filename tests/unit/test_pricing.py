from decimal import Decimal

from db.pricing import cost_usd, credits_for, report_usd


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
