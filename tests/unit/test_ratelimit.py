"""Rate-limit bookkeeping that needs no Redis: limits, headers, messages, the script's reply."""

from datetime import UTC, datetime

import pytest

from api.credentials import merged_limits
from api.ratelimit import (
    BLOCKED_IN_FLIGHT,
    BLOCKED_INPUT,
    BLOCKED_OUTPUT,
    BLOCKED_REQUESTS,
    SHARED,
    UNLIMITED,
    Bucket,
    Budget,
    BudgetState,
    Decision,
    Limits,
    parse_reply,
    rate_limit_message,
    rfc3339_ms,
)
from api.settings import ApiSettings

SETTINGS = ApiSettings(
    default_requests_per_minute=100,
    default_input_tokens_per_minute=1000,
    default_output_tokens_per_minute=500,
    default_concurrent_requests=7,
)
NOW_MS = int(datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp() * 1000)


KEY = Budget("acct_unit", "key_unit", Limits(60, 1000, 500, 3))


def _decision(blocked: int = 0, wait_ms: int = 0, budget: Budget = KEY) -> Decision:
    state = BudgetState(
        budget=budget,
        blocked=blocked,
        in_flight=1,
        requests=Bucket(60, 59, NOW_MS + 1000),
        input_tokens=Bucket(1000, 900, NOW_MS + 6000),
        output_tokens=Bucket(500, 250, NOW_MS + 30_500),
    )
    return Decision(retry_after_ms=wait_ms, now_ms=NOW_MS, states=(state,))


def test_a_shared_budget_limits_only_what_it_sets() -> None:
    assert Limits.shared({"requests_per_minute": 5}) == Limits(5, UNLIMITED, UNLIMITED, UNLIMITED)


def test_defaults_fill_what_is_not_configured() -> None:
    limits = Limits.resolve({"requests_per_minute": 5}, SETTINGS)
    assert limits == Limits(5, 1000, 500, 7)
    assert Limits.resolve(None, SETTINGS) == Limits(100, 1000, 500, 7)


@pytest.mark.parametrize("bad", [0, -1, "10", None, 2.5])
def test_unusable_configured_values_fall_back_to_defaults(bad: object) -> None:
    assert Limits.resolve({"requests_per_minute": bad}, SETTINGS).requests_per_minute == 100


def test_key_limits_override_account_defaults_field_by_field() -> None:
    account = {"requests_per_minute": 10, "concurrent_requests": 2}
    key = {"requests_per_minute": 50, "input_tokens_per_minute": 999}
    assert merged_limits(account, key) == {
        "requests_per_minute": 50,
        "concurrent_requests": 2,
        "input_tokens_per_minute": 999,
    }
    assert merged_limits(None, None) is None
    assert merged_limits(account, None) == account


def test_headers_cover_every_family_with_rfc3339_resets() -> None:
    headers = _decision().headers()
    assert headers["anthropic-ratelimit-requests-limit"] == "60"
    assert headers["anthropic-ratelimit-requests-remaining"] == "59"
    assert headers["anthropic-ratelimit-requests-reset"] == "2026-01-01T12:00:01Z"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "900"
    assert headers["anthropic-ratelimit-input-tokens-reset"] == "2026-01-01T12:00:06Z"
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "500"
    # Output's reset rounds up to the next whole second.
    assert headers["anthropic-ratelimit-output-tokens-reset"] == "2026-01-01T12:00:31Z"
    # `tokens` is input + output, resetting when both are full.
    assert headers["anthropic-ratelimit-tokens-limit"] == "1500"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "1150"
    assert headers["anthropic-ratelimit-tokens-reset"] == "2026-01-01T12:00:31Z"
    assert len(headers) == 12


@pytest.mark.parametrize(
    ("wait_ms", "seconds"), [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (59_001, 60)]
)
def test_retry_after_rounds_up_to_whole_seconds(wait_ms: int, seconds: int) -> None:
    assert _decision(BLOCKED_REQUESTS, wait_ms).retry_after_s() == seconds


def test_rfc3339_ms() -> None:
    assert rfc3339_ms(NOW_MS) == "2026-01-01T12:00:00Z"
    assert rfc3339_ms(NOW_MS + 1) == "2026-01-01T12:00:01Z"


@pytest.mark.parametrize(
    ("blocked", "fragments"),
    [
        (BLOCKED_REQUESTS, ["requests", "60 per minute"]),
        (BLOCKED_INPUT, ["input tokens", "1000 per minute"]),
        (BLOCKED_OUTPUT, ["output tokens", "max_tokens", "500 per minute"]),
        (BLOCKED_IN_FLIGHT, ["concurrent requests", "limit of 3"]),
        (BLOCKED_INPUT | BLOCKED_OUTPUT, ["input tokens", "output tokens"]),
    ],
)
def test_message_names_the_limits_that_refused(blocked: int, fragments: list[str]) -> None:
    message = rate_limit_message(_decision(blocked, 2500))
    for fragment in fragments:
        assert fragment in message
    assert "shared" not in message
    assert message.endswith("Retry after 3 s.")


def test_message_says_when_the_accounts_shared_budget_refused() -> None:
    shared = Budget("acct_unit", SHARED, Limits(60, UNLIMITED, UNLIMITED, UNLIMITED))
    message = rate_limit_message(_decision(BLOCKED_REQUESTS, 1000, shared))
    assert "your account's shared rate limit of 60 per minute" in message


def test_parse_reply_maps_the_flat_script_answer() -> None:
    key = Budget("acct_unit", "key_unit", Limits(60, 1000, 500, 4))
    shared = Budget("acct_unit", SHARED, Limits(10, 5000, 5000, 9))
    per_key = [3, 59, NOW_MS + 1000, 0, NOW_MS + 61_000, 400, NOW_MS + 2000]
    per_shared = [5, 4, NOW_MS + 6000, 4000, NOW_MS, 4000, NOW_MS]
    # The key refused on input (bit 2), the shared budget on requests (bit 1 of its nibble).
    reply = [BLOCKED_INPUT | BLOCKED_REQUESTS << 4, 1500, NOW_MS, *per_key, *per_shared]
    decision = parse_reply(reply, [key, shared])
    assert not decision.allowed
    key_state, shared_state = decision.states
    assert (key_state.blocked, shared_state.blocked) == (BLOCKED_INPUT, BLOCKED_REQUESTS)
    assert decision.retry_after_ms == 1500
    assert (key_state.in_flight, shared_state.in_flight) == (3, 5)
    assert key_state.requests == Bucket(60, 59, NOW_MS + 1000)
    assert key_state.input_tokens == Bucket(1000, 0, NOW_MS + 61_000)
    assert key_state.output_tokens == Bucket(500, 400, NOW_MS + 2000)
    assert shared_state.requests == Bucket(10, 4, NOW_MS + 6000)
    # Headers follow whichever budget has less left: requests from the shared one.
    headers = decision.headers()
    assert headers["anthropic-ratelimit-requests-limit"] == "10"
    assert headers["anthropic-ratelimit-requests-remaining"] == "4"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "0"
    allowed = parse_reply([0, *reply[1:]], [key, shared])
    assert allowed.allowed
