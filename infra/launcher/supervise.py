"""`abl up`'s foreground loop: wait for Ctrl-C, restart workers that exit, stop on a dead API."""

import contextlib
import signal
import time
from collections.abc import Iterator
from types import FrameType

from rich.console import Console

from infra.launcher.stack import Stack

err_console = Console(stderr=True)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT (even if inherited as ignored), SIGTERM and SIGHUP raise KeyboardInterrupt inside."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let a clean stop finish even if the operator presses Ctrl-C again."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# A worker that exits (its engine process died, or it was killed) is started again after this
# long; its requests have already failed or will be settled by the sweeper.
WORKER_RESTART_DELAY_S = 5.0


def supervise(stack: Stack) -> int:
    """Wait until interrupted; a dead API ends the run, a dead worker is reported and restarted."""
    died_at: dict[int, float] = {}
    while True:
        time.sleep(1.0)
        if stack.api is not None and not stack.api.alive:
            err_console.print(f"[red]the API exited ({stack.api.returncode})[/red]")
            err_console.print(stack.api.tail(), markup=False, highlight=False)
            return 1
        for i, worker in enumerate(stack.workers):
            if worker.alive:
                continue
            if i not in died_at:
                died_at[i] = time.monotonic()
                err_console.print(
                    f"[yellow]{worker.name} exited ({worker.returncode}); restarting it in"
                    f" {WORKER_RESTART_DELAY_S:.0f} s[/yellow]"
                )
                err_console.print(worker.tail(20), markup=False, highlight=False)
            elif time.monotonic() - died_at[i] >= WORKER_RESTART_DELAY_S:
                del died_at[i]
                stack.start_worker(i)
