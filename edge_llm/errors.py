"""The one exception family of edge-llm.

The CLI prints an EdgeLLMError as a single line; the server turns it into an OpenAI-style
error body using `status`, `type` and `code`.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """An error the user can cause and fix; never shown with a traceback."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameterError(EdgeLLMError):
    code = "invalid_parameter"


class ChatTemplateError(InvalidParameterError):
    """A chat template failed, was refused by the sandbox, or was too expensive to render."""

    code = "chat_template_error"


class ModelNotFoundError(EdgeLLMError):
    status = 404
    code = "model_not_found"


class ServerSideError(EdgeLLMError):
    """Not the request's fault: the server's state or setup (HTTP 5xx, OpenAI's "server_error")."""

    status = 500
    type = "server_error"


class ModelLoadError(ServerSideError):
    code = "model_load_failed"


class ContextLengthError(EdgeLLMError):
    code = "context_length_exceeded"


class OverloadedError(ServerSideError):
    """The engine's queue is full; the server answers 503 with Retry-After."""

    status = 503
    code = "overloaded"


class MissingExtraError(ServerSideError):
    """An optional dependency is not installed."""

    code = "missing_dependency"

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; run: pip install 'edge-llm[{extra}]'")
