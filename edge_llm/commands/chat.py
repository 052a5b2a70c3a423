"""`edge-llm chat`: talk to a model turn by turn, the answer streamed as it is generated.

Two ways to build the prompt (see conversation.py):
  - the model's chat template (from the GGUF, or the registry's / --chat-format's format), with
    `--system TEXT`;
  - llama.cpp interactive mode, with llama-cli's flags: `-f FILE` / `-p TEXT` (initial prompt),
    `--in-prefix`, `--in-suffix`, `-r`; no template is applied.

Each turn evaluates only its new tokens: the conversation is kept as the token list the engine
already has in its cache (one slot, -np 1). On a terminal: line editing and history (readline),
commands (/help), Ctrl-C stops an answer. With stdin piped: one user turn per line, one answer
per output line, no prompts or colours.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge_llm.chat_format import PrefixChatFormatter, unescape
from edge_llm.commands.console import LineReader, Screen, default_history_file, last_chat_file
from edge_llm.commands.conversation import (
    Answer,
    Conversation,
    PrefixConversation,
    Prompt,
    TemplateConversation,
)
from edge_llm.commands.generate import drafts_note, read_prompt_file
from edge_llm.engines.base import Engine, Usage, load_engine
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.options import (
    PREFIXES,
    PROMPT_CACHE,
    CommandParser,
    add_load_flags,
    add_model_flags,
    add_sampling_flags,
    load_options,
    sampling_params,
)
from edge_llm.reasoning import ReasoningSplitter, prompt_opens_thinking, template_has_reasoning
from edge_llm.sampling import SamplingParams

HELP = """commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system [TEXT]     show or replace the system prompt (the initial prompt in prefix mode)
  /save FILE         save the conversation as JSON (OpenAI-style messages)
  /load FILE         replace the conversation with a saved one
  /params [K=V ...]  show or set sampling values, e.g. /params temp=0.2 top_k=20 n=128
  /image PATH        attach an image to your next message (models with a vision projector, --mmproj)
  /exit              leave (also: exit, quit, Ctrl-D; Ctrl-C at the prompt)
input: end a line with \\ to continue on the next one; pasted text may span lines;
  start a message with // to send a line that begins with /.
