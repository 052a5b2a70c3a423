"""Command-line flags shared by several subcommands, with llama.cpp's names and meanings.

The load flags are made from their one declaration, `load_options.LoadOptions` (-m -c -t -tb -b
-ngl -sm -ts -mg -fa -ctk -ctv -np --mlock --no-mmap -v, the GPU engines' --tp --pp ..., the
prompt cache's --cache-ram ...); each may also be given as an environment variable
(EDGE_LLM_CTX_SIZE=8192), which a flag on the command line outranks.
Sampling: -n --temp --top-k --top-p --min-p --repeat-penalty --repeat-last-n --presence-penalty
          --frequency-penalty -s --stop --ignore-eos (defaults: SamplingParams').
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.load_options import (
    GPU_ENGINES,
    MODEL,
    OPTIONS,
    PREFIXES,
    PROMPT_CACHE,
    QUEUE,
    SPECULATIVE,
    LoadOptions,
    choices,
    format_size,
    parse_size,
    parse_text,
    value_type,
)
from edge_llm.sampling import SamplingParams

__all__ = ["GPU_ENGINES", "MODEL", "PREFIXES", "PROMPT_CACHE", "QUEUE", "CommandParser", "add_load_flags",
           "add_model_flags", "add_sampling_flags", "given_sampling", "load_options", "sampling_params", "size_flag"]


class CommandParser(argparse.ArgumentParser):
    """Every command's parser: a bad flag or value is one line with a hint, not the whole usage
    (serve's runs to 60 lines) above it; a mistyped flag gets the nearest real one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = self._nearest_flag(message)
        print(f"{self.prog}: error: {message}{hint} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def _nearest_flag(self, message: str) -> str:
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        flags = [flag for action in self._actions for flag in action.option_strings]
        for word in message[len(prefix):].split():
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
            if word.startswith("-") and close:
                return f"; did you mean {close[0]}?"
        return ""

# Where load_options finds which load flags a parser declared, and the command's own defaults.
_DECLARED = "_load_flags"
_COMMAND_DEFAULTS = "_load_defaults"


def add_model_flags(parser: argparse.ArgumentParser, *, defaults: Mapping[str, Any] | None = None) -> None:
    """-m, --config, --engine and the load flags of llama.cpp and the GPU engines. `defaults`: the
    command's own (e.g. {"n_parallel": 1} for chat), below a registry entry's settings."""
    g = parser.add_argument_group(MODEL)
    g.add_argument("-m", "--model", default=None,
                   help="registry name, path to a .gguf, or hf:ORG/REPO:QUANT (default: the bundled demo model)")
    g.add_argument("--config", default=None,
                   help="a models.toml that adds to / overrides the built-in registry and ./models.toml")
    g.add_argument("--engine", default="llama.cpp", help="llama.cpp (default), transformers, vllm, lmdeploy")
    add_load_flags(parser, MODEL, SPECULATIVE, GPU_ENGINES, defaults=defaults)


def add_load_flags(parser: argparse.ArgumentParser, *groups: str, only: tuple[str, ...] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> None:
    """The flags of these LoadOptions groups (`only`: of these fields), each with its environment
    variable in --help."""
    defaults = dict(defaults or {})
    declared = list(parser.get_default(_DECLARED) or [])
    for group in groups:
        g = _argument_group(parser, group)
        for name, opt in OPTIONS.items():
            if opt.group != group or not opt.flags or (only is not None and name not in only):
                continue
            _add_flag(g, name, defaults.get(name, opt.default))
            declared.append(name)
    parser.set_defaults(**{_DECLARED: declared,
                           _COMMAND_DEFAULTS: {**(parser.get_default(_COMMAND_DEFAULTS) or {}), **defaults}})


def _argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    return next((g for g in parser._action_groups if g.title == title), None) or parser.add_argument_group(title)


def _add_flag(group: argparse._ArgumentGroup, name: str, default: Any) -> None:
    opt = OPTIONS[name]
    shown = default is not None and default != {}
    if shown and opt.parse is parse_size:
        default = format_size(default)
    help_text = opt.help + (f" (default: {_shown(default)})" if shown else "") + \
        (f" [env: {opt.env_name}]" if opt.env_name else "")
    if value_type(name) is bool:
        both = group.add_mutually_exclusive_group() if opt.off_flags else group
        both.add_argument(*opt.flags, dest=name, action="store_const", const=True, default=None, help=help_text)
        if opt.off_flags:
            both.add_argument(*opt.off_flags, dest=name, action="store_const", const=False, help=argparse.SUPPRESS)
        return
    kwargs: dict[str, Any] = dict(dest=name, default=None, metavar=opt.metavar, help=help_text,
                                  type=_flag_type(name), choices=choices(name))
    if opt.bare is not None:
        kwargs.update(nargs="?", const=opt.bare)
    if opt.repeatable:
        kwargs["action"] = "append"
    group.add_argument(*opt.flags, **kwargs)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def _flag_type(name: str) -> Callable[[str], Any]:
    def read(text: str) -> Any:
        try:
            return parse_text(name, text)
        except (ValueError, EdgeLLMError) as exc:
            raise argparse.ArgumentTypeError(_why(exc, text)) from None

    read.__name__ = OPTIONS[name].metavar or name  # argparse names it in "invalid N value"
    return read


def _why(exc: Exception, text: str) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return message if text in message else f"{message} (got {text!r})"


def size_flag(text: str) -> int:
    """argparse `type` for sizes (8G, 512M)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_options(args: argparse.Namespace, *, defaults: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] = os.environ, **overrides: Any) -> LoadOptions:
    """The load flags as given, each left out read from its environment variable; still unset, the
    model's registry entry, then the command's defaults (`defaults` over those of add_load_flags),
    then the built-in ones apply (LoadOptions.resolve, when the engine loads the model).
    `overrides` are the command's fixed choices (perplexity's minimal context): above everything."""
    declared = getattr(args, _DECLARED, None) or []
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in declared:
        opt = OPTIONS[name]
        value = getattr(args, name)
        if value is not None:
            if opt.repeatable:  # one {key: value} per time the flag was given
                value = {key: item for given in value for key, item in given.items()}
            values[name], origin[name] = value, "/".join(opt.flags[:2])
        elif opt.env_name and environ.get(opt.env_name) is not None:
            text = environ[opt.env_name]
            try:
                values[name] = parse_text(name, text)
            except (ValueError, EdgeLLMError) as exc:
                raise InvalidParameterError(f"environment variable {opt.env_name}: {_why(exc, text)}",
                                            param=name) from None
            origin[name] = f"environment variable {opt.env_name}"
    if getattr(args, "seed", None) is not None:
        values["seed"] = args.seed
    values.update(overrides)
    command_defaults = {**(getattr(args, _COMMAND_DEFAULTS, None) or {}), **(defaults or {})}
    if "cache_ram" not in declared:
        command_defaults["cache_ram"] = 0  # one-shot commands (generate, batch, perplexity) never revisit a prompt
    return LoadOptions.create(values, command_defaults=command_defaults, source=lambda name: origin.get(name, name))


def add_sampling_flags(parser: argparse.ArgumentParser, *, n_predict: int | None = 256,
                       title: str = "sampling") -> None:
    g = parser.add_argument_group(title)
    budget = "until the context is full" if n_predict in (None, -1) else n_predict
    g.add_argument("-n", "--n-predict", dest="max_tokens", type=int, default=n_predict,
                   help=f"tokens to generate at most (default: {budget}; -1 = until the context is full)")
    g.add_argument("--temp", dest="temperature", type=float, default=None,
                   help=f"temperature (0 = greedy; default {_sampling_default('temperature')})")
    g.add_argument("--top-k", type=int, default=None, help=f"top-k (-1 = off; default {_sampling_default('top_k')})")
    g.add_argument("--top-p", type=float, default=None, help=f"top-p (default {_sampling_default('top_p')})")
    g.add_argument("--min-p", type=float, default=None, help=f"min-p (default {_sampling_default('min_p')})")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=None,
                   help=f"default {_sampling_default('repetition_penalty')} (1.0 = off)")
    g.add_argument("--repeat-last-n", dest="penalty_last_n", type=int, default=None,
                   help=f"default {_sampling_default('penalty_last_n')}; -1 = whole context")
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("-s", "--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past end-of-sequence")


def _sampling_default(name: str) -> object:
    return SamplingParams.model_fields[name].default


# The sampling flags (but -n), under their SamplingParams names.
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "penalty_last_n",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")


def given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling values given on the command line, validated; `max_tokens` None for -n -1."""
    params = sampling_params(args)
    values = {name: getattr(params, name) for name in SAMPLING_FLAGS if getattr(args, name, None) is not None}
    if args.max_tokens is not None:
        values["max_tokens"] = params.max_tokens
    return values


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
