"""`edge-llm batch IN.jsonl -o OUT.jsonl`: offline generation over a JSONL file.

Each input line is `{"id"?, "prompt"}` or `{"id"?, "messages": [...]}` plus optional sampling
fields (SamplingParams names: temperature, max_tokens, stop, seed, ...); every other field is
carried through to the output. For an embedding model, `{"id"?, "input": text or [texts]}` gets
`embedding` (or `embeddings`); for a reranker, `{"id"?, "query", "documents": [texts]}` gets
`scores`, one per document in their order. Images (models with a vision projector): `"images": [PATH or
data: URL, ...]` on a record go before its (last) user message's text, and `messages` may carry
OpenAI content parts (`{"type": "image_url", "image_url": {"url": ...}}`). Records run concurrently: through the engine's parallel slots
(continuous batching), or against an OpenAI-compatible server (`--url`) with bounded
concurrency.

Output lines are written (and fsync'ed) as records finish, so they are in completion order;
each carries the input's `id` and its `line` number (`--sort` rewrites the file in input order
at the end). Re-running with the same output resumes: records already done are skipped, error
records and a line cut short by a crash are dropped and those records run again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import string
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_llm.engines.base import Delta, Engine, Usage, load_engine, merge_delta
from edge_llm.engines.media import MEDIA_MARKER, MediaPrompt
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.files import check_output_path, json_bytes, os_errors
from edge_llm.options import (
    CommandParser,
    add_model_flags,
    add_sampling_flags,
    given_sampling,
    load_options,
    sampling_params,
)
from edge_llm.sampling import SamplingParams

SAMPLING_FIELDS = frozenset(SamplingParams.model_fields)
# Output fields written by the runner; input fields of the same name are overwritten.
RESERVED_FIELDS = ("line", "output", "choices", "finish_reason", "usage", "timing", "error", "error_type",
                   "embedding", "embeddings", "scores")
# Records of an embedding model or reranker in flight at once: their inputs share the pooled decodes.
POOLED_CONCURRENCY = 16


@dataclass
class BatchRecord:
    """One input line, parsed. `error` is set when the line cannot run (it becomes an error record)."""

    line: int
    data: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    messages: list[dict] | None = None
    inputs: list[str] | None = None  # texts to embed
    query: str | None = None  # a rerank record's query, and its `inputs` the documents
    images: list[str] = field(default_factory=list)  # paths or data: URLs, before the last user text
    sampling: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str = "invalid_record"

    @property
    def key(self) -> str:
        return record_key(self.data if "id" in self.data else {"line": self.line})


@dataclass
class Completion:
    """What a backend returns for one record."""

    choices: list[Delta]
    prompt_tokens: int = 0
    vectors: list[list[float]] | None = None  # an embedding record's
    scores: list[float] | None = None  # a rerank record's
    cached_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0


class Backend(Protocol):
    def run(self, record: BatchRecord, params: SamplingParams, explicit: dict[str, Any],
            stop: threading.Event) -> Completion: ...

    def interrupt(self) -> None:
        """Abandon the records in flight (the run is being interrupted)."""

    def close(self) -> None: ...


def record_key(record: dict[str, Any]) -> str:
    """A record's identity across runs: its `id` if it has one, else its input line number."""
    if "id" in record:
        return "id:" + json.dumps(record["id"], sort_keys=True, ensure_ascii=False)
    return f"line:{record.get('line')}"


# -- input ---------------------------------------------------------------------------------------


def read_records(path: Path, *, template: str | None = None, chat: bool = False,
                 system: str | None = None) -> Iterator[BatchRecord]:
    """Parse the input lazily; a bad line (not UTF-8, not JSON, ...) becomes a record with `error`
    set, never an exception."""
    seen: set[str] = set()
    with os_errors(path, "read"):
        f = open(path, "rb")
    with f, os_errors(path, "read"):
        for n, data in enumerate(f, start=1):
            if n == 1 and data.startswith(b"\xef\xbb\xbf"):  # a BOM from Windows editors is not part of line 1
                data = data[3:]
            if not data.strip():
                continue
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BatchRecord(n, error=f"line {n}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                                           f"{exc.start + 1})")
                continue
            record = parse_record(raw, n, template=template, chat=chat, system=system)
            if "id" in record.data and record.error is None:
                if record.key in seen:
                    record.error = f"duplicate id {record.data['id']!r} (ids must be unique)"
                    record.data = {k: v for k, v in record.data.items() if k != "id"}
                seen.add(record.key)
            yield record


