"""An engine in a child process of its own, behind the in-process engine's surface.

In one process, the worker's per-request Python (Celery's task threads, claiming and settling in
Postgres, telemetry, the delta pump) takes the GIL from the engine's stepping thread, which then
steps slower than the engine alone (docs/benchmarks.md). Here the stepping thread has an
interpreter to itself; the worker talks to it over one socket, with pickled tuples:

    worker -> child   ("submit", request_id, input_ids, sampling), ("cancel", request_id), ("stop",)
    child -> worker   ("ready", stats), ("events", [(request_id, [event, ...]), ...], stats)

After each engine step the child sends the new events of every request in one message, with the
engine's stats. The worker side routes them to each request's `Generation`, exactly the handle an
in-process `Engine` returns, and then calls `on_events`.

The child ignores SIGINT and SIGTERM: the worker decides when it stops (after its shutdown grace).
It stops when told to, or when the worker's end of the socket closes (the worker died), so it
never outlives the worker. When the child dies, the worker side fails every request it holds and
calls `on_exit`, so the worker can stop rather than take jobs it cannot run.
"""

import argparse
import contextlib
import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from workers.events import EngineStats, Event, Failed, Generation, is_terminal
from workers.protocol import SamplingParams

log = logging.getLogger("abl.worker.engine")


class EngineProcess:
    """One model served by an `Engine` in a child process; used like the `Engine` itself."""

    def __init__(
        self,
        model_path: Path,
        *,
        max_batch: int = 16,
        num_threads: int | None = None,
        build_default: bool = False,
        kv_budget_bytes: int | None = None,
        ready_timeout_s: float = 900.0,
        on_exit: Callable[[int | None], None] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.max_batch = max_batch
        self.num_threads = num_threads
        self.build_default = build_default  # build the default model first if it is missing
        self.kv_budget_bytes = kv_budget_bytes  # None: the engine's default
        self.ready_timeout_s = ready_timeout_s
        # Called on the stepping thread's behalf when new events are out (DeltaPump.notify).
        self.on_events: Callable[[], None] | None = None
        # Called with the child's exit status when it ends without being told to.
        self.on_exit = on_exit
        self._live: dict[str, Generation] = {}
        self._lock = threading.Lock()  # `_live`, `_dead`, and sending on `_conn`
        self._stats = EngineStats()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None  # why nothing more can run here

    @classmethod
    def load(cls, model_path: Path, **kw: Any) -> "EngineProcess":
        """Starts the child and waits until its model is loaded."""
        engine = cls(model_path, **kw)
        engine.start()
        return engine

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        if self._proc is not None:
            return
        ours, theirs = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "workers.engine_proc",
            str(self.model_path),
            "--fd",
            str(theirs.fileno()),
            "--max-batch",
            str(self.max_batch),
        ]
        if self.num_threads is not None:
            argv += ["--threads", str(self.num_threads)]
        if self.build_default:
            argv.append("--build-default")
        if self.kv_budget_bytes is not None:
            argv += ["--kv-budget-bytes", str(self.kv_budget_bytes)]
        self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
        theirs.close()  # the child holds the only copy: its death reads as EOF here
        self._conn = Connection(ours.detach())
        ready = self._conn.poll(self.ready_timeout_s)
        try:
            if not ready:
                raise TimeoutError(f"no engine after {self.ready_timeout_s:.0f} s")
            kind, stats = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._proc.kill()
            code = self._proc.wait()
            self._conn.close()
            raise RuntimeError(
                f"the engine process for {self.model_path} failed to start "
                f"(exit status {code}): {exc or 'it exited'}"
            ) from None
        assert kind == "ready"
        self._stats = EngineStats(*stats)
        self._reader = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self._reader.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the child; requests still waiting or running get Failed."""
        if self._proc is None:
            return
        self._stopping = True
        self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout_s)
        if self._proc.poll() is None:
            log.warning("engine process %d did not stop in %.0f s; killing it", self.pid, timeout_s)
            self._proc.kill()
        if self._reader is not None:
            self._reader.join()

    def submit(
        self, request_id: str, input_ids: Sequence[int], sampling: SamplingParams
    ) -> Generation:
        """Queues a request in the child (whose engine checks the prompt); its events arrive on
        the returned Generation."""
        generation = Generation(request_id)
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request {request_id} is already running")
            if self._dead is not None:
                generation._put(Failed(self._dead))
                return generation
            self._live[request_id] = generation
            # A send that fails means the child is gone: the reader fails the request.
            self._send_locked(("submit", request_id, list(input_ids), sampling.model_dump()))
        return generation

    def cancel(self, request_id: str) -> bool:
        """Drops the request at the child's next step; False if it is not waiting or running."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._send_locked(("cancel", request_id))
            return True

    @property
    def stats(self) -> EngineStats:
        """The engine's stats as of its last message (sent with every step's events)."""
        return self._stats

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple[Any, ...]) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(message)

    def _read(self) -> None:
        assert self._conn is not None and self._proc is not None
        while True:
            try:
                _, shipped, stats = self._conn.recv()
            except (EOFError, OSError):
                break
            # Stats first: whoever sees a terminal event also sees the engine without it.
            self._stats = EngineStats(*stats)
            routed: list[tuple[Generation, list[Event]]] = []
            with self._lock:
                for request_id, events in shipped:
                    ended = is_terminal(events[-1])
                    generation = (self._live.pop if ended else self._live.get)(request_id, None)
                    if generation is not None:
                        routed.append((generation, events))
            for generation, events in routed:
                for event in events:
                    generation._put(event)
            self._notify()
        self._conn.close()
        try:
            code: int | None = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._lost(code)

    def _lost(self, code: int | None) -> None:
        """The child is gone: fail what it held; tell the owner if nobody asked it to stop."""
        why = "the engine stopped" if self._stopping else f"the engine process exited ({code})"
        with self._lock:
            self._dead = why
            live, self._live = self._live, {}
        self._stats = dataclasses.replace(self._stats, active=0, waiting=0)
        for generation in live.values():
            generation._put(Failed(why))
        self._notify()
        if not self._stopping:
            log.error("engine process for %s exited with status %s", self.model_path, code)
            if self.on_exit is not None:
                self.on_exit(code)

    def _notify(self) -> None:
        if self.on_events is not None:
            self.on_events()


