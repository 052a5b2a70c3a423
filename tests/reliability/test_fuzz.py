"""Fuzz: schema-driven fuzzing of every route (schemathesis, from the server's own OpenAPI
document, valid and invalid bodies) and hand-written hostile inputs, against a real
`edge-llm serve` process. The server must never answer 5xx, never hang, and never log a traceback."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from server_process import ServerProcess, write_models_toml

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]
# One slot holds 128 tokens, so a fuzzed request that may generate "as much as fits" stays short.
N_CTX, N_PARALLEL = 256, 2
NO_HANG_SECONDS = 120
EXAMPLES_PER_OPERATION = 6
TEMPLATE_PAYLOADS = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "own-global": "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "lambda": "{{ strftime_now.__globals__['os'].system('touch MARKER') }}",
    "format": "{{ '{0.__class__.__init__.__globals__[os]}'.format(messages) }}",
    "format-map": "{{ '{x.__init__.__globals__}'.format_map({'x': cycler}) }}",
    "mutate": "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "context": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "namespace": "{% set ns = namespace(a=1) %}{{ ns.__init__.__globals__['os'].system('touch MARKER') }}",
    "loop": "{% for m in messages %}{{ loop.__class__.__init__.__globals__['os'].system('touch MARKER') }}{% endfor %}",
}

# Templates that try to hang or exhaust the server instead: each must be a 400 within the sandbox's
# bounds (edge_llm/template_sandbox.py), and none may hold up other requests or the shutdown.
EXPENSIVE_PAYLOADS = {
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge-range": "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "recursive-macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "ten-gigabytes": "{{ 'a' * 10**10 }}",
}


def malicious_template(marker: Path) -> str:
    payloads = {**TEMPLATE_PAYLOADS, **EXPENSIVE_PAYLOADS}
    branches = "".join(f"{{%- {'if' if i == 0 else 'elif'} c == '{name}' -%}}{payload.replace('MARKER', str(marker))}"
                       for i, (name, payload) in enumerate(payloads.items()))
    return ("{%- set c = messages[-1]['content'] -%}" + branches +
            "{%- else -%}<|im_start|>user\n{{ c }}<|im_end|>\n<|im_start|>assistant\n{%- endif -%}")


def gguf_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of `src` whose tokenizer.chat_template is `template` (gguf-py's own metadata copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    return dst


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sandbox") / "escaped"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path, marker):
    tmp = tmp_path_factory.mktemp("fuzz")
    evil = gguf_with_template(demo_path, tmp / "evil.gguf", malicious_template(marker))
    config = write_models_toml(tmp / "models.toml", {"fuzz": demo_path, "evil": evil}, n_ctx=N_CTX)
    with ServerProcess(["--config", str(config), "fuzz", "evil", "-np", str(N_PARALLEL), "-t", "1",
                        "--keep-alive", "-1", "--preload"], tmp / "serve.log") as proc:
        yield proc.wait_healthy()
    log = proc.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-5000:]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_route_never_answers_5xx(server, mode):
    """Each operation of /openapi.json, with bodies valid (positive) and invalid (negative) by its
    schema. Schemathesis drives hypothesis per operation; a 5xx or a hang (timeout) fails."""
    from hypothesis import given
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    calls = 0
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            nonlocal calls
            calls += 1
            response = case.call(timeout=NO_HANG_SECONDS)  # a hang fails as a timeout
            case.validate_response(response, checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:  # an operation without inputs has no invalid variant
            assert mode == "negative", operation.label
        except Exception as exc:
            raise AssertionError(f"{operation.label} ({mode}): {exc}") from exc
    assert calls >= len(operations) * (EXAMPLES_PER_OPERATION // 2 if mode == "positive" else 1), calls


# -- hand-written hostile inputs ------------------------------------------------------------------------


def post(server, path: str, content: bytes | str, timeout: float = NO_HANG_SECONDS) -> httpx.Response:
    return httpx.post(server.url + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def chat_body(**fields) -> dict:
    return {"model": "fuzz", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate", "/inference", "/"])
def test_invalid_utf8_body(server, path):
    body = b'{"model": "fuzz", "prompt": "\xff\xfe bad", "messages": [{"role": "user", "content": "\xc3\x28"}]}'
    assert_error(post(server, path, body), 400)


def test_ten_megabyte_body_is_refused(server):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "a" * (10 * 2**20)}]))
    assert_error(post(server, "/v1/chat/completions", big), 413)


def test_ten_megabyte_body_without_content_length(server):
    def chunks():
        yield b'{"model": "fuzz", "prompt": "'
        for _ in range(10):
            yield b"a" * 2**20
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=NO_HANG_SECONDS,
                          headers={"Content-Type": "application/json"})
    assert_error(response, 413)


def test_zero_token_prompts(server):
    assert_error(post(server, "/v1/completions", json.dumps({"model": "fuzz", "prompt": []})), 400)
    assert_error(post(server, "/v1/chat/completions", json.dumps(chat_body(messages=[]))), 400)
    empty = post(server, "/v1/completions", json.dumps({"model": "fuzz", "prompt": "", "max_tokens": 2}))
    assert empty.status_code in (200, 400), empty.text  # "" may still hold the BOS token


def test_prompts_at_and_past_the_context(server):
    slot = httpx.post(server.url + "/tokenize", json={"model": "fuzz", "prompt": "x"}, timeout=30).json()["max_model_len"]
    token = httpx.post(server.url + "/tokenize", json={"model": "fuzz", "prompt": " stone", "add_special": False},
                       timeout=30).json()["tokens"][0]
    fits = post(server, "/v1/completions", json.dumps({"model": "fuzz", "prompt": [token] * (slot - 1),
                                                        "max_tokens": 5, "ignore_eos": True}))
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["completion_tokens"] == 1  # only one cell was left
    for n in (slot, slot + 1):
        error = assert_error(post(server, "/v1/completions", json.dumps({"model": "fuzz", "prompt": [token] * n})),
                             400)
        assert error["code"] == "context_length_exceeded"
    long_text = "stone " * (slot + 1)
    error = assert_error(post(server, "/v1/chat/completions",
                              json.dumps(chat_body(messages=[{"role": "user", "content": long_text}]))), 400)
    assert error["code"] == "context_length_exceeded"


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
HUGE = ["1e308", "-1e308", str(10**400), str(-(10**400)), "18446744073709551617"]
SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "max_tokens", "seed", "n", "top_logprobs"]


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_non_finite_and_huge_numbers(server, field):
    base = json.dumps(chat_body(logprobs=True))[:-1]  # the body without its closing brace
    for literal in NON_FINITE:
        assert_error(post(server, "/v1/chat/completions", f'{base}, "{field}": {literal}}}'), 400)
    for literal in HUGE:
        response = post(server, "/v1/chat/completions", f'{base}, "{field}": {literal}}}')
        assert response.status_code in (200, 400), (literal, response.text[:300])


@pytest.mark.parametrize("depth", [64, 5_000, 200_000])
def test_deeply_nested_json(server, depth):
    nested = "[" * depth + "]" * depth
    response = post(server, "/v1/chat/completions",
                    f'{{"model": "fuzz", "messages": [{{"role": "user", "content": {nested}}}]}}')
    assert_error(response, 400)
    nested_objects = '{"a":' * depth + "1" + "}" * depth
    response = post(server, "/v1/completions", f'{{"model": "fuzz", "prompt": "x", "logit_bias": {nested_objects}}}')
    assert_error(response, 400)


@pytest.mark.parametrize("payload", list(TEMPLATE_PAYLOADS))
def test_malicious_chat_template_cannot_escape_the_sandbox(server, marker, payload):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, json={
        "model": "evil", "messages": [{"role": "user", "content": payload}], "max_tokens": 2})
    assert response.status_code < 500, response.text[:500]
    assert not marker.exists(), f"the template payload {payload!r} ran a command"
    for leak in ("<module", "<function", "subclasses", "popen", "__builtins__", "injected"):
        assert leak not in response.text, response.text[:500]


def test_server_still_answers_after_the_hostile_inputs(server):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, json=chat_body())
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    evil_but_benign = httpx.post(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, json={
        "model": "evil", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
    assert evil_but_benign.status_code == 200


@pytest.mark.parametrize("payload", list(EXPENSIVE_PAYLOADS))
def test_expensive_chat_templates_are_a_400(server, payload):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, json={
        "model": "evil", "messages": [{"role": "user", "content": payload}], "max_tokens": 2})
    error = assert_error(response, 400)
    assert error["code"] == "chat_template_error" and "too expensive" in error["message"], error


class TemplateAttack:
    """Clients that keep sending the hanging-template request to `evil`, each as soon as its last
    one is answered, counting how many are in flight."""

    def __init__(self, url: str, clients: int = 8, path: str = "/v1/chat/completions",
                 body: dict | None = None) -> None:
        self.url, self.in_flight, self.answers = url, 0, []
        self.path = path
        self.body = body or {"model": "evil", "messages": [{"role": "user", "content": "nested-loops"}],
                             "max_tokens": 2}
        self.lock, self.first_answer, self.stop = threading.Lock(), threading.Event(), threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.in_flight += 1
            try:
                response = httpx.post(self.url + self.path, timeout=NO_HANG_SECONDS, json=self.body)
                error = response.json().get("error", {})
                answer = (response.status_code, error.get("code", error.get("type")))  # OpenAI's or Anthropic's
            except (httpx.HTTPError, ValueError) as exc:
                answer = (type(exc).__name__, None)
            with self.lock:
                self.in_flight -= 1
                self.answers.append(answer)
            self.first_answer.set()

    def __enter__(self) -> TemplateAttack:
        for thread in self.threads:
            thread.start()
        # The server answered one: the renders are under way, and the others are waiting on them.
        assert self.first_answer.wait(NO_HANG_SECONDS), "the hanging template was never answered"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(NO_HANG_SECONDS)

    def assert_refused_cleanly(self, *also: tuple, refusal: tuple = (400, "chat_template_error")) -> None:
        """Every answer a 400 naming the template, or a 503 while its renders were busy."""
        allowed = (refusal, (503, "overloaded"), *also)
        assert all(answer in allowed for answer in self.answers), self.answers
        assert refusal in self.answers


def test_a_hanging_template_holds_up_no_other_request(server):
    """Before the sandbox, 7 such requests filled the worker threads and every model's chat,
    completions and tokenize hung. Each request here must be answered while the attack goes on."""
    requests = [
        ("/v1/chat/completions", {"model": "fuzz", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/v1/completions", {"model": "fuzz", "prompt": "Hello", "max_tokens": 2}),
        ("/v1/completions", {"model": "evil", "prompt": "Hello", "max_tokens": 2}),
        ("/tokenize", {"model": "fuzz", "content": "Hello world"}),
        ("/tokenize", {"model": "evil", "content": "Hello world"}),
        ("/v1/chat/completions", {"model": "evil", "messages": [{"role": "user", "content": "Hello"}],
                                  "max_tokens": 2}),
    ]
    with TemplateAttack(server.url) as attack:
        for path, body in requests:
            response = httpx.post(server.url + path, json=body, timeout=NO_HANG_SECONDS)
            in_flight = attack.in_flight
            if response.status_code == 503 and body["model"] == "evil":  # its template is busy: allowed
                continue
            assert response.status_code == 200, (path, body, response.text[:300])
            assert in_flight > 0, "the attack was over before the request was answered"
    attack.assert_refused_cleanly()


def test_count_tokens_waits_for_the_template_render_slot(server):
    """/v1/messages/count_tokens renders the template as generation does: 12 of them at a hanging
    template used to hold every shared worker thread (6 on 2 cores), so another model's 2-token
    chat waited behind their renders. Now they queue for the model's one render slot (a 503 for
    those that wait longer than a worst-case render) and other requests go on."""
    body = {"model": "evil", "messages": [{"role": "user", "content": "nested-loops"}]}
    with TemplateAttack(server.url, clients=12, path="/v1/messages/count_tokens", body=body) as attack:
        for path, request in [
            ("/v1/chat/completions", {"model": "fuzz", "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}),
            ("/v1/messages/count_tokens", {"model": "fuzz", "messages": [{"role": "user", "content": "Hi"}]}),
            ("/tokenize", {"model": "fuzz", "content": "Hello world"}),
        ]:
            response = httpx.post(server.url + path, json=request, timeout=NO_HANG_SECONDS)
            assert response.status_code == 200, (path, response.text[:300])
            assert attack.in_flight > 0, "the attack was over before the request was answered"
        assert wait_for(lambda: (503, "overloaded_error") in attack.answers), attack.answers
    attack.assert_refused_cleanly((503, "overloaded_error"), refusal=(400, "invalid_request_error"))


def wait_for(predicate, timeout: float = NO_HANG_SECONDS) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


def test_sigterm_is_not_held_up_by_a_hanging_template(tmp_path, demo_path):
    evil = gguf_with_template(demo_path, tmp_path / "evil.gguf", malicious_template(tmp_path / "marker"))
    config = write_models_toml(tmp_path / "models.toml", {"evil": evil}, n_ctx=N_CTX)
    server = ServerProcess(["--config", str(config), "-np", "2", "-t", "1", "--keep-alive", "-1", "--preload"],
                           tmp_path / "serve.log")
    try:
        server.wait_healthy()
        with TemplateAttack(server.url) as attack:
            server.proc.send_signal(signal.SIGTERM)
            status = server.proc.wait(timeout=NO_HANG_SECONDS)
        assert status == 0, status
        # Requests sent after the signal find the port closed, or a connection closed by the shutdown.
        attack.assert_refused_cleanly(("ConnectError", None), ("RemoteProtocolError", None), ("ReadError", None))
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop(signal.SIGKILL)
