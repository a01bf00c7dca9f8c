"""Turning generated token ids into streamed text: incremental decoding and stop sequences.

Pure Python (no torch), so it is unit-tested on its own and reused by any engine.
"""

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Text deltas of a growing token sequence.

    Decodes a short window of recent ids instead of the whole sequence (cost stays constant per
    token), starting one emitted piece back so tokenizers that change a token's text by its left
    context (SentencePiece's leading space) still give the right delta. Text ending in U+FFFD is
    held back: the last token may have split a multi-byte character, and the next completes it.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        # ids[prefix:read] were already emitted; they are decoded again only as left context.
        self._prefix = 0
        self._read = 0

    @property
    def ids(self) -> list[int]:
        return self._ids

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Adds several tokens at once; returns the text they complete."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """All text not yet returned, incomplete characters included (end of generation)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (after.endswith(REPLACEMENT_CHAR) or len(after) <= len(before)):
            # An unfinished character, or nothing visible yet (a skipped special token).
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if after.startswith(before):
            return after[len(before) :]
        # The window's start decoded differently with more context; emit only what is new.
        common = next(
            (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
            min(len(before), len(after)),
        )
        return after[common:]


class StopMatcher:
    """Finds stop sequences in streamed text without ever emitting any part of one.

    Text that might be the start of a stop sequence is held back until the next piece decides
    it. The first stop sequence to complete wins (on a tie, the longer one), the same however
    the text was split into pieces.
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        # Empty strings would match everywhere; they mean nothing as a stop sequence.
        self.stop_sequences = [s for s in dict.fromkeys(stop_sequences) if s]
        self._held = ""
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text withheld because it may begin a stop sequence."""
        return self._held

    def feed(self, text: str) -> tuple[str, str | None]:
        """Adds text; returns (text safe to emit, the stop sequence that matched or None)."""
        if self.matched is not None:
            return "", None
        if not self.stop_sequences:
            return text, None
        buffer = self._held + text
        found = self._first_match(buffer)
        if found is not None:
            start, stop = found
            self.matched = stop
            self._held = ""
            return buffer[:start], stop
        keep = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """The withheld text (generation ended without completing a stop sequence)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stop_sequences:
            index = buffer.find(stop)
            if index >= 0:
                key = (index + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_suffix_len(self, buffer: str) -> int:
        # The longest suffix of `buffer` that is a proper prefix of some stop sequence.
        longest = 0
        for stop in self.stop_sequences:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
