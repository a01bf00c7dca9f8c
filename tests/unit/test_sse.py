"""SSE encoding: exact bytes, and whole streams decoded by the official SDK."""

import json
from collections.abc import Callable

import anthropic
import httpx2
import pytest

from api.anthropic import sse
from api.anthropic.convert import message_delta_event
from contract.events import DoneEvent


def test_sse_event_frame() -> None:
    assert sse.sse_event("x", {"a": 1, "b": [1, 2]}) == (
        b'event: x\ndata: {"type":"x","a":1,"b":[1,2]}\n\n'
    )


def test_text_is_utf8_and_newlines_stay_escaped() -> None:
    frame = sse.text_delta(0, "h\u00e9 \u2713\nnext")
    assert frame == (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"h\xc3\xa9 \xe2\x9c\x93\\nnext"}}\n\n'
    )
    # One `data:` line per frame: a raw newline would split the event.
    assert frame.count(b"\n") == 3


def test_message_start_bytes() -> None:
    assert sse.message_start("msg_1", "abliterated-model", 42) == (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"abliterated-model","content":[],"stop_reason":null,'
        b'"stop_sequence":null,"usage":{"input_tokens":42,"output_tokens":0,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
        b'"service_tier":"standard"}}}\n\n'
    )


def test_block_and_stop_bytes() -> None:
    assert sse.content_block_start(0) == (
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
    )
    assert sse.content_block_stop(2) == (
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":2}\n\n'
    )
    assert sse.message_stop() == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert sse.ping() == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse.error_event("overloaded_error", "Overloaded") == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )


def test_message_delta_bytes() -> None:
    assert sse.message_delta("end_turn", None, 128, 42, 487, 1, 0.00085) == (
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
        b'"usage":{"input_tokens":42,"output_tokens":128,"cache_read_input_tokens":0,'
        b'"cache_creation_input_tokens":0},"remaining_credits":487,'
        b'"estimated_credits_used":1,"estimated_cost_usd":0.00085}\n\n'
    )


def test_tool_use_and_thinking_deltas() -> None:
    assert sse.content_delta(1, "input_json", '{"a":') == (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":1,'
        b'"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":"}}\n\n'
    )
    assert b'"thinking_delta","thinking":"hm"' in sse.content_delta(0, "thinking", "hm")


DONE = DoneEvent(
    index=4,
    status="succeeded",
    stop_reason="stop_sequence",
    stop_sequence="END",
    input_tokens=42,
    output_tokens=128,
    credits_charged=1,
    remaining_credits=487,
    cost_usd="0.00085",
)


def test_message_delta_from_done_event() -> None:
    frame = message_delta_event(DONE)
    data = json.loads(frame.decode().split("data: ", 1)[1])
    assert data == {
        "type": "message_delta",
        "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
        "usage": {
            "input_tokens": 42,
            "output_tokens": 128,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
        "remaining_credits": 487,
        "estimated_credits_used": 1,
        "estimated_cost_usd": 0.00085,
    }


def full_stream(pieces: list[str]) -> bytes:
    frames = [sse.message_start("msg_test", "abliterated-model", 42), sse.content_block_start(0)]
    frames.append(sse.ping())
    frames.extend(sse.text_delta(0, piece) for piece in pieces)
    frames += [sse.content_block_stop(0), message_delta_event(DONE), sse.message_stop()]
    return b"".join(frames)


def sdk_client(body: bytes, seen: list[httpx2.Request]) -> anthropic.Anthropic:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        # Deliver the stream in awkward chunks: the decoder must not care where bytes split.
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        return httpx2.Response(
            200,
            headers={"content-type": "text/event-stream; charset=utf-8", "request-id": "req_t"},
            content=iter(chunks),
        )

    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://testserver",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )


def stream_final(client: anthropic.Anthropic) -> tuple[anthropic.types.Message, list[str]]:
    with client.messages.stream(
        model="abliterated-model", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        texts = list(stream.text_stream)
        return stream.get_final_message(), texts


def test_sdk_accumulates_our_stream() -> None:
    seen: list[httpx2.Request] = []
    pieces = ["Hel", "lo, w\u00f6rld", "!"]
    message, texts = stream_final(sdk_client(full_stream(pieces), seen))
    assert texts == pieces
    assert seen[0].url.path == "/v1/messages"
    assert json.loads(seen[0].content)["stream"] is True
    assert message.id == "msg_test" and message.model == "abliterated-model"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello, w\u00f6rld!"
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (42, 128)


def test_sdk_sees_metering_fields_on_message_delta() -> None:
    client = sdk_client(full_stream(["x"]), [])
    with client.messages.stream(
        model="abliterated-model", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        deltas = [e for e in stream if e.type == "message_delta"]
    assert len(deltas) == 1
    assert deltas[0].model_extra == {
        "remaining_credits": 487,
        "estimated_credits_used": 1,
        "estimated_cost_usd": 0.00085,
    }


def test_sdk_raises_on_error_event_mid_stream() -> None:
    body = b"".join(
        [
            sse.message_start("msg_e", "abliterated-model", 5),
            sse.content_block_start(0),
            sse.text_delta(0, "partial"),
            sse.error_event("overloaded_error", "Overloaded"),
        ]
    )
    with pytest.raises(anthropic.APIStatusError) as info:
        stream_final(sdk_client(body, []))
    assert info.value.status_code == 200
    assert info.value.type == "overloaded_error"


@pytest.mark.parametrize("make", [sse.ping, sse.message_stop])
def test_frames_end_with_blank_line(make: Callable[[], bytes]) -> None:
    frame = make()
    assert frame.startswith(b"event: ") and frame.endswith(b"\n\n")


def test_unicode_line_separators_are_escaped() -> None:
    """U+2028, U+2029 and U+0085 are legal raw in JSON, but JavaScript (before ES2019),
    Python's splitlines and NEL-aware readers end a line there: the `data:` line would split."""
    text = "a\u2028b\u2029c\u0085d \u00e9"
    frame = sse.text_delta(0, text)
    assert frame == (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"a\\u2028b\\u2029c\\u0085d \xc3\xa9"}}\n\n'
    )
    lines = frame.decode().splitlines()
    assert len(lines) == 3  # event, data, and the blank line that ends the frame
    data = lines[1].removeprefix("data: ")
    assert json.loads(data)["delta"]["text"] == text
    for raw in ("\u2028", "\u2029", "\u0085"):
        assert raw.encode() not in sse.error_event("api_error", f"x{raw}y")