Ctrl-C while the model answers stops that answer and keeps the conversation."""

# /params names as llama-cli users type them -> SamplingParams fields.
PARAM_ALIASES = {
    "temp": "temperature", "n": "max_tokens", "n_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "penalty_last_n",
}
SHOWN_PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "penalty_last_n",
                "presence_penalty", "frequency_penalty", "max_tokens", "seed", "stop", "ignore_eos")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm chat", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP)
    g = parser.add_argument_group("conversation")
    g.add_argument("--system", default=None, help="system prompt (chat template mode)")
    g.add_argument("-f", "--file", default=None,
                   help="initial prompt file, as llama-cli -f (e.g. prompts/chat-with-qwen.txt); no chat template")
    g.add_argument("-p", "--prompt", default=None, help="initial prompt text (escapes like \\n interpreted); no template")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for your first message (repeatable; models with --mmproj); later ones: /image")
    g.add_argument("-i", "--interactive", action="store_true",
                   help="let the model continue the initial prompt before the first user turn (llama-cli -i)")
    g.add_argument("-if", "--interactive-first", action="store_true",
                   help="wait for the user before generating (the default)")
    g.add_argument("-r", "--reverse-prompt", action="append", default=[],
                   help="stop the answer when this text appears and give the turn back (repeatable)")
    g.add_argument("-co", "--color", action="store_true", help="colour the user's input and the notices")
    g.add_argument("--stats", action="store_true",
                   help="token counts (evaluated, cached, restored from the prompt cache) and speed after each answer")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="FILE",
                   help="continue the conversation saved in FILE (default: the one the last interactive chat "
                        "left); with --cache-dir its history is restored, not read again")
    g.add_argument("--verbose-prompt", action="store_true",
                   help="print the token ids (and their text) sent to the engine for each turn")
    g.add_argument("--history-file", default=None,
                   help="input history file (default: chat_history in the user's data dir; '' = none)")
    add_load_flags(parser, PREFIXES)
    add_model_flags(parser, defaults={"n_parallel": 1})
    add_load_flags(parser, PROMPT_CACHE)
    add_sampling_flags(parser, n_predict=-1)
    return parser


@dataclass
class ReplSettings:
    interactive: bool  # stdin is a terminal
    color: bool
    stats: bool
    verbose_prompt: bool
    continue_first: bool  # llama-cli -i: generate from the initial prompt before the first turn
    reverse_prompts: tuple[str, ...] = ()


class ChatSession:
    """One conversation with one engine: turns, commands, statistics."""

    def __init__(self, engine: Engine, conversation: Conversation, params: SamplingParams,
                 settings: ReplSettings, screen: Screen) -> None:
        self.engine = engine
        self.conversation = conversation
        self.params = params
        self.settings = settings
        self.screen = screen
        self.images: list = []  # attached with /image, sent with the next message

    # -- turns ----------------------------------------------------------------------------------

    def turn(self, user: str | None) -> Answer | None:
        """Send one user turn (None: let the model continue) and stream the answer."""
        # Piped, a turn that fails still gets its (empty) output line: line N answers line N.
        self.screen.start_answer()
        try:
            return self._turn(user)
        finally:
            self.screen.end_answer()

    def _turn(self, user: str | None) -> Answer | None:
        params = self.turn_params()
        reserve = min(params.max_tokens or self.conversation.limit // 4, self.conversation.limit // 2)
        try:
            prompt = self.conversation.prompt(user, reserve=reserve, images=self.images)
        except EdgeLLMError as exc:
            self.screen.error(f"error: {exc.message}")
            return None
        self.images = []
        if prompt.dropped:
            kept = " (system prompt kept)" if self.conversation.system else ""
            self.screen.notice(f"[context full: dropped the {_plural(prompt.dropped, 'oldest turn')}{kept}; "
                               f"the remaining {len(prompt.tokens)} tokens are evaluated again]")
        if self.settings.verbose_prompt:
            self._show_prompt(prompt)
        answer, usage, speed = self._generate(prompt, params)
        if answer is None:
            return None
        self.screen.answer_piece(self.conversation.record(prompt, answer))
        self.screen.end_answer()
        if answer.finish_reason == "cancelled":
            self.screen.notice("[stopped]")
        elif answer.finish_reason == "length" and len(prompt.tokens) + len(answer.token_ids) >= self.conversation.limit:
            self.screen.notice("[the context is full: answer cut; the oldest turns will be dropped next turn]")
        if self.settings.stats:
            self.screen.notice(_stats_line(prompt, answer, usage, speed))
        return answer

    def turn_params(self) -> SamplingParams:
        if not self.settings.reverse_prompts:
            return self.params
        # A reverse prompt stays in the answer, as in llama-cli: the user types after "User:".
        return self.params.replace(stop=tuple(self.params.stop) + self.settings.reverse_prompts,
                                   include_stop_str_in_output=True)

    def _generate(self, prompt: Prompt, params: SamplingParams) -> tuple[Answer | None, Usage | None, float]:
        texts: list[str] = []
        ids: list[int] = []
        finish = None
        usage = None
        first = end = None
        try:
            deltas = self.engine.stream(prompt.tokens, params)
        except EdgeLLMError as exc:
            self.screen.error(f"error: {exc.message}")
            return None, None, 0.0
        show = answer_printer(self.engine, self.screen, prompt.text)
        try:
            for delta in deltas:
                now = time.perf_counter()
                first = first or now
                end = now
                show(delta.text, delta.finish_reason is not None)
                texts.append(delta.text)
                ids.extend(delta.token_ids)
                if delta.finish_reason:
                    finish, usage = delta.finish_reason, delta.usage
        except KeyboardInterrupt:
            finish = "cancelled"
        except EdgeLLMError as exc:
            self.screen.error(f"error: {exc.message}")
            return None, None, 0.0
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # cancels the request if it is still running
        speed = (len(ids) - 1) / (end - first) if first is not None and end > first and len(ids) > 1 else 0.0
        return Answer("".join(texts), ids, finish), usage, speed

    def _show_prompt(self, prompt: Prompt) -> None:
        text = b"".join(_token_bytes(self.engine, t) for t in prompt.tokens).decode("utf-8", errors="replace")
        self.screen.debug(f"[prompt] {len(prompt.tokens)} tokens, {prompt.new_tokens} new: {prompt.tokens}")
        self.screen.debug(f"[prompt] text: {text!r}")

    # -- commands -------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "exit", "quit"):
            return False
        if name == "/help":
            self.screen.info(HELP)
        elif name == "/reset":
            self.conversation.reset()
            self.screen.info("[conversation cleared]")
        elif name == "/system":
            if arg:
                self.conversation.set_system(unescape(arg) if isinstance(self.conversation, PrefixConversation)
                                             else arg)
                self.screen.info("[system prompt set]")
            else:
                self.screen.info(self.conversation.system or "(no system prompt)")
        elif name == "/save":
            if not arg:
                self.screen.error("usage: /save FILE")
            else:
                self.conversation.save(arg, model=self.engine.model_name)
                self.screen.info(f"[saved {_count(len(self.conversation.exchanges), 'turn')} to {arg}]")
        elif name == "/load":
            if not arg:
                self.screen.error("usage: /load FILE")
            else:
                self.conversation.load(arg)
                self.screen.info(f"[loaded {_count(len(self.conversation.exchanges), 'turn')} from {arg}]")
        elif name == "/image":
            self.attach_image(arg)
        elif name == "/params":
            if arg:
                self.params = update_params(self.params, arg)
            self.screen.info(format_params(self.params))
        else:
            self.screen.error(f"unknown command {name}; /help lists them (start with // to send a line "
                              "beginning with /)")
        return True

    def attach_image(self, path: str) -> None:
        from edge_llm.files import os_errors
        from edge_llm.images import decode_image

        if not path:
            self.screen.error("usage: /image PATH")
            return
        if not self.engine.takes_images:
            self.screen.error(f"error: {self.engine.model_name} does not take images (load it with --mmproj FILE)")
            return
        with os_errors(path, "read"):
            data = Path(path).expanduser().read_bytes()
        self.images.append(decode_image(data, param=path))
        self.screen.info(f"[{path}: image attached to your next message]")

    # -- the loop -------------------------------------------------------------------------------

    def run(self, reader: LineReader) -> int:
        if self.settings.continue_first:
            self.turn(None)
        try:
            while True:
                try:
                    line = reader.read()
                except KeyboardInterrupt:  # at the prompt: leave
                    self.screen.out.write("\n")
                    return 0
                if line is None:
                    return 0
                word = line.strip()
                if word.startswith("//"):
                    line = line.replace("//", "/", 1)
                elif word.startswith("/") or word in ("exit", "quit"):
                    try:
                        if not self.command(word):
                            return 0
                    except EdgeLLMError as exc:
                        self.screen.error(f"error: {exc.message}")
                    continue
                if not word and not isinstance(self.conversation, PrefixConversation):
                    continue  # an empty line means nothing to a chat template
                # In prefix mode an empty line gives the turn back to the model, as in llama-cli.
                self.turn(line if word else None)
        finally:
            reader.save_history()


def answer_printer(engine: Engine, screen: Screen, prompt_text: str):  # noqa: ANN201
    """show(text, final): the answer as it streams; a thinking model's <think> text dimmed."""
    if not template_has_reasoning(engine):
        return lambda text, final: screen.answer_piece(text)
    splitter = ReasoningSplitter(open=prompt_opens_thinking(prompt_text))
    thinking = True

    def show(text: str, final: bool) -> None:
        nonlocal thinking
        for kind, piece in splitter.feed(text) + (splitter.finish() if final else []):
            if kind == "reasoning":
                screen.thinking_piece(piece)
                continue
            if thinking:
                screen.end_thinking()
                thinking = False
            screen.answer_piece(piece)

    return show


