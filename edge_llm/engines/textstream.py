"""Token bytes -> text deltas, for every engine.

Two things make streaming text harder than joining token strings:
  - a token may end in the middle of a UTF-8 character (common for Chinese and emoji), so bytes
    are decoded incrementally and an incomplete character waits for the next token;
  - a stop string may span tokens, so text that could be the start of a stop string is held
    back until it is known not to be one.
"""

from __future__ import annotations

import codecs
from functools import lru_cache


class StopStrings:
    """One request's stop strings as an Aho-Corasick automaton: text is read once, a character
    at a time, whatever the number of stop strings, so a request with many of them costs the
    engine thread (which decodes every slot) no more per token than a request with one. The
    state after the text says how much of its end could still begin a stop string (held back)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]  # characters matched in this state
        self.ends = [0]  # length of the longest stop string ending in this state (0: none)
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = self.goto[state][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.ends.append(0)
                state = nxt
            self.ends[state] = max(self.ends[state], len(stop))
        self.fail = [0] * len(self.goto)
        queue = list(self.goto[0].values())
        for state in queue:  # breadth first: a state's fallback is shallower, so it is done
            for ch, nxt in self.goto[state].items():
                back = self.fail[state]
                while back and ch not in self.goto[back]:
                    back = self.fail[back]
                fallback = self.goto[back].get(ch, 0)
                self.fail[nxt] = fallback if fallback != nxt else 0
                # a stop string that ends in the fallback ends here too; an earlier start wins
                self.ends[nxt] = self.ends[nxt] or self.ends[self.fail[nxt]]
                queue.append(nxt)

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


@lru_cache(maxsize=64)
def stop_strings(stops: tuple[str, ...]) -> StopStrings:
    """Built once per set of stop strings (a client's usual few, sent with every request)."""
    return StopStrings(stops)


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stop_strings(tuple(stop)) if stop else None
        self._state = 0
        self._scanned = 0  # characters of `text` the automaton has read
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
        stops = self._stops
        if stops is not None:
            # The answer ends where a stop string is first complete (the longest, if several end there).
            state, ends = self._state, stops.ends
            for i in range(self._scanned, end):
                state = stops.step(state, self.text[i])
                if ends[state]:
                    self.stopped = True
                    end = i + 1 - (0 if self._include_stop else ends[state])
                    self.text = self.text[:end]
                    break
            else:
                self._state, self._scanned = state, end
                if not final:
                    end -= stops.depth[state]  # could be the start of a stop string: held back
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out
