"""`edge-llm <command>`: dispatch only. Each command's module owns its flags and its main()."""

from __future__ import annotations

import difflib
import importlib
import logging
import sys

from edge_llm.errors import EdgeLLMError

COMMANDS = {
    "generate": ("edge_llm.commands.generate", "one-shot completion, streamed to stdout"),
    "chat": ("edge_llm.commands.chat", "interactive chat (REPL), chat templates or llama.cpp-style prefixes"),
    "serve": ("edge_llm.server.serve", "OpenAI-compatible HTTP server (and vLLM /generate, /inference, /)"),
    "pull": ("edge_llm.pull", "download a GGUF file or an HF checkpoint (Hugging Face, ModelScope)"),
    "convert": ("edge_llm.convert", "HF checkpoint folder -> GGUF (no torch)"),
    "quantize": ("edge_llm.quantize", "GGUF -> quantized GGUF (q4_k_m, q5_k_m, q8_0...)"),
    "imatrix": ("edge_llm.imatrix", "importance matrix for quantization, as llama-imatrix computes it"),
    "models": ("edge_llm.registry", "list the model registry and what is downloaded"),
    "info": ("edge_llm.info", "describe a GGUF file"),
    "doctor": ("edge_llm.commands.doctor", "llama.cpp build, CPU features, GPU offload"),
    "embed": ("edge_llm.commands.embed", "embedding vectors of texts, one JSON line each"),
    "rerank": ("edge_llm.commands.rerank", "rank documents against a query with a reranker"),
    "batch": ("edge_llm.commands.batch", "offline generation, embeddings or rerank over a JSONL file (resumable)"),
    "perplexity": ("edge_llm.commands.perplexity", "perplexity over a text file, as llama-perplexity computes it"),
    "bench": ("edge_llm.commands.bench", "compare weight quants and KV-cache types: memory, speed, quality"),
}



def _run(rest: list[str]) -> list[str]:
    """Ollama's `run MODEL [PROMPT]`: one answer through the chat template with a prompt, else a chat."""
    model = ["-m", rest.pop(0)] if rest and not rest[0].startswith("-") else []
    if rest and not rest[0].startswith("-"):
        return ["generate", *model, "--chat", *rest]
    return ["chat", *model, *rest]


# Other tools' words for these commands (Ollama's, llama.cpp's): each becomes the edge-llm command
# line it stands for, so there is one implementation of each thing.
ALIASES = {
    "run": (_run, "Ollama's: `run MODEL` = chat -m MODEL; `run MODEL PROMPT` = generate -m MODEL --chat PROMPT"),
    "list": (lambda rest: ["models", "--local", *rest], "Ollama's: models --local (what is on this machine)"),
    "ps": (lambda rest: ["models", "--running", *rest], "Ollama's: models --running (what a server has loaded)"),
    "show": (lambda rest: ["info", *rest], "Ollama's: info"),
    "server": (lambda rest: ["serve", *rest], "llama.cpp's llama-server: serve"),
}


def usage() -> str:
    lines = ["usage: edge-llm <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "aliases:"] + [f"  {name:<11} {help_}" for name, (_, help_) in ALIASES.items()]
    lines += ["", "`edge-llm <command> -h` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from edge_llm.version import package_version

        print(f"edge-llm {package_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in ALIASES:
        command, *rest = ALIASES[command][0](list(rest))
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, [*COMMANDS, *ALIASES], n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        print(f"edge-llm: unknown command {command!r} ({hint}see edge-llm --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if "-v" in rest or "--verbose" in rest else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except EdgeLLMError as exc:
        print(f"edge-llm {command}: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-llm generate ... | head` closed the pipe: not an error
        return 0
    except OSError as exc:  # a file error no command turned into its own line (disk full, ...)
        from edge_llm.files import os_error_line

        print(f"edge-llm {command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
