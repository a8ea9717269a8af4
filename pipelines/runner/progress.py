"""``qatflow run``'s terminal: KFP's output to the log file, one line per task to the console.

``capture(log_path, tasks)`` routes kfp.local's stdout and root-logger records (cache hits,
retries) through a ``Progress``, which writes everything to the log and shows each task's
outcome, retries and the steps' progress bars (at most every ``BAR_INTERVAL_S``, and at 100 %);
``Progress.failure`` turns KFP's error into one line naming the failed task and its error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

BAR_INTERVAL_S = 15.0  # progress-bar lines shown at most this often (plus each bar at 100%)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHE_HIT = re.compile(r"Task (\S+) cache hit")
_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+/\d+)\)\. Retrying in ([\d.]+)s")
_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")
_BAR = re.compile(r"\d+%\|")


class Progress(io.TextIOBase):
    """KFP's stdout: everything to the log file; task lines and progress bars to ``console``."""

    def __init__(self, log: TextIO, console: TextIO, tasks: Mapping[str, str]) -> None:
        self._log = log
        self._console = console
        self._tasks = tasks
        self._buffer = ""
        self._started = time.monotonic()
        self._done = 0
        self._task_lines: list[str] = []
        self._failed: tuple[str, str | None] | None = None
        self._last_bar = 0.0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(ANSI.sub("", line))
        return len(text)

    def _name(self, task: str) -> str:
        return self._tasks.get(task, task)

    def _say(self, message: str) -> None:
        print(message, file=self._console, flush=True)

    def _line(self, line: str) -> None:
        if match := _EXECUTING.search(line):
            self._started, self._task_lines = time.monotonic(), []
        elif match := _FINISHED.search(line):
            task, seconds = match[1], time.monotonic() - self._started
            if match[2] == "SUCCESS":
                self._done += 1
                self._say(
                    f"[{self._done:2d}/{len(self._tasks)}] {self._name(task)}: done "
                    f"({seconds:.0f} s)"
                )
            else:
                self._failed = (task, self._error())
                self._say(
                    f"        {self._name(task)}: {match[2]} after {seconds:.0f} s: "
                    f"{self._failed[1] or 'see the log'}"
                )
        elif match := _RETRY.search(line):
            self._say(
                f"        {self._name(match[1])}: attempt {match[2]} failed, retrying "
                f"in {float(match[3]):.0f} s"
            )
        elif match := _CACHE_HIT.search(line):
            self._done += 1
            self._say(f"[{self._done:2d}/{len(self._tasks)}] {self._name(match[1])}: cached")
        else:
            self._task_lines.append(line)
            bar = _BAR.search(line)
            now = time.monotonic()
            if bar and (bar[0] == "100%|" or now - self._last_bar >= BAR_INTERVAL_S):
                self._last_bar = now
                self._say(f"      {line.strip()}")

    def _error(self) -> str | None:
        for line in reversed(self._task_lines):
            if match := _ERROR.match(line):
                return f"{match[1]}: {match[2]}"
        return None

    def failure(self, kfp_message: str) -> str:
        """A one-line description of the failed task, for the error raised to the caller."""
        log_hint = f"full log: {self._log.name}"
        if self._failed is None:
            return f"pipeline failed: {ANSI.sub('', kfp_message)}; {log_hint}"
        task, error = self._failed
        return f"pipeline task '{self._name(task)}' failed: {error or 'see the log'}; {log_hint}"


@contextlib.contextmanager
def capture(log_path: Path, tasks: Mapping[str, str]) -> Iterator[Progress]:
    """Send KFP's stdout through a ``Progress`` and silence its local-runner warnings."""
    console = sys.stderr
    with (
        log_path.open("w", encoding="utf-8") as log,
        warnings.catch_warnings(),
    ):
        # Images and GPU/display settings only matter on a cluster.
        warnings.filterwarnings("ignore", message=r".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=r".*no effect in the current local runner.*")
        progress = Progress(log, console, tasks)
        # kfp.local logs cache hits and retries on the root logger at INFO, outside the
        # per-task logging set-up it prints through: route those to the progress too.
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers = [logging.StreamHandler(progress)]
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(progress):
                yield progress
        finally:
            root.handlers = saved[0]
            root.setLevel(saved[1])
