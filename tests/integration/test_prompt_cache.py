"""Prompt caching on the real stack (API, worker with the default model, Postgres, Redis),
through the official SDK: `cache_control` breakpoints, what the worker's cache read and wrote
in `usage` (message_start included), the charge at the cache prices, and the usage report."""

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from contract.rendering import PromptRenderer
from db.models import Request
from db.pricing import Prices
from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.integration.api_process import api_process
from tests.support import STACK_MODEL_SPEC

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL_SPEC.id
WORDS = [
    "parcel",
    "customs",
    "tracking",
    "depot",
    "courier",
    "invoice",
    "pallet",
    "freight",
    "manifest",
    "route",
    "weekday",
    "signature",
    "locker",
    "warehouse",
    "express",
    "returns",
    "label",
    "weight",
    "volume",
    "tariff",
    "border",
]


def long_system(renderer: PromptRenderer, tokens: int, seed: int = 0) -> str:
    """Rule text of at least `tokens` tokens (rendered alone as a system prompt)."""
    lines: list[str] = []
    while renderer.count(" ".join(lines), [("user", "x")]) < tokens:
        for _ in range(20):
            n = len(lines)
            lines.append(
                f"Rule {seed}.{n}: the {WORDS[n % len(WORDS)]} of a {WORDS[(n * 7) % len(WORDS)]}"
                f" goes with the {WORDS[(n * 3 + seed) % len(WORDS)]}."
            )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def renderer(stack: Stack) -> PromptRenderer:
    return PromptRenderer.from_folder(stack.model_dir)


@pytest.fixture(scope="module")
def system(renderer: PromptRenderer) -> str:
    return long_system(renderer, 1300)


def ask(client: anthropic.Anthropic, system: Any, question: str, **kw: Any) -> Any:
    return client.messages.create(
        model=MODEL,
        max_tokens=16,
        system=system,
        messages=[{"role": "user", "content": question}],
        extra_body={"temperature": 0.0},  # greedy (this SDK has no temperature argument)
        **kw,
    )