def update_params(params: SamplingParams, assignments: str) -> SamplingParams:
    """Apply `/params temp=0.2 top-k=20 n=-1` to the sampling parameters."""
    changes: dict[str, object] = {}
    for item in assignments.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidParameterError(f"expected NAME=VALUE, got {item!r}")
        key = key.strip().lower().replace("-", "_")
        key = PARAM_ALIASES.get(key, key)
        if key not in SHOWN_PARAMS:
            raise InvalidParameterError(f"unknown sampling value {key!r}; known: {', '.join(SHOWN_PARAMS)}")
        if value.lower() in ("none", "") or (key == "max_tokens" and value == "-1"):
            changes[key] = None if key in ("max_tokens", "seed") else ()
        else:
            changes[key] = value
    unset = {k: None for k, v in changes.items() if v is None}
    updated = params.replace(**{k: v for k, v in changes.items() if v is not None})
    return updated.model_copy(update=unset) if unset else updated


def format_params(params: SamplingParams) -> str:
    values = params.model_dump()
    return " ".join(f"{name}={values[name]!r}" if isinstance(values[name], str | tuple)
                    else f"{name}={values[name]}" for name in SHOWN_PARAMS)


def _stats_line(prompt: Prompt, answer: Answer, usage: Usage | None, speed: float) -> str:
    if usage is None:  # a stopped answer has no usage report
        return f"[prompt: {len(prompt.tokens)} tokens | answer: {len(answer.token_ids)} tokens, stopped]"
    evaluated = usage.prompt_tokens - usage.cached_tokens
    rebuilt = ", conversation re-tokenized" if prompt.rebuilt else ""
    restored = f" ({usage.restored_tokens} restored from the prompt cache)" if usage.restored_tokens else ""
    return (f"[prompt: {usage.prompt_tokens} tokens, {usage.cached_tokens} cached{restored}, {evaluated} evaluated"
            f"{rebuilt} | answer: {usage.completion_tokens} tokens, {speed:.1f} tokens/s{drafts_note(usage)}]")


