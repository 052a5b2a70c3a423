"""The one exception family of edge-llm.

The CLI prints an EdgeLLMError as a single line; the server turns it into an OpenAI-style
error body using `status`, `type` and `code`.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """An error the user can cause and fix; never shown with a traceback.

    A subclass states in its header only what differs from its parent, e.g.
    `class ModelNotFoundError(EdgeLLMError, status=404, code="model_not_found")`."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None,
                          code: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in (("status", status), ("type", type), ("code", code)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameterError(EdgeLLMError, code="invalid_parameter"):
    """A request field is out of range, malformed or not supported."""


class ChatTemplateError(InvalidParameterError, code="chat_template_error"):
    """A chat template failed, was refused by the sandbox, or was too expensive to render."""


class ModelNotFoundError(EdgeLLMError, status=404, code="model_not_found"):
    """The model asked for is not served, registered or downloaded here."""


class ContextLengthError(EdgeLLMError, code="context_length_exceeded"):
    """The input (with the tokens asked for) does not fit the context."""


class ServerSideError(EdgeLLMError, status=500, type="server_error"):
    """Not the request's fault: the server's state or setup (HTTP 5xx, OpenAI's "server_error")."""


class ModelLoadError(ServerSideError, code="model_load_failed"):
    """A model could not be loaded: unreadable, corrupt or unsupported files, or not enough memory."""


class OverloadedError(ServerSideError, status=503, code="overloaded"):
    """The engine's queue is full; the server answers 503 with Retry-After."""


class MissingExtraError(ServerSideError, code="missing_dependency"):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; run: pip install 'edge-llm[{extra}]'")