def parse_record(raw: str, line: int, *, template: str | None = None, chat: bool = False,
                 system: str | None = None) -> BatchRecord:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return BatchRecord(line, error=f"line {line}: not valid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(data, dict):
        return BatchRecord(line, error=f"line {line}: a record must be a JSON object, got {type(data).__name__}")
    record = BatchRecord(line, data=data)
    record.sampling = {k: v for k, v in data.items() if k in SAMPLING_FIELDS}
    if "query" in data or "documents" in data:
        texts = data.get("documents")
        if not isinstance(data.get("query"), str) or not data["query"] or not isinstance(texts, list) or not texts \
                or not all(isinstance(t, str) and t for t in texts):
            record.error = f"line {line}: a rerank record needs a non-empty `query` and `documents`, a list of texts"
        else:
            record.query, record.inputs = data["query"], texts
        return record
    if "input" in data:
        texts = [data["input"]] if isinstance(data["input"], str) else data["input"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            record.error = f"line {line}: `input` must be a non-empty text or a list of them"
        else:
            record.inputs = texts
        return record
    images = data.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        record.error = f"line {line}: `images` must be a list of image paths or data: URLs"
        return record
    record.images = images
    chat = chat or bool(images)  # images go in a user message: the chat template places them
    if template is not None:
        try:
            text = string.Formatter().vformat(template, (), _TemplateFields(data))
        except KeyError as exc:
            record.error = f"line {line}: --template needs field {exc.args[0]!r}, which the record lacks"
            return record
        except (ValueError, IndexError, AttributeError) as exc:
            record.error = f"line {line}: --template does not apply: {exc}"
            return record
    elif "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            record.error = f"line {line}: `messages` must be a non-empty list of {{role, content}} objects"
            return record
        record.messages = messages
        return record
    elif "prompt" in data:
        text = data["prompt"]
        if not isinstance(text, str):
            record.error = f"line {line}: `prompt` must be a string"
            return record
    else:
        record.error = f"line {line}: the record has neither `prompt` nor `messages`"
        return record
    if chat:
        record.messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]
    else:
        record.prompt = text
    return record


class _TemplateFields(dict):
    """Record fields for str.format; a missing field raises KeyError with its name."""

    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


# -- output and resumption ----------------------------------------------------------------------


def load_done(path: Path) -> set[str]:
    """Keys of records already done in `path`. Rewrites the file without its error records and
    without a last line cut short by a crash, so those records run again and appear once."""
    if not path.exists():
        return set()
    done: set[str] = set()
    keep: list[bytes] = []
    changed = False
    with os_errors(path, "read"), open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8"))
                complete = raw.endswith(b"\n") and isinstance(record, dict)
            except ValueError:  # not UTF-8 (UnicodeDecodeError) or not JSON: run the record again
                complete = False
            if not complete or "error" in record:
                changed = True
                continue
            key = record_key(record)
            if key in done:  # written twice (should not happen): keep the first
                changed = True
                continue
            done.add(key)
            keep.append(raw)
    if changed:
        _write_atomic(path, keep)
    return done


def _write_atomic(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with os_errors(path, "write"):
            with open(tmp, "wb") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sort_output(path: Path) -> None:
    """Rewrite the output in input order (by line number)."""
    with os_errors(path, "read"), open(path, "rb") as f:
        lines = [raw if raw.endswith(b"\n") else raw + b"\n" for raw in f if raw.strip()]
    lines.sort(key=lambda raw: json.loads(raw).get("line", 0))
    _write_atomic(path, lines)


class OutputWriter:
    """Appends one JSON line per finished record, flushed and fsync'ed at once, so a crash loses
    only the records still running."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with os_errors(path, "write"):
            self._file = open(path, "ab")

    def write(self, record: dict[str, Any]) -> None:
        with os_errors(self.path, "write"):
            self._file.write(json_bytes(record) + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with os_errors(self.path, "write"):
            self._file.close()


def result_record(record: BatchRecord, completion: Completion) -> dict[str, Any]:
    if completion.vectors is not None or completion.scores is not None:
        return pooled_record(record, completion)
    out = dict(record.data)
    choices = completion.choices
    first = choices[0]
    completion_tokens = sum(c.usage.completion_tokens if c.usage else len(c.token_ids) for c in choices)
    out.update(line=record.line, output=first.text, finish_reason=first.finish_reason)
    if len(choices) > 1:
        out["choices"] = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in choices]
    else:
        out.pop("choices", None)
    out["usage"] = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion_tokens,
                    "cached_tokens": completion.cached_tokens}
    latency = completion.latency_s
    out["timing"] = {
        "latency_s": round(latency, 4),
        "ttft_s": round(completion.ttft_s, 4) if completion.ttft_s is not None else None,
        "tokens_per_s": round(completion_tokens / latency, 2) if latency > 0 else None,
    }
    for name in ("error", "error_type"):
        out.pop(name, None)
    return out


def pooled_record(record: BatchRecord, completion: Completion) -> dict[str, Any]:
    out = {k: v for k, v in record.data.items() if k not in RESERVED_FIELDS}
    out["line"] = record.line
    if completion.scores is not None:
        out["scores"] = completion.scores
    elif isinstance(record.data.get("input"), str):
        out["embedding"] = completion.vectors[0]
    else:
        out["embeddings"] = completion.vectors
    out["usage"] = {"prompt_tokens": completion.prompt_tokens}
    out["timing"] = {"latency_s": round(completion.latency_s, 4)}
    return out


def error_record(record: BatchRecord, message: str, error_type: str) -> dict[str, Any]:
    out = {k: v for k, v in record.data.items() if k not in RESERVED_FIELDS}
    out.update(line=record.line, error=message, error_type=error_type)
    return out


# -- backends -------------------------------------------------------------------------------------


class EngineBackend:
    """Runs records in-process; up to n_parallel of them decode together in one batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, record: BatchRecord, params: SamplingParams, explicit: dict[str, Any],
            stop: threading.Event) -> Completion:
        if record.inputs is not None:
            return self._pooled(record)
        prompt = self.engine.chat_prompt(record.messages) if record.messages is not None else record.prompt
        if record.messages is not None and (record.images or _has_parts(record.messages)):
            prompt = self._media_prompt(record)
        else:
            prompt = self.engine.chat_prompt(record.messages) if record.messages is not None else record.prompt
        choices = [Delta(index=i) for i in range(params.n)]
        start = time.perf_counter()
        ttft = None
        stream = self.engine.stream(prompt, params)
        try:
            for delta in stream:
                if ttft is None:
                    ttft = time.perf_counter() - start
                merge_delta(choices, delta)
                if stop.is_set():
                    raise _Stopped
        finally:
            stream.close()  # cancels the request if it is still running
        usage = choices[0].usage
        return Completion(choices, prompt_tokens=usage.prompt_tokens if usage else 0,
                          cached_tokens=usage.cached_tokens if usage else 0, ttft_s=ttft,
                          latency_s=time.perf_counter() - start)

    def _pooled(self, record: BatchRecord) -> Completion:
        """An embedding or rerank record: the engine's pooled decodes, shared with the records in flight."""
        start = time.perf_counter()
        if record.query is not None:
            result = asyncio.run(self.engine.rerank(record.query, record.inputs))
            return Completion([], prompt_tokens=result.prompt_tokens, scores=result.scores,
                              latency_s=time.perf_counter() - start)
        done = asyncio.run(self.engine.embeddings(record.inputs))
        return Completion([], prompt_tokens=done.prompt_tokens, vectors=done.vectors,
                          latency_s=time.perf_counter() - start)

    def _media_prompt(self, record: BatchRecord) -> MediaPrompt:
        from edge_llm.images import decode_image, image_file_bytes

        messages, refs = _marked_messages(record)
        images = [decode_image(image_file_bytes(ref, param=ref[:80]), param=ref[:80]) for ref in refs]
        return MediaPrompt(self.engine.chat_prompt(messages), images)

    def interrupt(self) -> None:
        pass  # the workers see `stop` at their next token and cancel their requests

    def close(self) -> None:
        self.engine.close()


class HTTPBackend:
    """Runs records against an OpenAI-compatible server: /v1/completions for prompts,
    /v1/chat/completions for messages. Sends only the sampling fields the user set, so the
    server's own defaults apply to the rest."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, concurrency: int = 4) -> None:
        import httpx

        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        import httpx

        try:
            response = self.client.get(f"{self.base}/models")
            response.raise_for_status()
            models = response.json().get("data") or []
        except (httpx.HTTPError, ValueError) as exc:
            raise EdgeLLMError(f"cannot list models at {self.base}/models: {exc}") from None
        if not models:
            raise EdgeLLMError(f"the server at {self.base} lists no models; name one with -m")
        return models[0]["id"]

    def run(self, record: BatchRecord, params: SamplingParams, explicit: dict[str, Any],
            stop: threading.Event) -> Completion:
        import httpx

        if record.inputs is not None:
            return self._pooled(record)
        body: dict[str, Any] = {"model": self.model, **_json_safe(explicit)}
        if record.messages is not None:
            route, body["messages"] = "chat/completions", _with_image_parts(record)
        else:
            route, body["prompt"] = "completions", record.prompt
        start = time.perf_counter()
        try:
            # ASCII JSON: httpx's own encoder fails on a lone surrogate that the input may carry.
            response = self.client.post(f"{self.base}/{route}", content=json.dumps(body, allow_nan=False),
                                        headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise _RecordFailed(f"request failed: {exc}", "http_error") from None
        latency = time.perf_counter() - start
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code != 200:
            error = payload.get("error") if isinstance(payload, dict) else None
            message = error.get("message") if isinstance(error, dict) else response.text[:500]
            raise _RecordFailed(f"server answered {response.status_code}: {message}",
                                (error or {}).get("code") or f"http_{response.status_code}")
        choices = []
        for i, choice in enumerate(sorted(payload.get("choices", []), key=lambda c: c.get("index", 0))):
            text = (choice["message"].get("content") or "") if "message" in choice else choice.get("text", "")
            choices.append(Delta(text=text, index=i, finish_reason=choice.get("finish_reason")))
        if not choices:
            raise _RecordFailed("the server's answer has no choices", "bad_response")
        usage = payload.get("usage") or {}
        per_choice = (usage.get("completion_tokens") or 0)
        choices[0].usage = Usage(completion_tokens=per_choice)  # the server reports one total
        for c in choices[1:]:
            c.usage = Usage()
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Completion(choices, prompt_tokens=usage.get("prompt_tokens") or 0, cached_tokens=cached,
                          latency_s=latency)

    def _pooled(self, record: BatchRecord) -> Completion:
        if record.query is not None:
            route, body = "rerank", {"model": self.model, "query": record.query, "documents": record.inputs}
        else:
            route, body = "embeddings", {"model": self.model, "input": record.inputs}
        start = time.perf_counter()
        payload = self._post(route, body)
        usage = payload.get("usage") or {}
        if record.query is not None:
            scores = [0.0] * len(record.inputs)
            for result in payload.get("results", []):
                scores[result["index"]] = result["relevance_score"]
            return Completion([], prompt_tokens=usage.get("prompt_tokens") or 0, scores=scores,
                              latency_s=time.perf_counter() - start)
        vectors = [d["embedding"] for d in sorted(payload.get("data", []), key=lambda d: d["index"])]
        return Completion([], prompt_tokens=usage.get("prompt_tokens") or 0, vectors=vectors,
                          latency_s=time.perf_counter() - start)

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            response = self.client.post(f"{self.base}/{route}", content=json.dumps(body, allow_nan=False),
                                        headers={"Content-Type": "application/json"})
            payload = response.json()
        except httpx.HTTPError as exc:
            raise _RecordFailed(f"request failed: {exc}", "http_error") from None
        except ValueError:
            payload = {}
        if response.status_code != 200 or not isinstance(payload, dict):
            error = payload.get("error") if isinstance(payload, dict) else None
            message = error.get("message") if isinstance(error, dict) else response.text[:500]
            raise _RecordFailed(f"server answered {response.status_code}: {message}",
                                (error or {}).get("code") if isinstance(error, dict) else f"http_{response.status_code}")
        return payload

    def interrupt(self) -> None:
        self.client.close()  # requests in flight fail at once instead of running to the end

    def close(self) -> None:
        self.client.close()


def _has_parts(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


def _last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise InvalidParameterError("a record with images needs a user message", param="images")


def _marked_messages(record: BatchRecord) -> tuple[list[dict], list[str]]:
    """Messages for the chat template, each image (an OpenAI image_url part, or one of the record's
    `images`, which go before the last user message's text) as MEDIA_MARKER; the images' refs."""
    from edge_llm.server.media import join_parts

    refs: list[str] = []
    out = []
    last = _last_user(record.messages) if record.images else -1
    for i, message in enumerate(record.messages):
        parts = [MEDIA_MARKER] * len(record.images) if i == last else []
        refs += record.images if i == last else []
        content = message.get("content")
        for part in content if isinstance(content, list) else [content or ""]:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                refs.append(url.get("url", "") if isinstance(url, dict) else str(url))
                parts.append(MEDIA_MARKER)
            else:
                raise InvalidParameterError(f"message {i}: unsupported content part {part!r:.60}", param="messages")
        out.append({**message, "content": join_parts(parts) if MEDIA_MARKER in parts else "".join(parts)})
    return out, refs


def _with_image_parts(record: BatchRecord) -> list[dict]:
    """For a server: the record's `images` as data: URL image_url parts before the last user text."""
    if not record.images:
        return record.messages
    import base64

    from edge_llm.images import image_file_bytes

    messages = [dict(m) for m in record.messages]
    last = _last_user(messages)
    parts = []
    for ref in record.images:
        url = ref if ref.startswith("data:") else \
            "data:image/png;base64," + base64.b64encode(image_file_bytes(ref, param=ref[:80])).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    content = messages[last].get("content")
    messages[last]["content"] = parts + (content if isinstance(content, list) else [{"type": "text", "text": content or ""}])
    return messages


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


class _Stopped(Exception):
    """The run is being interrupted; the record is not written and runs again on resume."""


class _RecordFailed(Exception):
    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.message, self.error_type = message, error_type


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    total: int = 0  # records in the input
    skipped: int = 0  # already done in the output
    done: int = 0
    errors: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class BatchRunner:
    def __init__(self, backend: Backend, base: SamplingParams, explicit: dict[str, Any], *,
                 concurrency: int) -> None:
        self.backend = backend
        self.base = base
        self.explicit = explicit  # sampling fields set on the command line
        self.concurrency = max(1, concurrency)
        self.stop = threading.Event()

    def params_for(self, record: BatchRecord) -> tuple[SamplingParams, dict[str, Any]]:
        """Command-line sampling values, overridden by the record's own fields."""
        if not record.sampling:
            return self.base, self.explicit
        return self.base.replace(**record.sampling), {**self.explicit, **record.sampling}

    def run_one(self, record: BatchRecord) -> dict[str, Any]:
        if record.error is not None:
            return error_record(record, record.error, record.error_type)
        try:
            params, explicit = self.params_for(record)
            return result_record(record, self.backend.run(record, params, explicit, self.stop))
        except _RecordFailed as exc:
            return error_record(record, f"line {record.line}: {exc.message}", exc.error_type)
        except EdgeLLMError as exc:
            return error_record(record, f"line {record.line}: {exc.message}", exc.code or exc.type)
        except _Stopped:
            raise
        except Exception as exc:  # e.g. a chat template that fails on this record's messages
            return error_record(record, f"line {record.line}: {type(exc).__name__}: {exc}", "internal_error")

    def run(self, records: Iterator[BatchRecord], writer: OutputWriter, done: set[str],
            progress: Progress | None = None) -> BatchSummary:
        summary = BatchSummary()
        start = time.perf_counter()
        pending: dict[Future, BatchRecord] = {}
        # Workers stop at the next token when interrupted; records in flight are not written.
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="edge-llm-batch")
        try:
            for record in records:
                summary.total += 1
                if record.key in done:
                    summary.skipped += 1
                    if progress:
                        progress.advance_skipped()
                    continue
                done.add(record.key)
                # Keep a small queue ahead of the workers, not the whole file in memory.
                while len(pending) >= 2 * self.concurrency:
                    self._drain(pending, writer, summary, progress, block=True)
                pending[pool.submit(self.run_one, record)] = record
            while pending:
                self._drain(pending, writer, summary, progress, block=True)
        except KeyboardInterrupt:
            self.stop.set()
            self.backend.interrupt()
            for future in pending:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            summary.seconds = time.perf_counter() - start
        return summary

    def _drain(self, pending: dict[Future, BatchRecord], writer: OutputWriter, summary: BatchSummary,
               progress: Progress | None, *, block: bool) -> None:
        finished, _ = wait(list(pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            record = pending.pop(future)
            try:
                out = future.result()
            except _Stopped:
                continue
            writer.write(out)
            if "error" in out:
                summary.errors += 1
            else:
                summary.done += 1
                summary.completion_tokens += out["usage"].get("completion_tokens", 0)
            if progress:
                progress.advance(out)
            del record


class Progress:
    """A progress bar on stderr: records/s, generated tokens/s, ETA."""

    def __init__(self, total: int | None, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.enabled = enabled
        self.tokens = 0
        self.errors = 0
        self.finished = 0
        self.start = time.perf_counter()
        self._bar = RichProgress(
            TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled, transient=False)
        self._task = self._bar.add_task("batch", total=total, rates="")

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def advance_skipped(self) -> None:
        self._bar.advance(self._task)

    def advance(self, out: dict[str, Any]) -> None:
        self.finished += 1
        if "error" in out:
            self.errors += 1
        else:
            self.tokens += out["usage"].get("completion_tokens", 0)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{self.finished / elapsed:.2f} rec/s  {self.tokens / elapsed:.1f} tok/s"
        if self.errors:
            rates += f"  {self.errors} errors"
        self._bar.update(self._task, advance=1, rates=rates)


def count_records(path: Path) -> int:
    with os_errors(path, "read"), open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="input JSONL: {\"id\"?, \"prompt\"} or {\"id\"?, \"messages\"} per line "
                                      "({\"input\"} for an embedding model, {\"query\", \"documents\"} for a reranker)")
    parser.add_argument("-o", "--output", required=True, help="output JSONL (appended to; re-running resumes)")
    parser.add_argument("--url", default=None,
                        help="run against an OpenAI-compatible server (e.g. http://127.0.0.1:8080) instead of "
                             "loading the model; -m then names the server's model")
    parser.add_argument("--api-key", default=os.environ.get("EDGE_LLM_API_KEY"), help="with --url")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request with --url")
    parser.add_argument("--template", default=None,
                        help="build the prompt from the record's fields, str.format style, e.g. "
                             "'{prompt}' or 'Q: {question}\\nA:' (write literal braces as {{ }})")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt (or --template text) as a user message through the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--sort", action="store_true", help="rewrite the output in input order at the end")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_flags(parser, defaults={"n_parallel": 4})
    add_sampling_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_path, out_path = Path(args.input), Path(args.output)
    if not in_path.is_file():
        raise EdgeLLMError(f"input file not found: {in_path}")
    if in_path.resolve() == out_path.resolve():
        raise EdgeLLMError("the output must be a different file from the input")
    base = sampling_params(args)
    explicit = {**given_sampling(args), "max_tokens": base.max_tokens}  # what is sent to a server
    if args.template is not None:
        _check_template(args.template)

    check_output_path(out_path)  # before the model loads: a bad -o fails at once
    done = load_done(out_path)
    options = load_options(args)
    if args.url:  # -np: requests in flight at once
        concurrency = options.resolve().n_parallel
        backend: Backend = HTTPBackend(args.url, model=args.model, api_key=args.api_key, timeout=args.timeout,
                                       concurrency=concurrency)
    else:
        engine = load_engine(args.model, engine=args.engine, options=options, config=args.config)
        concurrency = engine.n_parallel if engine.kind == "chat" else POOLED_CONCURRENCY
        backend = EngineBackend(engine)
    runner = BatchRunner(backend, base, explicit, concurrency=concurrency)
    writer = OutputWriter(out_path)
    # SIGTERM ends the run like Ctrl-C: finished records are on disk, the rest run on resume.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    summary = None
    try:
        records = read_records(in_path, template=args.template, chat=args.chat, system=args.system)
        with Progress(count_records(in_path), enabled=args.progress) as progress:
            summary = runner.run(records, writer, done, progress)
    finally:
        writer.close()
        backend.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.sort:
        sort_output(out_path)
    print(f"edge-llm batch: {summary.done} done, {summary.errors} errors, {summary.skipped} already in "
          f"{out_path}; {summary.completion_tokens} tokens in {summary.seconds:.1f} s", file=sys.stderr)
    return 0


def _check_template(template: str) -> None:
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidParameterError(f"invalid --template: {exc} (write literal braces as {{{{ }}}})",
                                    param="template") from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