def marked(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


def row(db: Session, message_id: str) -> Request:
    db.expire_all()
    return db.execute(select(Request).where(Request.message_id == message_id)).scalar_one()


def test_a_marked_system_prompt_is_written_then_read(
    client: anthropic.Anthropic, system: str, db: Session
) -> None:
    first = ask(client, marked(system), "Where is parcel 12?")
    u1 = first.usage
    assert u1.cache_read_input_tokens == 0
    assert u1.cache_creation_input_tokens >= 1024
    second = ask(client, marked(system), "And parcel 13, on a weekday?")
    u2 = second.usage
    # The second reads what the first wrote (whole blocks of the common prefix).
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens
    assert u2.cache_creation_input_tokens < 128
    whole1 = u1.input_tokens + u1.cache_creation_input_tokens
    whole2 = u2.input_tokens + u2.cache_read_input_tokens + u2.cache_creation_input_tokens
    assert whole1 == row(db, first.id).input_tokens and whole2 == row(db, second.id).input_tokens

    # Charged at the cache prices stored on the row: read 0.1x, write 1.25x the input price.
    for message in (first, second):
        stored = row(db, message.id)
        assert stored.cache_read_multiplier == Decimal("0.1")
        assert stored.cache_write_multiplier == Decimal("1.25")
        assert stored.cache_read_input_tokens == message.usage.cache_read_input_tokens
        assert stored.cache_creation_input_tokens == message.usage.cache_creation_input_tokens
        assert stored.input_price_per_mtok is not None
        assert stored.output_price_per_mtok is not None
        prices = Prices(
            stored.input_price_per_mtok,
            stored.output_price_per_mtok,
            Decimal(1),
            cache_read_multiplier=Decimal("0.1"),
            cache_write_multiplier=Decimal("1.25"),
        )
        expected = prices.cost(
            stored.input_tokens,
            message.usage.output_tokens,
            message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens,
        )
        assert stored.cost_usd == expected
    full = Prices(Decimal(5), Decimal(5), Decimal(1)).cost(row(db, second.id).input_tokens, 16)
    assert row(db, second.id).cost_usd < full


def test_the_cached_answer_is_the_uncached_one(
    client: anthropic.Anthropic, renderer: PromptRenderer
) -> None:
    system = long_system(renderer, 1200, seed=3)
    cold = ask(client, system, "Which rule covers lockers?")  # no breakpoint: nothing cached
    assert cold.usage.cache_read_input_tokens == cold.usage.cache_creation_input_tokens == 0
    ask(client, marked(system), "Which rule covers pallets?")  # writes the system prompt
    warm = ask(client, marked(system), "Which rule covers lockers?")
    assert warm.usage.cache_read_input_tokens > 1000
    assert [b.model_dump() for b in warm.content] == [b.model_dump() for b in cold.content]


def test_message_start_carries_what_the_worker_found(
    client: anthropic.Anthropic, renderer: PromptRenderer
) -> None:
    system = long_system(renderer, 1100, seed=5)
    ask(client, marked(system), "Hello")
    with client.messages.stream(
        model=MODEL,
        max_tokens=8,
        system=marked(system),
        messages=[{"role": "user", "content": "Hello again"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = next(e for e in events if e.type == "message_start")
    assert start.message.usage.cache_read_input_tokens > 1000
    assert start.message.usage.cache_read_input_tokens == final.usage.cache_read_input_tokens
    assert start.message.usage.input_tokens == final.usage.input_tokens


def test_breakpoints_on_tools_and_messages(
    client: anthropic.Anthropic, renderer: PromptRenderer
) -> None:
    # The last breakpoint (on the first user message) covers the tools, system and that turn.
    tools = [
        {
            "name": "track",
            "description": "Track a parcel",
            "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"},
        }
    ]
    history = [
        {"role": "user", "content": marked(long_system(renderer, 1100, seed=7))},
        {"role": "assistant", "content": "Noted."},
    ]

    def turn(question: str) -> Any:
        return client.messages.create(
            model=MODEL,
            max_tokens=4,
            system="You track parcels.",
            tools=tools,  # type: ignore[arg-type]
            messages=[*history, {"role": "user", "content": question}],  # type: ignore[list-item]
        )

    first, second = turn("Track A1"), turn("Track B2")
    assert first.usage.cache_creation_input_tokens > 1100
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


def test_a_short_prefix_is_not_cached(client: anthropic.Anthropic) -> None:
    message = ask(client, marked("You are terse."), "Hi")
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0


def test_more_than_four_breakpoints_are_refused(client: anthropic.Anthropic) -> None:
    blocks = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(client, blocks, "Hi")
    assert "A maximum of 4 blocks with cache_control" in str(caught.value)


def test_usage_report_sums_the_cache_tokens(
    stack: Stack,
    account: ApiAccount,
    admin: httpx.Client,
    client: anthropic.Anthropic,
    renderer: PromptRenderer,
) -> None:
    system = long_system(renderer, 1100, seed=9)
    a = ask(client, marked(system), "One")
    b = ask(client, marked(system), "Two")
    report = admin.get("/admin/usage", params={"account_id": account.id}).json()
    totals = report["totals"]
    assert totals["cache_creation_input_tokens"] == (
        a.usage.cache_creation_input_tokens + b.usage.cache_creation_input_tokens
    )
    assert totals["cache_read_input_tokens"] == b.usage.cache_read_input_tokens > 0


@pytest.fixture(scope="module")
def auto_cache_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process with automatic prompt caching on (an operator's choice)."""
    log = tmp_path_factory.mktemp("auto-cache") / "api.log"
    with api_process(stack, log, {"ABL_AUTO_PROMPT_CACHE": "true"}) as url:
        yield url


def test_automatic_caching_needs_no_breakpoint(
    auto_cache_api: str, account: ApiAccount, client: anthropic.Anthropic, renderer: PromptRenderer
) -> None:
    system = long_system(renderer, 1100, seed=11)
    # The stack's own API (automatic caching off) caches nothing unmarked.
    assert ask(client, system, "One").usage.cache_creation_input_tokens == 0
    auto = anthropic.Anthropic(base_url=auto_cache_api, api_key=account.key, max_retries=0)
    first, second = ask(auto, system, "One"), ask(auto, system, "Two")
    assert first.usage.cache_creation_input_tokens > 1000
    assert second.usage.cache_read_input_tokens > 1000
