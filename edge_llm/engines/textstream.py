"""Token bytes -> text deltas, for every engine.

Two things make streaming text harder than joining token strings:
  - a token may end in the middle of a UTF-8 character (common for Chinese and emoji), so bytes
    are decoded incrementally and an incomplete character waits for the next token;
  - a stop string may span tokens, so text that could be the start of a stop string is held
    back until it is known not to be one.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._include_stop = include_stop
        self.text = ""  # everything decoded so far, stop string included
        self._sent = 0
        self.stopped = False  # a stop string was found; the caller should finish the choice

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush what was held back. The bytes of a character cut off by the
        token limit are dropped: they are not text yet, and U+FFFD would be a made-up one."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self._stop:
            hit = self._find_stop()
            if hit is not None:
                start, stop = hit
                self.stopped = True
                end = start + (len(stop) if self._include_stop else 0)
                self.text = self.text[:end]
            elif not final:
                end -= self._partial_stop_length()
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        # Only text near the unsent tail can hold a stop string not seen before.
        search_from = max(0, self._sent - self._longest_stop + 1)
        best = None
        for stop in self._stop:
            index = self.text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_stop_length(self) -> int:
        """Length of the longest unsent tail that is the beginning of some stop string."""
        tail = self.text[self._sent :]
        for length in range(min(len(tail), self._longest_stop - 1), 0, -1):
            suffix = tail[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