def _token_bytes(engine: Engine, token: int) -> bytes:
    if token < 0:
        return b"[image]"  # an image's placeholder (engines/media.py)
    # a special token renders as nothing: show its name
    return engine.token_piece(token) or engine.token_text(token).encode("utf-8")


def _plural(n: int, word: str) -> str:
    """'the oldest turn', 'the 2 oldest turns'."""
    return f"{word}" if n == 1 else f"{n} {word}s"


def _count(n: int, word: str) -> str:
    """'1 turn', '2 turns', '0 turns'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def make_conversation(engine: Engine, args: argparse.Namespace) -> Conversation:
    """Prefix mode when the flags or the registry give prefixes, or an initial prompt is given;
    the chat template otherwise."""
    initial = None
    if args.file is not None:
        # Verbatim, trailing newline included: the files in prompts/ end where the next turn starts.
        initial = read_prompt_file(args.file)
    elif args.prompt is not None:
        initial = unescape(args.prompt)
    formatter = engine.formatter
    # The engine has a prefix formatter when --in-prefix/--in-suffix or the registry entry give
    # prefixes; -f / -p alone mean prefix mode with empty ones.
    prefixes = isinstance(formatter, PrefixChatFormatter)
    if prefixes or initial is not None:
        injection = unescape(args.reverse_prompt[0]) if args.reverse_prompt else ""
        return PrefixConversation(engine, system=initial if initial is not None else args.system,
                                  in_prefix=formatter.in_prefix if prefixes else "",
                                  in_suffix=formatter.in_suffix if prefixes else "",
                                  eog_injection=injection)
    return TemplateConversation(engine, system=args.system)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.system is not None and (args.file is not None or args.prompt is not None):
        raise InvalidParameterError("--system and -f/-p both give the initial prompt; use one")
    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    settings = ReplSettings(interactive=interactive, color=args.color and sys.stdout.isatty(), stats=args.stats,
                            verbose_prompt=args.verbose_prompt,
                            continue_first=args.interactive and not args.interactive_first,
                            reverse_prompts=tuple(unescape(r) for r in args.reverse_prompt))
    screen = Screen(interactive, settings.color)
    engine = load_engine(args.model, engine=args.engine, options=load_options(args), config=args.config)
    conversation = None
    try:
        conversation = make_conversation(engine, args)
        if settings.continue_first and not isinstance(conversation, PrefixConversation):
            settings.continue_first = False  # a chat template has nothing to continue before a user turn
        if args.resume is not None:
            source = Path(args.resume) if args.resume else last_chat_file()
            if not args.resume and not source.exists():
                raise EdgeLLMError(f"no conversation to resume: an interactive chat keeps one at exit in {source}")
            conversation.load(source)
            screen.notice(f"[resumed {_count(len(conversation.exchanges), 'turn')} from {source}]")
        if interactive:
            mode = "prefix mode" if isinstance(conversation, PrefixConversation) else "chat template"
            screen.notice(f"edge-llm chat: {engine.model_name} ({mode}, context {conversation.limit} tokens). "
                          "/help for commands, Ctrl-D to leave.")
        history = default_history_file() if args.history_file is None else Path(args.history_file)
        reader = LineReader(screen, history if interactive and args.history_file != "" else None)
        session = ChatSession(engine, conversation, params, settings, screen)
        for path in args.image:
            session.attach_image(path)
        return session.run(reader)
    finally:
        if interactive and conversation is not None and conversation.exchanges:
            _autosave(conversation, engine, screen)
        engine.close()


def _autosave(conversation: Conversation, engine: Engine, screen: Screen) -> None:
    """An interactive chat is kept for `chat --resume`, as the input history is."""
    target = last_chat_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        conversation.save(target, model=engine.model_name)
    except (OSError, EdgeLLMError) as exc:
        screen.error(f"could not keep the conversation for --resume: {getattr(exc, 'message', exc)}")
