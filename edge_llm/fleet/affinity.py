"""Conversation affinity: which replica already holds a request's prompt in its KV state.

A replica keeps the KV state of the conversations it served (its slots and its prompt cache), so a
conversation's next turn is cheapest where its last turn ran: only the new messages are evaluated.
The router cannot tokenize (it has no model), so it keys requests by what their prompts start with:

- chat bodies (OpenAI chat, Responses, Anthropic Messages, Ollama /api/chat): a chain of hashes,
  one per message (role and content), so turn 2's chain starts with turn 1's;
- raw prompts (completions, /api/generate, /generate): one hash per whole 256-character block;
- an explicit session header (`X-Session-ID`) replaces both: one key for the whole conversation.

`PrefixIndex` remembers which replica served each hash (bounded, least recently used dropped first)
and answers with the replica of the longest known prefix. Nothing here imports Ray: the Serve
router (router.py) and the tests use the same code.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

SESSION_HEADER = "x-session-id"
BLOCK_CHARS = 256
# At most this many keys per request: a prompt longer than that is keyed by its beginning, which is
# what decides where its KV state is anyway.
MAX_KEYS = 256


def _text(value: Any) -> str:
    """A message's content as one string, whatever its shape (string, parts, blocks)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def prompt_items(body: Any) -> list[str]:
    """What a request's prompt starts with, in order: messages, or blocks of a raw prompt."""
    if not isinstance(body, dict):
        return []
    model = str(body.get("model", ""))
    items = [f"model\x00{model}"]
    for key in ("system", "instructions"):  # Anthropic, Ollama /api/generate; Responses
        if body.get(key):
            items.append(f"{key}\x00{_text(body[key])}")
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list):  # Responses API
        messages = body["input"]
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                role = message.get("role", message.get("type", ""))
                items.append(f"{role}\x00{_text(message.get('content'))}")
            else:
                items.append(_text(message))
        return items
    prompt = body.get("prompt", body.get("input", body.get("inputs", body.get("content"))))
    if isinstance(prompt, list):  # a batch of prompts or token ids: keyed by its first one
        prompt = prompt[0] if prompt else ""
    text = _text(prompt) if prompt is not None else ""
    # Whole blocks only: a prompt that grows keeps its earlier keys (a short one is one item).
    whole = len(text) // BLOCK_CHARS * BLOCK_CHARS
    items += [text[i:i + BLOCK_CHARS] for i in range(0, whole, BLOCK_CHARS)] or ([text] if text else [])
    return items


def prefix_keys(body: Any, session: str | None = None) -> list[str]:
    """Chained hashes of a request's prompt items (each covers everything before it), shortest
    prefix first; a session id gives one key of its own."""
    if session:
        return ["session:" + hashlib.blake2b(session.encode(), digest_size=12).hexdigest()]
    keys: list[str] = []
    chain = hashlib.blake2b(digest_size=12)
    for item in prompt_items(body)[:MAX_KEYS]:
        chain.update(hashlib.blake2b(item.encode("utf-8", "surrogatepass"), digest_size=12).digest())
        keys.append(chain.copy().hexdigest())
    # The model name alone says nothing about where a conversation lives.
    return keys[1:]


class PrefixIndex:
    """hash -> the replica that last served a prompt with that prefix, bounded in entries."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._owner: OrderedDict[str, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def lookup(self, keys: list[str], alive: Iterable[Hashable] | None = None) -> tuple[Hashable | None, int]:
        """The replica holding the longest prefix of `keys` (among `alive`, when given), and how many
        keys it matched; (None, 0) when none is known."""
        allowed = set(alive) if alive is not None else None
        for depth in range(len(keys), 0, -1):
            owner = self._owner.get(keys[depth - 1])
            if owner is not None and (allowed is None or owner in allowed):
                self._owner.move_to_end(keys[depth - 1])
                return owner, depth
        return None, 0

    def record(self, keys: list[str], replica: Hashable) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """A replica that died or left: its prefixes are nowhere now."""
        for key in [k for k, owner in self._owner.items() if owner == replica]:
            del self._owner[key]


def rendezvous(key: str, replicas: Iterable[Hashable], *, name: Callable[[Hashable], str] = str) -> Hashable | None:
    """The replica that highest-random-weight hashing gives `key`: the same answer from any process
    for the same set of replicas, and only the keys of a replica that leaves move elsewhere."""
    def weight(replica: Hashable) -> bytes:
        return hashlib.blake2b(f"{key}\x00{name(replica)}".encode(), digest_size=8).digest()

    return max(replicas, key=weight, default=None)


def choose(preferred: Hashable | None, loads: dict[Hashable, int], *, max_imbalance: int) -> list[list[Hashable]]:
    """Replicas in ranks, most wanted first: the one holding the prefix, unless it has more than
    `max_imbalance` requests beyond the least loaded one (a hot conversation must not pile every
    request onto one replica); then the rest, least loaded first."""
    if not loads:
        return []
    ordered = sorted(loads, key=lambda r: loads[r])
    least = loads[ordered[0]]
    if preferred in loads and loads[preferred] - least <= max_imbalance:
        return [[preferred], [r for r in ordered if r != preferred]]
    return [ordered]
