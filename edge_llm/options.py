"""Command-line flags shared by several subcommands, with llama.cpp's names and meanings.

Model loading: -m -c -t -tb -b -ngl -sm -ts -mg -fa -ctk -ctv -np --mlock --no-mmap --seed -v,
               and for the GPU engines --tp --pp --gpu-memory-utilization --max-model-len
               --quantization --dtype --distributed-executor-backend --engine-arg.
Sampling:      -n --temp --top-k --top-p --min-p --repeat-penalty --repeat-last-n
               --presence-penalty --frequency-penalty --stop --ignore-eos.
"""

from __future__ import annotations

import argparse

from edge_llm.engines.base import LoadOptions
from edge_llm.sampling import SamplingParams


def add_model_flags(parser: argparse.ArgumentParser, *, parallel_default: int = 1) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="registry name, path to a .gguf, or hf:ORG/REPO:QUANT (default: the bundled demo model)")
    g.add_argument("--config", default=None, help="a models.toml that adds to / overrides the built-in registry")
    g.add_argument("--engine", default="llama.cpp", help="llama.cpp (default), transformers, vllm, lmdeploy")
    g.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=None,
                   help="context size in tokens, shared by the parallel slots "
                        "(default: the registry entry's, else the model's, at most 4096)")
    g.add_argument("-t", "--threads", dest="n_threads", type=int, default=None, help="threads for generation")
    g.add_argument("-tb", "--threads-batch", dest="n_threads_batch", type=int, default=None,
                   help="threads for prompt processing (default: same as -t)")
    g.add_argument("-b", "--batch-size", dest="n_batch", type=int, default=None,
                   help="tokens evaluated per step (prompt chunk budget; default 512)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=None,
                   help="layers to offload to the GPU (-1 = all; needs a GPU build of llama-cpp-python; "
                        "default: the registry entry's, else 0)")
    g.add_argument("-sm", "--split-mode", dest="split_mode", choices=["none", "layer", "row"], default=None,
                   help="several GPUs: none (one GPU), layer (default: layers spread), row (rows of each matrix)")
    g.add_argument("-ts", "--tensor-split", dest="tensor_split", type=_shares, default=None,
                   help="share of the model per GPU, e.g. 3,1")
    g.add_argument("-mg", "--main-gpu", dest="main_gpu", type=int, default=None,
                   help="the GPU for the whole model with --split-mode none (default 0)")
    g.add_argument("-fa", "--flash-attn", dest="flash_attn", choices=["on", "off", "auto"], default=None,
                   nargs="?", const="on",
                   help="flash attention (default: the registry entry's, else auto; bare -fa means on)")
    g.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", default=None,
                   help="KV cache type for K: f16 (default), q8_0, q4_0 ...")
    g.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", default=None,
                   help="KV cache type for V (default f16; quantized needs -fa)")
    g.add_argument("-np", "--parallel", dest="n_parallel", type=int, default=parallel_default,
                   help=f"parallel sequences (slots) decoded together (default {parallel_default})")
    g.add_argument("--mlock", action="store_true", default=None, help="keep the weights in RAM (no swapping)")
    g.add_argument("--no-mmap", dest="use_mmap", action="store_false", default=None,
                   help="read the weights instead of mapping them")
    g.add_argument("--chat-format", default=None,
                   help="chat template: auto (from the GGUF) or a built-in name (default: the registry entry's)")
    h = parser.add_argument_group("GPU engines (vllm, lmdeploy, transformers)")
    h.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None,
                   help="GPUs to shard each layer over (vLLM, LMDeploy)")
    h.add_argument("--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int, default=None,
                   help="pipeline stages, e.g. one per node (vLLM, with Ray)")
    h.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory the engine may take (vLLM; LMDeploy: share for the KV cache)")
    h.add_argument("--max-model-len", dest="n_ctx", type=int, default=None, help="same as -c (vLLM's name)")
    h.add_argument("--quantization", default=None, help="vLLM: awq, gptq, fp8 ...; LMDeploy: awq (W4A16)")
    h.add_argument("--dtype", default=None, help="auto, float16, bfloat16, float32")
    h.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                   help="vLLM: ray to run --tp/--pp over several nodes")
    h.add_argument("--engine-arg", dest="engine_args", action="append", type=_engine_arg, default=None,
                   metavar="KEY=VALUE", help="passed to the engine as is, e.g. enforce_eager=true (vLLM), "
                   "backend=pytorch (LMDeploy); repeatable")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own log")


