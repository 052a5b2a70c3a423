"""How to load a model, declared once: `LoadOptions`.

Each field carries an `Option` (its command-line flags, its group in `--help`, its built-in
default, whether a models.toml entry may set it). From that one declaration come:
  - the flags of every command (options.add_load_flags), with llama.cpp's names and meanings;
  - an environment variable per flag, EDGE_LLM_ + the long flag (EDGE_LLM_CTX_SIZE for
    --ctx-size), read as that flag given another way, as llama.cpp reads LLAMA_ARG_CTX_SIZE;
  - the load settings a models.toml entry may carry (registry.ModelSpec), validated like the flags;
  - the built-in defaults (DEFAULTS).

Every field is None ("unset") until `LoadOptions.resolve`, which fills it in one order:
    a flag or an API argument > its environment variable > the model's registry entry
    > the command's own default (e.g. -np 1 for chat) > the built-in default.
Flags outrank the registry entry, as llama-server's command line outranks its model presets:
`chat -m qwen2-7b -c 512` means 512 whatever the entry says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from edge_llm.errors import InvalidParameterError

ENV_PREFIX = "EDGE_LLM_"

# Groups in --help; a command adds the groups it uses.
MODEL = "model"
GPU_ENGINES = "GPU engines (vllm, lmdeploy, transformers)"
PROMPT_CACHE = "prompt cache (llama.cpp engine)"
PREFIXES = "raw prompt format (instead of a chat template)"
QUEUE = "queue"
SPECULATIVE = "speculative decoding (llama.cpp engine)"


@dataclass(frozen=True)
class Option:
    """What a LoadOptions field is on the command line, in the environment and in models.toml."""

    flags: tuple[str, ...]  # the first long one names the environment variable; none: seed (from -s)
    help: str
    group: str = MODEL
    default: Any = None  # the built-in default; None: the engine decides (said in `help`)
    registry: bool = True  # a models.toml entry may set it
    off_flags: tuple[str, ...] = ()  # booleans: the flags that set it to false
    parse: Callable[[str], Any] | None = None  # text -> value, for types argparse can't read
    metavar: str | None = None
    bare: Any = None  # the value of the flag given without one (-fa alone means "on")
    env: bool = True  # False: no environment variable (values that don't fit one string)
    repeatable: bool = False  # the flag may be given again; each gives a {key: value}, merged
    default_text: str | None = None  # the default in words, where it depends on the machine (the docs' table)

    @property
    def env_name(self) -> str | None:
        long = next((f for f in self.flags if f.startswith("--")), None)
        return ENV_PREFIX + long[2:].replace("-", "_").upper() if (long and self.env) else None


def _opt(*flags: str, help: str, **details: Any) -> Option:
    return Option(flags=flags, help=help, **details)


DEFAULT_RAM_CAP = 8 * 2**30  # llama-server's --cache-ram default
DEFAULT_DISK_BUDGET = 8 * 2**30  # --cache-disk: what --cache-dir may hold


def default_ram_budget() -> int:
    """--cache-ram's default: a quarter of the machine's memory, at most llama-server's 8 GiB (on a
    16 GB laptop the weights, the KV cells and the rest of the system keep three quarters)."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return DEFAULT_RAM_CAP // 4
    return min(DEFAULT_RAM_CAP, total // 4)


def format_size(n: int) -> str:
    """Bytes as parse_size reads them back, to a tenth of a unit: 4294967296 -> '4G'."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(n)


def parse_size(text: str) -> int:
    """'8G', '512MiB', '1.5g', '1000000' -> bytes (K/M/G/T are powers of 1024, as in llama.cpp)."""
    import re

    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8G, 512M, 1048576)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_shares(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace("/", ",").split(","))
    except ValueError:
        raise ValueError(f"expected numbers separated by commas, e.g. 3,1 (got {text!r})") from None


def parse_engine_arg(text: str) -> dict[str, Any]:
    """KEY=VALUE -> {key: value}; the value is read as JSON where it is JSON (true, 0.9, 4), else
    kept as text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE (got {text!r})")
    try:
        return {key.replace("-", "_"): json.loads(value)}
    except ValueError:
        return {key.replace("-", "_"): value}


def _unescape(text: str) -> str:
    from edge_llm.chat_format import unescape

    return unescape(text)


class LoadOptions(BaseModel):
    """How to load a model; the names follow llama.cpp's flags (-c, -t, -ngl, -fa, -ctk, -ctv, -np)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n_ctx: Annotated[int | None, Field(ge=0, le=2**32 - 1), _opt(  # llama.cpp's n_ctx is 32 bits
        "-c", "--ctx-size", "--max-model-len", metavar="N",
        help="context size in tokens, shared by the parallel slots (default: 4096, at most the model's; "
             "0 = the model's; --max-model-len is vLLM's name)")] = None
    n_threads: Annotated[int | None, Field(ge=1), _opt(
        "-t", "--threads", metavar="N",
        help="threads for generation, at most (default: one per core; see --adapt-threads)")] = None
    n_threads_batch: Annotated[int | None, Field(ge=1), _opt(
        "-tb", "--threads-batch", metavar="N", help="threads for prompt processing (default: same as -t)")] = None
    adapt_threads: Annotated[bool | None, _opt(
        "--adapt-threads", off_flags=("--no-adapt-threads",), default=True,
        help="use fewer than -t / -tb threads while other programs keep cores busy (--no-adapt-threads: "
             "always -t; llama.cpp's flash attention rounds differently with another thread count, so "
             "greedy output then never depends on the machine's load)")] = None
    n_batch: Annotated[int | None, Field(ge=1), _opt(
        "-b", "--batch-size", metavar="N", default=512, help="tokens evaluated per step (prompt chunk budget)")] = None
    n_gpu_layers: Annotated[int | None, Field(ge=-1), _opt(
        "-ngl", "--n-gpu-layers", "--gpu-layers", metavar="N", default=0,
        help="layers to offload to the GPU (-1 = all; needs a GPU build of llama-cpp-python)")] = None
    split_mode: Annotated[Literal["none", "layer", "row"] | None, _opt(
        "-sm", "--split-mode", default="layer",
        help="several GPUs: none (one GPU), layer (layers spread), row (rows of each matrix)")] = None
    tensor_split: Annotated[tuple[float, ...] | None, _opt(
        "-ts", "--tensor-split", parse=parse_shares, metavar="SHARES", help="share of the model per GPU, e.g. 3,1")] \
        = None
    main_gpu: Annotated[int | None, Field(ge=0), _opt(
        "-mg", "--main-gpu", metavar="N", default=0, help="the GPU for the whole model with --split-mode none")] = None
    flash_attn: Annotated[Literal["on", "off", "auto"] | None, _opt(
        "-fa", "--flash-attn", bare="on", default="auto", help="flash attention (bare -fa means on)")] = None
    cache_type_k: Annotated[str | None, _opt(
        "-ctk", "--cache-type-k", metavar="TYPE", default="f16", help="KV cache type for K: f16, q8_0, q4_0 ...")] \
        = None
    cache_type_v: Annotated[str | None, _opt(
        "-ctv", "--cache-type-v", metavar="TYPE", default="f16", help="KV cache type for V (quantized needs -fa)")] \
        = None
    n_parallel: Annotated[int | None, Field(ge=1), _opt(
        "-np", "--parallel", metavar="N", default=4, help="parallel sequences (slots) decoded together")] = None
    use_mlock: Annotated[bool | None, _opt(
        "--mlock", off_flags=("--no-mlock",), default=False, help="keep the weights in RAM (no swapping)")] = None
    use_mmap: Annotated[bool | None, _opt(
        "--mmap", off_flags=("--no-mmap",), default=True, help="map the weights (--no-mmap: read them)")] = None
    repack: Annotated[bool | None, _opt(
        "--repack", off_flags=("-nr", "--no-repack"), default=True,
        help="llama.cpp's repacked weight layouts for faster matmuls (-nr: off; then every weight type gives "
             "the same numbers at every batch size, so greedy output never depends on speculation or on "
             "other requests; see docs/design.md, speculative decoding)")] = None
    chat_format: Annotated[str | None, _opt(
        "--chat-format", metavar="NAME", default="auto",
        help="chat template: auto (the GGUF's own) or a built-in name")] = None
    mmproj: Annotated[str | None, _opt(
        "-mm", "--mmproj", metavar="FILE",
        help="the vision projector GGUF (llama.cpp's mmproj), for images in prompts (default: the one "
             "mmproj*.gguf beside a local model file, if there is exactly one; 'none': no projector)")] = None
    trust_content_markup: Annotated[bool | None, _opt(
        "--trust-content-markup", off_flags=("--no-trust-content-markup",), default=False, registry=False,
        help="chat messages may write the model's control tokens (<|im_end|> ...) and they count as the "
             "template's: for trusted clients only (default: message content is text)")] = None
    verbose: Annotated[bool | None, _opt(
        "-v", "--verbose", default=False, registry=False, help="show llama.cpp's own log")] = None
    seed: Annotated[int | None, _opt(help="the context's seed (from the sampling flag -s)", registry=False)] = None

    in_prefix: Annotated[str | None, _opt(
        "--in-prefix", group=PREFIXES, parse=_unescape, metavar="TEXT",
        help="text before each user turn, e.g. '<|im_start|>user\\n' (escapes like \\n read)")] = None
    in_suffix: Annotated[str | None, _opt(
        "--in-suffix", group=PREFIXES, parse=_unescape, metavar="TEXT",
        help="text after each user turn, e.g. '<|im_end|>\\n<|im_start|>assistant\\n'")] = None

    # The prompt cache beyond the slots (engines/prompt_cache.py) and the KV layout.
    cache_ram: Annotated[int | None, Field(ge=0), _opt(
        "-cram", "--cache-ram", group=PROMPT_CACHE, parse=parse_size, metavar="SIZE", registry=False,
        default=default_ram_budget(), default_text="a quarter of RAM, at most 8G",
        help="host memory for the KV states of conversations that lost their slot, e.g. 2G; 0 = off "
             "(by default a quarter of RAM, at most 8G; `serve` with several models shares it among them)")] = None
    cache_dir: Annotated[str | None, _opt(
        "--cache-dir", group=PROMPT_CACHE, metavar="DIR", registry=False,
        help="also keep them in DIR, so a restart or `chat --resume` continues without re-reading")] = None
    cache_disk: Annotated[int | None, Field(ge=0), _opt(
        "--cache-disk", group=PROMPT_CACHE, parse=parse_size, metavar="SIZE", registry=False,
        default=DEFAULT_DISK_BUDGET, default_text="8G",
        help="most bytes kept in --cache-dir (default 8G; least recently used files go first)")] = None
    kv_unified: Annotated[bool | None, _opt(
        "-kvu", "--kv-unified", group=PROMPT_CACHE, off_flags=("-no-kvu", "--no-kv-unified"), default=False,
        help="one KV pool: any conversation may use the whole -c while the others are idle "
             "(-no-kvu: each slot gets -c / -np cells)")] = None
    swa_full: Annotated[bool | None, _opt(
        "--swa-full", group=PROMPT_CACHE, off_flags=("--no-swa-full",), default=False,
        help="sliding-window models (Gemma 2/3 ...): keep every position in the window layers' KV too, "
             "so a cached conversation is reused from any point (default, as llama-server: only the "
             "window, far less memory; a cached prefix is reused while its window is still held)")] = None

    # Speculative decoding (engines/speculation.py), with llama-server's names where it has them.
    spec: Annotated[Literal["ngram", "draft", "off"] | None, _opt(
        "--spec", group=SPECULATIVE,
        help="draft tokens to verify in one step: ngram (copied from the prompt and the output so far), "
             "draft (a small model, -md), off (default: draft with -md, else ngram); drafting stops by "
             "itself where it would not pay")] = None
    draft_max: Annotated[int | None, Field(ge=1, le=256), _opt(
        "--draft-max", "--spec-draft-n-max", group=SPECULATIVE, metavar="N", default=16,
        help="the most tokens drafted per slot and step")] = None
    draft_min: Annotated[int | None, Field(ge=0, le=256), _opt(
        "--draft-min", "--spec-draft-n-min", group=SPECULATIVE, metavar="N", default=0,
        help="drafts shorter than this are not verified")] = None
    model_draft: Annotated[str | None, _opt(
        "-md", "--model-draft", group=SPECULATIVE, metavar="MODEL",
        help="the draft model for --spec draft: a GGUF (or registry name) with the model's vocabulary")] = None

    max_queue: Annotated[int | None, Field(ge=0), _opt(
        "--max-queue", group=QUEUE, metavar="N", default=64, registry=False,
        help="requests waiting for a slot, per model, beyond which the server answers 503")] = None

    # The heavier engines (transformers, vLLM, LMDeploy), with vLLM's names.
    tensor_parallel_size: Annotated[int | None, Field(ge=1), _opt(
        "--tensor-parallel-size", "--tp", group=GPU_ENGINES, metavar="N", default=1,
        help="GPUs to shard each layer over (vLLM, LMDeploy)")] = None
    pipeline_parallel_size: Annotated[int | None, Field(ge=1), _opt(
        "--pipeline-parallel-size", "--pp", group=GPU_ENGINES, metavar="N", default=1,
        help="pipeline stages, e.g. one per node (vLLM, with Ray)")] = None
    gpu_memory_utilization: Annotated[float | None, Field(gt=0, le=1), _opt(
        "--gpu-memory-utilization", group=GPU_ENGINES, metavar="SHARE",
        help="share of GPU memory the engine may take (vLLM; LMDeploy: share for the KV cache)")] = None
    quantization: Annotated[str | None, _opt(
        "--quantization", group=GPU_ENGINES, metavar="NAME", help="vLLM: awq, gptq, fp8 ...; LMDeploy: awq (W4A16)")] \
        = None
    dtype: Annotated[str | None, _opt(
        "--dtype", group=GPU_ENGINES, metavar="TYPE", help="auto, float16, bfloat16, float32")] = None
    distributed_executor_backend: Annotated[Literal["mp", "ray"] | None, _opt(
        "--distributed-executor-backend", group=GPU_ENGINES, registry=False,
        help="vLLM: ray to run --tp/--pp over several nodes")] = None
    # Engine-specific keywords passed through as they are: vLLM's AsyncEngineArgs (e.g.
    # enforce_eager), LMDeploy's engine config (backend = turbomind | pytorch, ...).
    extra: Annotated[dict[str, Any] | None, _opt(
        "--engine-arg", group=GPU_ENGINES, parse=parse_engine_arg, metavar="KEY=VALUE", default={}, registry=False,
        env=False, repeatable=True,
        help="passed to the engine as is, e.g. enforce_eager=true (vLLM), backend=pytorch (LMDeploy); "
             "repeatable")] = None

    # A command's own defaults (chat: -np 1), below the registry entry; set by options.load_options.
    _command_defaults: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def create(cls, values: Mapping[str, Any], *, command_defaults: Mapping[str, Any] | None = None,
               source: Callable[[str], str] | None = None) -> LoadOptions:
        """Build from plain values, raising InvalidParameterError that names where the bad value came
        from (`source(field)`: the flag, the environment variable, the models.toml key)."""
        try:
            options = cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            where = source(name) if source else name
            raise InvalidParameterError(f"{where}: {error['msg']} (got {error.get('input')!r})", param=name) \
                from None
        options._command_defaults = dict(command_defaults or {})
        return options

    def resolve(self, spec: Any | None = None, defaults: Mapping[str, Any] | None = None) -> LoadOptions:
        """Every unset field filled: from the registry entry `spec` (a ModelSpec) where it sets it,
        else the command's own default (`defaults`, then the ones given at `create`), else DEFAULTS.
        Fields left None are decided by the engine (n_ctx, n_threads) or mean "off". Resolving again
        changes nothing."""
        fallback = {**self._command_defaults, **(defaults or {})}
        filled = {}
        for name in LoadOptions.model_fields:
            value = getattr(self, name)
            if value is None and spec is not None and name in REGISTRY_FIELDS:
                value = getattr(spec, name)
            if value is None:
                value = fallback.get(name, DEFAULTS.get(name))
            filled[name] = dict(value) if isinstance(value, dict) else value  # no shared `extra`
        return LoadOptions(**filled)

    def replace(self, **changes: Any) -> LoadOptions:
        """A copy with these fields changed (validated), keeping the command's defaults."""
        options = LoadOptions(**{**self.model_dump(), **changes})
        options._command_defaults = dict(self._command_defaults)
        return options


def option_of(name: str) -> Option:
    return next(m for m in LoadOptions.model_fields[name].metadata if isinstance(m, Option))


OPTIONS: dict[str, Option] = {name: option_of(name) for name in LoadOptions.model_fields}
# The load settings a models.toml entry may carry (registry.ModelSpec's fields of these names).
REGISTRY_FIELDS: tuple[str, ...] = tuple(name for name, opt in OPTIONS.items() if opt.registry)
# Built-in defaults: llama.cpp's (llama-server's for -np); fields not here stay None.
DEFAULTS: dict[str, Any] = {name: opt.default for name, opt in OPTIONS.items() if opt.default is not None}


def value_type(name: str) -> Any:
    """The field's type without None: int, float, str, bool, a Literal, tuple[float, ...] ..."""
    annotation = LoadOptions.model_fields[name].annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        members = [a for a in get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    return annotation


def choices(name: str) -> tuple[str, ...] | None:
    kind = value_type(name)
    return get_args(kind) if get_origin(kind) is Literal else None


def parse_text(name: str, text: str) -> Any:
    """A flag's or an environment variable's text -> the field's value (ValueError if it doesn't fit)."""
    opt, kind = OPTIONS[name], value_type(name)
    if opt.parse is not None:
        return opt.parse(text)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "on", "yes"):
            return True
        if lowered in ("0", "false", "off", "no", ""):
            return False
        raise ValueError(f"expected true or false (got {text!r})")
    if kind in (int, float):
        return kind(text)
    allowed = choices(name)
    if allowed and text not in allowed:
        raise ValueError(f"expected one of {', '.join(allowed)} (got {text!r})")
    return text


def flag_table() -> str:
    """Every load option as a markdown table (docs/server.md's, written by scripts/gen_flag_table.py):
    flags, environment variable, built-in default, models.toml key and help, by --help group."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = []
    for group in dict.fromkeys(opt.group for opt in OPTIONS.values()):
        lines += [f"**{group}**", "", "| flag | environment variable | default | models.toml | meaning |",
                  "|---|---|---|---|---|"]
        for name, opt in OPTIONS.items():
            if opt.group != group or not opt.flags:
                continue
            flags = ", ".join(f"`{flag}`" for flag in (*opt.flags, *opt.off_flags))
            if opt.metavar or choices(name):
                flags += f" {opt.metavar or '{' + ','.join(choices(name)) + '}'}"
            default = (opt.default_text or "-" if opt.default in (None, {}) or opt.default_text
                       else f"`{_shown_default(opt.default)}`")
            env = f"`{opt.env_name}`" if opt.env_name else "-"
            key = f"`{name}`" if opt.registry else "-"
            lines.append(f"| {cell(flags)} | {env} | {cell(default)} | {key} | {cell(opt.help)} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _shown_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