# The child.


def serve(
    conn: Connection,
    model_path: Path,
    max_batch: int,
    num_threads: int | None,
    kv_budget_bytes: int | None = None,
) -> None:
    """Runs an Engine for the worker at the other end of `conn` until told to stop or it dies."""
    from workers.engine import Engine  # torch: loaded in the child only

    budget = {} if kv_budget_bytes is None else {"kv_budget_bytes": kv_budget_bytes}
    engine = Engine(model_path, max_batch=max_batch, num_threads=num_threads, **budget)
    live: dict[str, Generation] = {}
    ship_lock = threading.Lock()  # the stepping thread ships; the command loop submits

    def ship() -> None:
        with ship_lock:
            shipped: list[tuple[str, list[Event]]] = []
            for request_id, generation in list(live.items()):
                events = generation.drain()
                if events:
                    shipped.append((request_id, events))
                    if is_terminal(events[-1]):
                        del live[request_id]
            if shipped:
                with contextlib.suppress(OSError):  # the worker is gone: the loop below ends
                    conn.send(("events", shipped, dataclasses.astuple(engine.stats)))

    engine.on_events = ship
    conn.send(("ready", dataclasses.astuple(engine.stats)))
    engine.start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.warning("the worker is gone; stopping its engine")
                return
            if message[0] == "submit":
                _, request_id, ids, sampling = message
                with ship_lock:  # registered before the stepping thread can ship its events
                    try:
                        live[request_id] = engine.submit(
                            request_id, ids, SamplingParams.model_validate(sampling)
                        )
                    except ValueError as exc:  # still running here (the worker checks first)
                        log.error("refused %s: %s", request_id, exc)
                        refused = [(request_id, [Failed(f"refused: {exc}")])]
                        with contextlib.suppress(OSError):
                            conn.send(("events", refused, dataclasses.astuple(engine.stats)))
                ship()  # a prompt the engine refused has its Failed queued already
            elif message[0] == "cancel":
                engine.cancel(message[1])
            elif message[0] == "stop":
                return
    finally:
        engine.stop()  # fails what is left, then ships it
        ship()
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path", type=Path)
    parser.add_argument("--fd", type=int, required=True, help="the worker's socket")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--build-default", action="store_true")
    parser.add_argument("--kv-budget-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    # The worker stops this process when its own shutdown grace is over.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    conn = Connection(args.fd)
    if args.build_default and not (args.model_path / "config.json").exists():
        from workers.model_build import build_default_model

        build_default_model(args.model_path)
    serve(conn, args.model_path, args.max_batch, args.threads, args.kv_budget_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