# -- the prompt cache and unified KV (chat, serve) ---------------------------------------------------

CACHE_OPTIONS = ("cache_ram", "cache_dir", "cache_disk", "kv_unified")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt cache (llama.cpp engine)")
    g.add_argument("-cram", "--cache-ram", dest="cache_ram", type=_size, default=None, metavar="SIZE",
                   help="host memory for the KV states of conversations that lost their slot, e.g. 2G "
                        "(default: a quarter of RAM, at most 8G; 0 = off)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="also keep them in DIR, so a restart or `chat --resume` continues without re-reading")
    g.add_argument("--cache-disk", dest="cache_disk", type=_size, default=None, metavar="SIZE",
                   help="most bytes kept in --cache-dir (default 8G; least recently used files go first)")
    kvu = g.add_mutually_exclusive_group()
    kvu.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=None,
                     help="one KV pool: any conversation may use the whole -c while the others are idle")
    kvu.add_argument("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false",
                     help="each slot gets -c / -np cells (the default)")


def _size(text: str) -> int:
    from edge_llm.server.serve import parse_size

    try:
        return parse_size(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(getattr(exc, "message", str(exc))) from None


def _engine_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE; the value is read as JSON where it is JSON (true, 0.9, 4), else kept as text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value


def _shares(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace("/", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 3,1 (got {text!r})") from None


def add_sampling_flags(parser: argparse.ArgumentParser, *, n_predict: int | None = 256) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", dest="max_tokens", type=int, default=n_predict,
                   help=f"tokens to generate at most (default {n_predict}; -1 = until the context is full)")
    g.add_argument("--temp", dest="temperature", type=float, default=None, help="temperature (0 = greedy; default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="top-k (-1 = off; default 40)")
    g.add_argument("--top-p", type=float, default=None, help="top-p (default 0.95)")
    g.add_argument("--min-p", type=float, default=None, help="min-p (default 0.05)")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=None, help="default 1.0 (off)")
    g.add_argument("--repeat-last-n", dest="penalty_last_n", type=int, default=None, help="default 64; -1 = whole context")
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("-s", "--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past end-of-sequence")


def load_options(args: argparse.Namespace, **overrides: object) -> LoadOptions:
    """The load flags as given: a flag left out stays None, so the model's registry entry and then
    the built-in default apply (LoadOptions.resolve, when the engine loads the model)."""
    values = {name: getattr(args, name) for name in (
        "n_ctx", "n_threads", "n_threads_batch", "n_batch", "n_gpu_layers", "flash_attn", "cache_type_k",
        "cache_type_v", "n_parallel", "use_mmap", "verbose", "chat_format", "split_mode", "tensor_split",
        "main_gpu", "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "quantization",
        "dtype", "distributed_executor_backend") if hasattr(args, name)}
    values.update({name: getattr(args, name) for name in CACHE_OPTIONS if hasattr(args, name)})
    if not hasattr(args, "cache_ram"):
        values["cache_ram"] = 0  # one-shot commands (generate, batch, perplexity) never revisit a prompt
    engine_args = getattr(args, "engine_args", None)
    values["extra"] = dict(engine_args) if engine_args else None
    values["use_mlock"] = getattr(args, "mlock", None)
    values["seed"] = getattr(args, "seed", None)
    values.update(overrides)
    return LoadOptions(**values)


def sampling_params(args: argparse.Namespace, **overrides: object) -> SamplingParams:
    values = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, penalty_last_n=args.penalty_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=args.stop, ignore_eos=args.ignore_eos, max_tokens=getattr(args, "max_tokens", None),
    )
    values.update(overrides)
    params = SamplingParams.create(**{k: v for k, v in values.items() if k != "max_tokens" or v != -1})
    # llama.cpp's -n -1: no limit but the context.
    return params.model_copy(update={"max_tokens": None}) if values["max_tokens"] == -1 else params
