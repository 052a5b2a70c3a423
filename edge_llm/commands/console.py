"""The terminal side of `edge-llm chat`: where output goes, and how input lines are read.

On a terminal: readline line editing, input history kept across sessions, optional colours.
With stdin piped: one turn per input line, one answer per output line, nothing else on stdout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


class Screen:
    """Where each kind of output goes. Piped: answers alone on stdout, one per line (their own
    newlines written as \\n, backslashes as \\\\, so a reader can split on lines and unescape);
    everything else on stderr, no colours."""

    GREEN, DIM, RED, RESET = "\033[1;32m", "\033[2m", "\033[31m", "\033[0m"

    def __init__(self, interactive: bool, color: bool, out: TextIO | None = None, err: TextIO | None = None):
        self.interactive = interactive
        self.color = color and interactive
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._at_line_start = True
        self._answering = False

    @property
    def prompt(self) -> str:
        # \001 and \002 tell readline the colour codes take no room on the line.
        return "> \001" + self.GREEN + "\002" if self.color else "> "

    def after_input(self) -> None:
        if self.color:
            self.out.write(self.RESET)

    def start_answer(self) -> None:
        self._answering = True

    def answer_piece(self, text: str) -> None:
        if not text:
            return
        if not self.interactive:
            text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")

    def thinking_piece(self, text: str) -> None:
        """The model's thinking (<think> text): dimmed on a colour terminal, plain on one without;
        piped, it is left out, so stdout holds the answers alone."""
        if not text or not self.interactive:
            return
        self.out.write(self.DIM + text + self.RESET if self.color else text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")

    def end_thinking(self) -> None:
        """Between the thinking and the answer: the answer starts on its own line."""
        if self.interactive:
            self._break_line()

    def end_answer(self) -> None:
        """Close the answer's line; piped, every answer gets its line, an empty one included."""
        if self._answering and (not self._at_line_start or not self.interactive):
            self.out.write("\n")
        self.out.flush()
        self._answering = False
        self._at_line_start = True

    def _break_line(self) -> None:
        if not self._at_line_start:
            self.out.write("\n")
            self._at_line_start = True

    def notice(self, text: str) -> None:
        """Status lines: stats, dropped turns, stopped answers."""
        self._break_line()
        stream = self.out if self.interactive else self.err
        stream.write((self.DIM + text + self.RESET if self.color else text) + "\n")
        stream.flush()

    def info(self, text: str) -> None:
        """Command output."""
        stream = self.out if self.interactive else self.err
        stream.write(text + "\n")
        stream.flush()

    def error(self, text: str) -> None:
        self._break_line()
        self.err.write((self.RED + text + self.RESET if self.color else text) + "\n")
        self.err.flush()

    def debug(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


class LineReader:
    """User turns: from readline on a terminal (history kept across sessions), else one per line.
    A line ending in a backslash continues on the next one. Returns None at end of input."""

    def __init__(self, screen: Screen, history_file: Path | None) -> None:
        self.screen = screen
        self.history_file = history_file
        self._readline = None
        if screen.interactive:
            try:
                import readline
            except ImportError:  # pragma: no cover - Python built without readline
                readline = None
            self._readline = readline
            if readline is not None and history_file is not None:
                readline.set_history_length(1000)
                try:
                    readline.read_history_file(history_file)
                except OSError:
                    pass  # no history yet

    def read(self) -> str | None:
        lines = []
        prompt = self.screen.prompt
        while True:
            line = self._read_line(prompt)
            if line is None:
                return "\n".join(lines) if lines else None
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "... "
                continue
            lines.append(line)
            return "\n".join(lines)

    def _read_line(self, prompt: str) -> str | None:
        if self.screen.interactive:
            try:
                return input(prompt)
            except EOFError:
                self.screen.out.write("\n")
                return None
            finally:
                self.screen.after_input()
        line = sys.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def save_history(self) -> None:
        if self._readline is None or self.history_file is None:
            return
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self.history_file)
        except OSError as exc:
            self.screen.error(f"could not save the input history to {self.history_file}: {exc.strerror}")


def last_chat_file() -> Path:
    """Where an interactive chat is kept at exit for `chat --resume`: beside the input history."""
    return default_history_file().with_name("last_chat.json")


def default_history_file() -> Path:
    """chat_history in the user's data dir: platformdirs' choice where installed, else XDG's."""
    try:
        from platformdirs import user_data_dir

        return Path(user_data_dir("edge-llm", appauthor=False)) / "chat_history"
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "edge-llm" / "chat_history"
