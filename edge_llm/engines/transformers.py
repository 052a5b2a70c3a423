"""The transformers engine (extra `hf`): an HF checkpoint folder on plain PyTorch, CPU or CUDA.

It is the reference for quality comparisons (float weights, transformers' own modelling code)
and the fallback for architectures llama.cpp does not run. It is not a server engine for load:
requests run one at a time (a lock), each with its own KV cache; `n > 1` choices share the
prompt's KV cache, copied, and run one after the other so each is exactly what `n = 1` gives.

Checkpoints are never loaded with trust_remote_code: a model whose config or tokenizer needs
custom code is refused with a clear error.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from edge_llm.engines.base import Delta, TokenLogprob, Usage
from edge_llm.engines.hf_tokens import HFVocabulary, checkpoint_folder
from edge_llm.engines.textstream import TextAssembler
from edge_llm.engines.threadbridge import iterate_in_thread
from edge_llm.errors import (
    ContextLengthError,
    InvalidParameterError,
    MissingExtraError,
    ModelLoadError,
)
from edge_llm.load_options import LoadOptions
from edge_llm.registry import ResolvedModel
from edge_llm.sampling import SamplingParams

DEFAULT_N_CTX = 4096
# Tokens that end a turn in the common chat formats; llama.cpp marks the same ones as
# end-of-generation by their text, so both engines stop at the same place.
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
             "<|eom_id|>", "</s>")


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ModuleNotFoundError as exc:
        raise MissingExtraError(exc.name or "transformers", "hf") from None
    return torch, transformers


class TransformersEngine(HFVocabulary):
    name = "transformers"
    grammars = False

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = (options or LoadOptions()).resolve(model.spec)
        path = checkpoint_folder(model, self.name, "(config.json + safetensors): use the llama.cpp engine for "
                                 "GGUF", "Use an architecture transformers ships, or convert it to GGUF for llama.cpp")
        _refuse_unsupported_options(options)
        torch, transformers = _import_torch_transformers()
        self.model_name = model.name
        self.path = path
        self.options = options
        if not options.verbose:
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        if options.n_threads:
            torch.set_num_threads(options.n_threads)

        ngl = options.n_gpu_layers
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(f"transformers cannot read {path}/config.json: {_first_line(exc)}") from None
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        if 0 < ngl < n_layers:
            raise InvalidParameterError(f"-ngl {ngl}: the transformers engine puts all {n_layers} layers on one "
                                        "device; use -ngl -1 (GPU) or -ngl 0 (CPU)", param="n_gpu_layers")
        self.device = _pick_device(torch, ngl)
        dtype = _pick_dtype(torch, options.dtype, self.device)
        # -fa on asks for real flash attention (the flash-attn package, CUDA); auto is PyTorch's SDPA.
        attn = {"on": "flash_attention_2", "off": "eager"}.get(options.flash_attn, "sdpa")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                                        local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, trust_remote_code=False, local_files_only=True,
                attn_implementation=attn)
        except (ValueError, OSError, ImportError, KeyError) as exc:
            raise ModelLoadError(f"transformers could not load {path}: {_first_line(exc)}") from None
        self.model.to(self.device).eval()
        self.n_vocab = int(self.model.get_input_embeddings().num_embeddings)
        n_ctx_train = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_N_CTX)
        self.n_ctx = options.n_ctx or min(DEFAULT_N_CTX, n_ctx_train)
        if self.n_ctx < 16:
            raise InvalidParameterError(f"context size {self.n_ctx} is too small", param="n_ctx")
        self.n_gpu_layers = -1 if self.device != "cpu" else 0
        self.flash_attn = options.flash_attn
        self.seed = options.seed

        self.init_vocabulary(self.tokenizer, self.n_vocab, model, options)
        self.eog_ids = frozenset(self._end_of_generation_ids(config))
        # One request at a time: the model's activations and the CPU cores are shared.
        self._lock = threading.Lock()
        self._torch = torch

    def _end_of_generation_ids(self, config: Any) -> set[int]:
        ids: set[int] = set()
        sources = [getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
                   getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id]
        for value in sources:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[text] for text in EOG_TEXTS if text in vocab)
        return {i for i in ids if 0 <= i < self.n_vocab}

    # -- generation -----------------------------------------------------------------------------

    def _stream(self, tokens: list[int], params: SamplingParams) -> Iterator[Delta]:
        return self._decode(tokens, params, threading.Event())

    async def _generate(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        # In a worker thread; closing the iterator stops generation at the next token.
        async for delta in iterate_in_thread(lambda cancel: self._decode(tokens, params, cancel)):
            yield delta

    def _decode(self, tokens: list[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Delta]:
        torch = self._torch
        with self._lock, torch.inference_mode():
            if cancel.is_set():
                return
            out = self.model(input_ids=torch.tensor([tokens], device=self.device), use_cache=True,
                             logits_to_keep=1)
            prompt_cache, prompt_logits = out.past_key_values, out.logits[0, -1]
            base_seed = self.seed if params.seed is None else params.seed
            if base_seed is None:
                base_seed = secrets.randbits(32)
            for index in range(params.n):
                # The last choice may consume the prompt's cache; earlier ones work on copies.
                cache = prompt_cache if index == params.n - 1 else copy.deepcopy(prompt_cache)
                yield from self._choice(index, tokens, params, cache, prompt_logits, base_seed + index, cancel)
                if cancel.is_set():
                    return

    def _choice(self, index: int, tokens: list[int], params: SamplingParams, cache: Any, logits: Any,
                seed: int, cancel: threading.Event) -> Iterator[Delta]:
        from edge_llm.engines.torch_sampling import TokenSampler, log_softmax

        torch = self._torch
        sampler = TokenSampler(params, tokens, eog_ids=self.eog_ids, seed=seed, n_ctx=self.n_ctx)
        text = TextAssembler(params.stop, params.include_stop_str_in_output)
        while not cancel.is_set():
            token = sampler.sample(logits)
            sampler.accept(token)
            logprobs = None
            if params.logprobs is not None:  # of the model's own distribution, as llama.cpp reports
                logprobs = [self._token_logprob(log_softmax(logits), token, params.logprobs)]
            piece = "" if self.ends_text(token, params) else text.push(self._pieces.piece(token))
            finish = self.finish_reason(token, params, text, len(tokens), len(sampler.generated))
            if finish is not None:
                piece += text.finish()
                usage = Usage(prompt_tokens=len(tokens), completion_tokens=len(sampler.generated))
                yield Delta(text=piece, token_ids=[token], index=index, logprobs=logprobs, finish_reason=finish,
                            usage=usage)
                return
            yield Delta(text=piece, token_ids=[token], index=index, logprobs=logprobs)
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=cache,
                             use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]

    def _token_logprob(self, logprobs: Any, token: int, top_n: int) -> TokenLogprob:
        top = []
        if top_n:
            values, ids = self._torch.topk(logprobs, top_n)
            top = [(self.token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True)]
        return TokenLogprob(token, self.token_text(token), float(logprobs[token]), top)

    # -- embeddings -----------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states (after the final norm), as llama.cpp's
        mean pooling computes them."""
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for text in texts:
                tokens = self.tokenize(text)
                if not tokens:
                    raise InvalidParameterError("cannot embed an empty input", param="input")
                if len(tokens) > self.n_ctx:
                    raise ContextLengthError(f"input of {len(tokens)} tokens exceeds the context of {self.n_ctx}",
                                             param="input")
                hidden = self.model.base_model(input_ids=torch.tensor([tokens], device=self.device)).last_hidden_state
                vec = hidden[0].to(torch.float32).mean(dim=0)
                vec = vec / (vec.norm() or 1.0)
                out.append(vec.cpu().tolist())
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            with self._lock:
                self.model = None
            if self.device != "cpu":
                self._torch.cuda.empty_cache()


