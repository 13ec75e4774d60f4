"""Incremental detokenization and stop strings (API-process side).

Only complete text is emitted: a window of trailing ids is decoded and text ending in a
half UTF-8 character (U+FFFD) waits for the next token. Stop strings cut the text at the
earliest match; while streaming, the longest suffix that could still begin a stop string
is held back.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        decoder: Decoder,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.decoder = decoder
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop_str_in_output
        self.min_tokens = min_tokens  # stop strings only count once this many tokens exist (vLLM)
        self.token_ids: list[int] = []
        self.text = ""  # all complete text so far (cut at a stop string once matched)
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0  # chars of self.text already handed out by take_delta()
        self.stopped_by: str | None = None

    def add_tokens(self, new_ids: list[int]) -> None:
        """Append ids; updates self.text and self.stopped_by."""
        if self.stopped_by is not None:
            return
        old_len = len(self.text)
        for tid in new_ids:
            self.token_ids.append(tid)
            window = self.token_ids[self._prefix_offset :]
            prefix = self.decoder.decode(
                self.token_ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
            )
            full = self.decoder.decode(window, self.skip_special_tokens)
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                continue  # incomplete character (or nothing visible yet): wait for more ids
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        if len(self.token_ids) >= self.min_tokens:
            self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        if not self.stop:
            return
        longest = max(len(s) for s in self.stop)
        start = max(0, old_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = self.text[: pos + len(s)] if self.include_stop else self.text[:pos]
            self.stopped_by = s

    def flush(self) -> None:
        """At the end of generation, emit whatever is left (even a trailing partial char)."""
        if self.stopped_by is None and self._read_offset < len(self.token_ids):
            prefix = self.decoder.decode(
                self.token_ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
            )
            full = self.decoder.decode(self.token_ids[self._prefix_offset :], self.skip_special_tokens)
            old = len(self.text)
            self.text += full[len(prefix) :]
            self._read_offset = len(self.token_ids)
            self._check_stop(old)

    def take_delta(self, final: bool = False) -> str:
        """Text not yet handed out, holding back a possible stop-string prefix unless final."""
        end = len(self.text)
        if not final and self.stopped_by is None and self.stop:
            end -= _held_back(self.text, self.stop)
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
