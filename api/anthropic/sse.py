"""Server-sent events in Anthropic's stream format: every frame is a named event whose JSON
`data` repeats the name in `type` (the SDKs drop unnamed events).

Usage counts: `message_start` carries the real `input_tokens` and `output_tokens: 0` (nothing
generated yet; the real API often says 1). `message_delta` carries the cumulative totals, which the
SDK's accumulator copies over the start values, so the final Message's usage is exact either way.
"""

import json
from typing import Any

from api.anthropic.protocol import StopReason

# Characters that JSON allows raw inside strings but that some line splitters treat as line
# ends (JavaScript before ES2019, Python's str.splitlines, NEL-aware readers): escaped, so a
# frame's `data:` line stays one line for every client.
_LINE_BREAKS = (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\u0085", "\\u0085"))


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """`event: X\\ndata: {compact JSON with "type": X}\\n\\n`."""
    payload = json.dumps({"type": event, **data}, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS:
        if raw in payload:  # rare: a scan is cheaper than a copy
            payload = payload.replace(raw, escaped)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def message_start(
    message_id: str,
    model: str,
    input_tokens: int,
    cache_read_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
) -> bytes:
    return sse_event(
        "message_start",
        {
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": 0,
                    "cache_creation_input_tokens": cache_creation_input_tokens,
                    "cache_read_input_tokens": cache_read_input_tokens,
                    "service_tier": "standard",
                },
            }
        },
    )


def content_block_start(index: int, block: dict[str, Any] | None = None) -> bytes:
    """Opens a block: `block` as it starts (an empty text block by default)."""
    content_block = block if block is not None else {"type": "text", "text": ""}
    return sse_event("content_block_start", {"index": index, "content_block": content_block})


# The delta type of each kind of content, and the field that carries it.
_DELTAS = {
    "text": ("text_delta", "text"),
    "input_json": ("input_json_delta", "partial_json"),
    "thinking": ("thinking_delta", "thinking"),
}


def content_delta(index: int, kind: str, text: str) -> bytes:
    delta_type, field = _DELTAS[kind]
    return sse_event(
        "content_block_delta", {"index": index, "delta": {"type": delta_type, field: text}}
    )


def signature_delta(index: int, signature: str) -> bytes:
    """Closes a thinking block's content: sent just before its `content_block_stop`."""
    return sse_event(
        "content_block_delta",
        {"index": index, "delta": {"type": "signature_delta", "signature": signature}},
    )


def text_delta(index: int, text: str) -> bytes:
    return content_delta(index, "text", text)


def content_block_stop(index: int) -> bytes:
    return sse_event("content_block_stop", {"index": index})


def message_delta(
    stop_reason: StopReason | None,
    stop_sequence: str | None,
    output_tokens: int,
    input_tokens: int,
    remaining_credits: int,
    estimated_credits_used: int,
    estimated_cost_usd: float,
    cache_read_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
) -> bytes:
    """Stop reason, cumulative usage and the seed's metering fields (top level, beside `delta`)."""
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read_input_tokens,
        "cache_creation_input_tokens": cache_creation_input_tokens,
    }
    return sse_event(
        "message_delta",
        {
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage,
            "remaining_credits": remaining_credits,
            "estimated_credits_used": estimated_credits_used,
            "estimated_cost_usd": estimated_cost_usd,
        },
    )


def message_stop() -> bytes:
    return sse_event("message_stop", {})


def ping() -> bytes:
    return sse_event("ping", {})


def error_event(error_type: str, message: str) -> bytes:
    """A mid-stream error; the stream ends after it, without `message_stop`."""
    return sse_event("error", {"error": {"type": error_type, "message": message}})
