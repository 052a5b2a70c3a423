"""The exception family: what each error tells the server (HTTP status, OpenAI error type, code)."""

import pytest

from edge_llm import errors


@pytest.mark.parametrize("cls, status, type_, code", [
    (errors.EdgeLLMError, 400, "invalid_request_error", None),
    (errors.InvalidParameterError, 400, "invalid_request_error", "invalid_parameter"),
    (errors.ChatTemplateError, 400, "invalid_request_error", "chat_template_error"),
    (errors.ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (errors.ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (errors.ServerSideError, 500, "server_error", None),
    (errors.ModelLoadError, 500, "server_error", "model_load_failed"),
    (errors.OverloadedError, 503, "server_error", "overloaded"),
    (errors.MissingExtraError, 500, "server_error", "missing_dependency"),
])
def test_each_error_keeps_what_it_does_not_override(cls, status, type_, code):
    assert (cls.status, cls.type, cls.code) == (status, type_, code)


def test_an_error_carries_its_message_and_parameter():
    exc = errors.ChatTemplateError("the template failed", param="messages")
    assert isinstance(exc, errors.InvalidParameterError)
    assert (str(exc), exc.message, exc.param) == ("the template failed", "the template failed", "messages")
    missing = errors.MissingExtraError("vllm", "vllm")
    assert missing.message == "vllm is not installed; run: pip install 'edge-llm[vllm]'" and missing.param is None