def _refuse_unsupported_options(options: LoadOptions) -> None:
    """Options with a llama.cpp meaning that this engine cannot honour: refused, not ignored."""
    if options.cache_type_k not in ("f16", "f32", "bf16") or options.cache_type_v not in ("f16", "f32", "bf16"):
        raise InvalidParameterError("the transformers engine keeps its KV cache in the model's dtype; "
                                    "quantized -ctk/-ctv are for llama.cpp (or lmdeploy's KV int8)",
                                    param="cache_type_k")
    if options.use_mlock:
        raise InvalidParameterError("--mlock is a llama.cpp option; the transformers engine cannot lock weights",
                                    param="use_mlock")
    if options.tensor_parallel_size > 1:
        raise InvalidParameterError("--tp is for vLLM / LMDeploy; the transformers engine runs on one device",
                                    param="tensor_parallel_size")


def _pick_device(torch: Any, n_gpu_layers: int) -> str:
    """-ngl 0: CPU; -ngl -1 (or any count covering the model): CUDA. transformers has no
    per-layer split here, so a partial count is refused instead of being rounded."""
    if n_gpu_layers == 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise InvalidParameterError("-ngl asks for the GPU but torch sees no CUDA device "
                                    "(is the CPU build of torch installed?)", param="n_gpu_layers")
    return "cuda"


def _pick_dtype(torch: Any, requested: str | None, device: str) -> Any:
    if requested in (None, "auto"):
        # float32 on the CPU: half precision is slow there, and it is the reference precision.
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        dtype = getattr(torch, {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(requested, requested))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise InvalidParameterError(f"unknown dtype {requested!r}; choose float32, float16 or bfloat16",
                                    param="dtype")
    return dtype


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
