"""Request and response bodies. They are the OpenAPI schema (/openapi.json) and the first line of
validation: a body that does not fit gets a 400 naming the field before any model is touched.

Field names and meanings follow OpenAI's API, with vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, include_stop_str_in_output). Fields a client may
send that edge-llm does not act on are ignored, as OpenAI and vLLM do for unknown fields, except
where ignoring would change the answer silently (suffix, dimensions, beam search):
those are refused with a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Ranges checked here are the ones OpenAI documents; the finer ones (temperature, top_p ...) are
# checked once, by SamplingParams, so the HTTP and Python APIs refuse the same values.
MAX_BATCH = 32  # prompts in one /v1/completions request, or inputs in one /v1/embeddings request
# Inputs in one embeddings request (OpenAI's limit), documents in one rerank request (Cohere's): a
# large request shares the pooled decodes with the others (engines/pooled.py) and stops when its
# client leaves.
MAX_EMBEDDING_INPUTS = 2048
MAX_RERANK_DOCUMENTS = 1000


class RequestBody(BaseModel):
    """A request body, or a part of one, of any API: fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore")


Stop = str | list[str] | None
# The ranges SamplingParams enforces, stated in the schema too, so clients (and schema-driven
# fuzzers) know them; SamplingParams still checks the combinations. Numbers are strict: in
# pydantic's lax mode `"max_tokens": true` would be taken as 1, and "0.5" as a number.
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=100.0)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0)]
TopK = Annotated[StrictInt, Field(ge=-1)]
MinP = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[StrictFloat, Field(gt=0.0, le=10.0)]
MaxTokens = Annotated[StrictInt, Field(ge=1)]
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Choices = Annotated[StrictInt, Field(ge=1, le=16)]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]
DraftMax = Annotated[StrictInt, Field(ge=0, le=256)]
# A prompt or an embedding input: text, texts, token ids, or lists of token ids.
TextsOrTokens = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """Sampling fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = Field(None, description="a served model's name; default: the first one")
    n: Choices = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="-1 disables; vLLM extension")
    min_p: MinP | None = Field(None, description="vLLM extension")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = Field(None, description="vLLM extension; 1.0 is off")
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: MaxTokens | None = Field(None, description="capped by the model's context")
    seed: Seed | None = None
    draft_max: DraftMax | None = Field(None, description="edge-llm extension: the most drafted tokens per step "
                                       "(speculative decoding), up to the server's --draft-max; 0: none")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, StrictFloat | StrictInt] | list[list[StrictInt | StrictFloat]] | None = Field(
        None, description="token id -> bias in [-100, 100], added to its logit (OpenAI's map; llama-server's "
        "[[id, bias], ...] list too); at most 1024 tokens")
    user: str | None = None


# Request fields that SamplingParams takes under the same name (max_tokens aside: the pipeline caps it).
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "seed",
                   "draft_max")


def sampling_fields(body: BaseModel) -> dict[str, Any]:
    """The SamplingParams fields a request body has (vLLM's /generate body has fewer)."""
    return {name: getattr(body, name) for name in SAMPLING_FIELDS if name in type(body).model_fields}


# -- chat -----------------------------------------------------------------------------------------


class ImageURL(RequestBody):
    url: str = Field(description="a data: URL (data:image/png;base64,...); http(s) only from hosts the server "
                                 "allows (--allow-image-urls)")
    detail: str | None = Field(None, description="accepted and ignored")


class ContentPart(RequestBody):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = Field(None, description="for type image_url (models with a vision projector)")


class FunctionCall(RequestBody):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(RequestBody):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(None, description="earlier thinking, for templates that render it")


class FunctionDefinition(RequestBody):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(RequestBody):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(RequestBody):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_format: Literal["auto", "deepseek", "none"] | None = Field(
        None, description="llama-server's: none keeps <think> text inline in content; default: the server's")


class CompletionRequest(SamplingFields):
    prompt: TextsOrTokens
    echo: bool = False
    logprobs: TopLogprobs | None = None
    best_of: StrictInt | None = Field(None, description="only best_of == n is supported")
    suffix: str | None = Field(None, description="not supported (no fill-in-the-middle)")
    response_format: ResponseFormat | None = None


class EmbeddingRequest(RequestBody):
    model: str | None = None
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, description="not supported: the model's own size is returned")
    user: str | None = None
    embd_normalize: StrictInt = Field(2, ge=-1, le=64, description=(
        "llama-server's: -1 none, 0 max-abs scaled to int16, 1 taxicab, 2 euclidean (default), >2 p-norm"))


class RerankDocument(RequestBody):
    text: StrictStr


class RerankRequest(RequestBody):
    """llama-server's (Jina's) and Cohere's body, and TEI's (`texts`, `return_text`)."""

    model: str | None = None
    query: StrictStr
    documents: list[StrictStr | RerankDocument] | None = None
    texts: list[StrictStr] | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
    return_text: StrictBool = False


class TokenizeRequest(RequestBody):
    """llama-server's body ({"content"}) and vLLM's ({"prompt"}) both work."""

    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    add_special: bool = Field(False, description="add the model's BOS token if it uses one")
    add_special_tokens: bool | None = Field(None, description="vLLM's name for add_special")
    with_pieces: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]


# -- responses ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error statuses an OpenAI-shaped route documents in the OpenAPI schema (a route's `responses=`).
DOCUMENTED_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                       (413, "body too large"), (503, "overloaded; retry after Retry-After seconds")]
}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edge-llm"
    loaded: bool = False
    peer: str | None = None
    # What it serves: chat (chat and completions), embedding (/v1/embeddings), rerank (/v1/rerank);
    # None for a peer's model (the peer says).
    kind: Literal["chat", "embedding", "rerank"] | None = None
    capabilities: list[str] = Field(default_factory=lambda: ["completion"],
                                    description="edge-llm extension: 'vision' when the model takes images")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int] = Field(description="the token's text, or its bytes when not whole UTF-8")


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    content: str
    prompt: str = Field(description="the same text, under vLLM's name")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class HealthResponse(BaseModel):
    status: str


# -- the simple APIs of existing deployments ---------------------------------------------------------


class VLLMGenerateRequest(RequestBody):
    """vLLM's legacy api_server body; its defaults are vLLM's SamplingParams defaults."""

    prompt: str
    model: str | None = None
    n: Choices = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    max_tokens: MaxTokens | None = 16
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    seed: Seed | None = None
    use_beam_search: bool = Field(False, description="beam search is not supported: true is refused")
    stream: bool = False


class VLLMGenerateResponse(BaseModel):
    text: list[str] = Field(description="prompt + completion, one per choice")


class InferenceRequest(RequestBody):
    """A mosec-style model service: the prompt is continued as plain text (no chat template)."""

    prompt: str
    model: str | None = None
    max_tokens: MaxTokens | None = 256
    temperature: Temperature | None = None


class InferenceResponse(BaseModel):
    generated: str = Field(description="the completion, without the prompt")


class DemoChatRequest(RequestBody):
    """The common FastAPI chat demo (ChatGLM's api.py): one user turn plus [[query, response], ...]."""

    prompt: str
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = []
    model: str | None = None
    max_length: MaxTokens | None = Field(None, description="prompt + response tokens at most")
    top_p: TopP | None = None
    temperature: Temperature | None = None


class DemoChatResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int = 200
    time: str = Field(description="local time, %Y-%m-%d %H:%M:%S")

