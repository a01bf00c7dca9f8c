"""Progress of long model steps (downloading, hashing, converting), shown as logs or as bars.

A worker logs (`Progress`); a command run in a terminal draws bars (`RichProgress`). A step
with a size counts bytes; one without (converting) shows how long it has been running, so a
first start that takes a minute never looks stuck.
"""

import logging
import threading
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBars
from rich.text import Text

log = logging.getLogger("abl.models")

MB = 1_000_000


class Progress:
    """Reports steps as log lines: at the start, every `interval_s` while running, at the end."""

    def __init__(self, logger: logging.Logger = log, interval_s: float = 5.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._step = ""
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._last_report = 0.0
        self._ticker: threading.Thread | None = None
        self._ended = threading.Event()

    def begin(self, step: str, total: int | None = None) -> None:
        """Starts a step; `total` is its size in bytes, None when it has no measurable size."""
        self.end()
        self._step, self._total, self._done = step, total, 0
        self._started = self._last_report = time.monotonic()
        self._ended = threading.Event()
        self.logger.info("%s ...", step)
        if total is None:
            # Nothing calls update() during a conversion: a heartbeat says it is still going.
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    def update(self, done: int) -> None:
        """Bytes of the current step done so far."""
        self._done = done
        now = time.monotonic()
        if now - self._last_report >= self.interval_s:
            self._last_report = now
            self.logger.info("%s: %s", self._step, self._amount())

    def note(self, line: str) -> None:
        """A line of output from a tool the step runs (pip)."""
        self.logger.info("%s", line)

    def end(self) -> None:
        """Ends the current step (nothing if none is running)."""
        if not self._step:
            return
        self._ended.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        took = time.monotonic() - self._started
        self.logger.info("%s: done in %.1f s", self._step, took)
        self._step = ""

    def _amount(self) -> str:
        if self._total:
            share = 100 * self._done / self._total
            return f"{self._done / MB:.1f} of {self._total / MB:.1f} MB ({share:.0f}%)"
        return f"{self._done / MB:.1f} MB"

    def _tick(self) -> None:
        while not self._ended.wait(self.interval_s):
            running = time.monotonic() - self._started
            self.logger.info("%s: still running (%.0f s)", self._step, running)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()


class _SizedOnly(DownloadColumn):
    """Bytes done of total, left blank for a step that has no size."""

    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("sizeless") else super().render(task)


class _SpeedOfSized(TransferSpeedColumn):
    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("sizeless") else super().render(task)


class RichProgress(Progress):
    """Draws each step as a bar (bytes, speed) or a spinner with elapsed time, on `console`."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self._bars = RichBars(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _SizedOnly(),
            _SpeedOfSized(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task: TaskID | None = None

    def begin(self, step: str, total: int | None = None) -> None:
        self.end()
        self._bars.start()
        self._step, self._total, self._started = step, total, time.monotonic()
        self._task = self._bars.add_task(step, total=total, sizeless=total is None)

    def update(self, done: int) -> None:
        if self._task is not None:
            self._bars.update(self._task, completed=done)

    def note(self, line: str) -> None:
        self._bars.console.print(line, markup=False, highlight=False)

    def end(self) -> None:
        if self._task is None:
            return
        # A step without a size ends as a full bar, like one that had a size.
        done = self._total or 1
        self._bars.update(self._task, total=done, completed=done)
        self._bars.stop()  # leaves the finished bar printed
        # Drawn once: the next step's live display must not draw it again.
        self._bars.remove_task(self._task)
        self._task = None
        self._step = ""
