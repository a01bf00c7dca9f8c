import random
from pathlib import Path

import pytest

from workers.backends.textstream import IncrementalDecoder, StopMatcher


def utf8_decode(ids: list[int]) -> str:
    """A byte-level 'tokenizer': each id is one byte, as byte-level BPE's fallback tokens are."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream(pieces: list[str], stops: list[str]) -> tuple[str, str | None]:
    """Feeds pieces like an engine does; returns (everything emitted, the stop that matched)."""
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        safe, matched = matcher.feed(piece)
        out.append(safe)
        if matched is not None:
            return "".join(out), matched
    out.append(matcher.flush())
    return "".join(out), None


def splits(text: str) -> list[list[str]]:
    """`text` whole, split once at every position, and one character at a time."""
    cases = [[text], list(text)]
    cases += [[text[:i], text[i:]] for i in range(1, len(text))]
    return cases


# IncrementalDecoder


def test_decoder_ascii_emits_each_token_at_once() -> None:
    decoder = IncrementalDecoder(utf8_decode)
    assert [decoder.push(b) for b in b"abc"] == ["a", "b", "c"]
    assert decoder.flush() == ""


@pytest.mark.parametrize("char", ["é", "€", "🎉", "日"])
def test_decoder_holds_back_incomplete_utf8(char: str) -> None:
    decoder = IncrementalDecoder(utf8_decode)
    raw = ("x" + char + "y").encode()
    deltas = [decoder.push(b) for b in raw]
    assert "\ufffd" not in "".join(deltas)
    assert deltas[0] == "x"
    assert deltas[-2] == char  # appears whole, on the token that completes it
    assert all(d == "" for d in deltas[1:-2])
    assert deltas[-1] == "y"


def test_decoder_flush_releases_a_truncated_character() -> None:
    decoder = IncrementalDecoder(utf8_decode)
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(0xE2) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_decoder_invalid_bytes_are_released_by_the_next_valid_text() -> None:
    decoder = IncrementalDecoder(utf8_decode)
    assert decoder.push(0x80) == ""  # a stray continuation byte: undecidable yet
    assert decoder.push(ord("a")) == "\ufffda"


def test_decoder_extend_matches_push() -> None:
    decoder = IncrementalDecoder(utf8_decode)
    assert decoder.extend(list("héllo".encode())) == "héllo"
    assert decoder.ids == list("héllo".encode())


@pytest.mark.parametrize("seed", range(20))
def test_decoder_deltas_concatenate_to_the_full_decode(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", " ", "é", "€", "🎉", "\n", "日本"]) for _ in range(40))
    ids = list(text.encode())
    # Sprinkle in stray bytes, as a random model emits them.
    for _ in range(3):
        ids.insert(rng.randrange(len(ids)), rng.choice([0x80, 0xBF, 0xC3, 0xF0]))
    decoder = IncrementalDecoder(utf8_decode)
    out = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert out == utf8_decode(ids)


def test_decoder_with_a_real_tokenizer(tiny_model_dir: Path) -> None:
    from contract.rendering import PromptRenderer

    renderer = PromptRenderer.from_folder(tiny_model_dir)
    text = "def naïve(x):\n    return '🎉' * x  # café 日本語\n"
    ids = renderer.encode(text)
    decoder = IncrementalDecoder(renderer.decode)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    # Special tokens (skipped in decode) emit nothing and do not disturb what follows.
    eos = renderer.eos_token_ids[0]
    decoder = IncrementalDecoder(renderer.decode)
    assert decoder.push(eos) == ""
    assert "".join(decoder.push(i) for i in renderer.encode("ok")) == "ok"


# StopMatcher


@pytest.mark.parametrize("pieces", splits("Hello STOP world"))
def test_stop_found_at_any_split_and_never_leaked(pieces: list[str]) -> None:
    assert stream(pieces, ["STOP"]) == ("Hello ", "STOP")


@pytest.mark.parametrize("pieces", splits("abc déjà 🎉 vu xyz"))
def test_unicode_stop_sequence(pieces: list[str]) -> None:
    assert stream(pieces, ["🎉 vu"]) == ("abc déjà ", "🎉 vu")


@pytest.mark.parametrize("pieces", splits("no stop in here at all, STO"))
def test_no_match_emits_everything(pieces: list[str]) -> None:
    assert stream(pieces, ["STOP", "zzz"]) == ("no stop in here at all, STO", None)


@pytest.mark.parametrize("pieces", splits("one two three"))
def test_first_completed_stop_wins(pieces: list[str]) -> None:
    assert stream(pieces, ["three", "two"]) == ("one ", "two")


@pytest.mark.parametrize("pieces", splits("xxabcd"))
def test_overlapping_prefixes(pieces: list[str]) -> None:
    # "abc" completes before "abcd"; "bcx" never completes although it overlaps.
    assert stream(pieces, ["abcd", "bcx", "abc"]) == ("xx", "abc")


@pytest.mark.parametrize("pieces", splits("aaab"))
def test_self_overlapping_stop(pieces: list[str]) -> None:
    assert stream(pieces, ["aab"]) == ("a", "aab")


@pytest.mark.parametrize("pieces", splits("say xab now"))
def test_same_end_prefers_the_longer_stop(pieces: list[str]) -> None:
    assert stream(pieces, ["ab", "xab"]) == ("say ", "xab")


def test_held_text_is_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("text </e") == ("text ", None)
    assert matcher.held == "</e"
    assert matcher.feed("xtra") == ("</extra", None)
    assert matcher.held == ""


def test_feed_after_match_emits_nothing() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("a.b") == ("a", ".")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""


def test_no_stop_sequences_passes_text_through() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.feed("abc") == ("abc", None)
    assert matcher.held == ""


@pytest.mark.parametrize("seed", range(30))
def test_random_streams_match_a_one_shot_search(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab é🎉"
    text = "".join(rng.choice(alphabet) for _ in range(30))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)]
    # Reference: the stop whose first occurrence ends earliest (longest on a tie).
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    expected = (text, None)
    if hits:
        end, neg_len, stop = min(hits)
        expected = (text[: end + neg_len], stop)
    cuts = sorted(rng.sample(range(1, len(text)), 5))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert stream(pieces, stops) == expected
