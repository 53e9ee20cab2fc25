"""The console the CLI writes to: plain lines, except that on a terminal the supervisor's progress
lines redraw one bar in place instead of scrolling (a log or a pipe gets every line as it is)."""

from __future__ import annotations

import re
import shutil
import sys
from typing import TextIO

PROGRESS = re.compile(r"^\[ft\] step (\d+)/(\d+) ")
BAR_WIDTH = 24


def bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    done = round(width * step / total) if total else 0
    return "[" + "#" * done + "." * (width - done) + "]"


class Console:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._open_bar = False

    def __call__(self, line: str) -> None:
        m = PROGRESS.match(line) if self.tty else None
        if m:
            text = f"{bar(int(m[1]), int(m[2]))} {line[len('[ft] ') :]}"
            cols = shutil.get_terminal_size((120, 24)).columns
            self.stream.write("\r" + text[: cols - 1].ljust(min(cols - 1, len(text))))
            self._open_bar = True
        else:
            if self._open_bar:
                self.stream.write("\n")
                self._open_bar = False
            self.stream.write(line + "\n")
        self.stream.flush()
