"""A backend in a child process of its own, behind the same seam as the backend itself.

In one process, the worker's own Python (Celery's consumer, claiming and settling in Postgres,
telemetry, the delta pump) takes the GIL from the engine's stepping thread, which then steps
slower than the engine alone (docs/benchmarks.md). Here the stepping thread has an interpreter to
itself; the worker talks to it over one socket with the typed messages of `workers.engine_ipc`.

After each engine step the child sends the new events of every request in one `Events` message,
with the backend's stats. The worker side routes them to each request's `Generation`, exactly
the handle the backend returned in the child, and then calls `on_events`.

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
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from contract.catalog import BackendName, load_catalog
from workers.backends.seam import (
    BackendOptions,
    EngineEvent,
    EngineStats,
    Failed,
    Generation,
    Submission,
    is_terminal,
)
from workers.engine_ipc import (
    Cancel,
    Events,
    FromEngine,
    Ready,
    RequestEvents,
    Stop,
    Submit,
    ToEngine,
)

log = logging.getLogger("abl.worker.engine")


class EngineProcess:
    """One model served by a backend in a child process; a `Backend` itself."""

    def __init__(
        self,
        model_path: Path,
        *,
        backend: BackendName = "transformers",
        options: BackendOptions = BackendOptions(),
        prepare: str | None = None,
        ready_timeout_s: float = 900.0,
        on_exit: Callable[[int | None], None] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.backend = backend
        self.options = options
        # A catalogue id: the child checks (and, where it may, makes) that model's folder first.
        self.prepare = prepare
        self.ready_timeout_s = ready_timeout_s
        # Called on the reader thread when new events are out (DeltaPump.notify).
        self.on_events: Callable[[], None] | None = None
        # Called with the child's exit status when it ends without being told to.
        self.on_exit = on_exit
        # Called on the reader thread with the prompt-cache blocks evicted and stored.
        self.on_prefix_change: Callable[[list[bytes], list[bytes]], None] | None = None
        self._live: dict[str, Generation] = {}
        self._lock = threading.Lock()  # `_live`, `_dead`, and sending on `_conn`
        self._stats = EngineStats()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None  # why nothing more can run here

    @classmethod
    def load(
        cls,
        model_path: Path,
        *,
        max_batch: int = 16,
        num_threads: int | None = None,
        kv_budget_bytes: int | None = None,
        prefill_chunk_tokens: int | None = None,
        prefix_cache_bytes: int = 0,
        **kw: object,
    ) -> "EngineProcess":
        """Starts the child and waits until its model is loaded."""
        options = BackendOptions(
            max_batch,
            num_threads,
            kv_budget_bytes,
            prefill_chunk_tokens=prefill_chunk_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        engine = cls(model_path, options=options, **kw)  # type: ignore[arg-type]
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
            *(sys.executable, "-m", "workers.engine_process", str(self.model_path)),
            *("--fd", str(theirs.fileno()), "--backend", self.backend),
            *("--max-batch", str(self.options.max_batch)),
        ]
        if self.options.num_threads is not None:
            argv += ["--threads", str(self.options.num_threads)]
        if self.options.kv_budget_bytes is not None:
            argv += ["--kv-budget-bytes", str(self.options.kv_budget_bytes)]
        if self.prepare is not None:
            argv += ["--prepare", self.prepare]
        if self.options.prefill_chunk_tokens is not None:
            argv += ["--prefill-chunk-tokens", str(self.options.prefill_chunk_tokens)]
        if self.options.background_reserve is not None:
            argv += ["--background-reserve", str(self.options.background_reserve)]
        if self.options.prefix_cache_bytes:
            argv += ["--prefix-cache-bytes", str(self.options.prefix_cache_bytes)]
        self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
        theirs.close()  # the child holds the only copy: its death reads as EOF here
        self._conn = Connection(ours.detach())
        try:
            if not self._conn.poll(self.ready_timeout_s):
                raise TimeoutError(f"no engine after {self.ready_timeout_s:.0f} s")
            ready = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._proc.kill()
            code = self._proc.wait()
            self._conn.close()
            raise RuntimeError(
                f"the engine process for {self.model_path} failed to start "
                f"(exit status {code}): {exc or 'it exited'}"
            ) from None
        assert isinstance(ready, Ready), ready
        self._stats = ready.stats
        self._reader = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self._reader.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the child; requests still waiting or running get Failed."""
        if self._proc is None:
            return
        self._stopping = True
        with self._lock:
            self._send_locked(Stop())
        if self._reader is not None:
            self._reader.join(timeout_s)
        if self._proc.poll() is None:
            log.warning("engine process %d did not stop in %.0f s; killing it", self.pid, timeout_s)
            self._proc.kill()
        if self._reader is not None:
            self._reader.join()

    def submit(self, submission: Submission) -> Generation:
        """Queues a request in the child (whose backend checks the prompt); its events arrive
        on the returned Generation."""
        request_id = submission.request_id
        generation = Generation(request_id)
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request {request_id} is already running")
            if self._dead is not None:
                generation._put(Failed(self._dead))
                return generation
            self._live[request_id] = generation
            # A send that fails means the child is gone: the reader fails the request.
            self._send_locked(Submit(submission))
        return generation

    def cancel(self, request_id: str) -> bool:
        """Drops the request at the child's next step; False if it is not waiting or running."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._send_locked(Cancel(request_id))
            return True

    @property
    def stats(self) -> EngineStats:
        """The backend's stats as of its last message (sent with every step's events)."""
        return self._stats

    def _send_locked(self, message: ToEngine) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(message)

    def _read(self) -> None:
        assert self._conn is not None and self._proc is not None
        while True:
            try:
                message: FromEngine = self._conn.recv()
            except (EOFError, OSError):
                break
            assert isinstance(message, Events), message
            # Stats first: whoever sees a terminal event also sees the engine without it.
            self._stats = message.stats
            if self.on_prefix_change is not None and (
                message.prefix_left or message.prefix_arrived
            ):
                self.on_prefix_change(message.prefix_left, message.prefix_arrived)
            routed: list[tuple[Generation, list[EngineEvent]]] = []
            with self._lock:
                for shipped in message.requests:
                    ended = is_terminal(shipped.events[-1])
                    take = self._live.pop if ended else self._live.get
                    generation = take(shipped.request_id, None)
                    if generation is not None:
                        routed.append((generation, shipped.events))
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


def serve(conn: Connection, backend_name: BackendName, path: Path, options: BackendOptions) -> None:
    """Runs a backend for the worker at the other end of `conn` until told to stop or it dies."""
    from workers.backends import create_backend  # torch, if at all: in the child only

    backend = create_backend(backend_name, path, options)
    live: dict[str, Generation] = {}
    ship_lock = threading.Lock()  # the stepping thread ships; the command loop submits
    left: list[bytes] = []
    arrived: list[bytes] = []
    prefix_cache = getattr(backend, "prefix_cache", None)

    prefix_lock = threading.Lock()  # the lists above: filled by the stepping thread

    def prefix_changed(gone: list[bytes], new: list[bytes]) -> None:
        with prefix_lock:
            left.extend(gone)
            arrived.extend(new)

    if prefix_cache is not None:
        prefix_cache.on_change = prefix_changed

    def send(requests: list[RequestEvents]) -> None:
        with prefix_lock:
            gone, new = left[:], arrived[:]
            del left[:], arrived[:]
        with contextlib.suppress(OSError):  # the worker is gone: the loop below ends
            conn.send(Events(requests, backend.stats, gone, new))

    def ship() -> None:
        with ship_lock:
            shipped: list[RequestEvents] = []
            for request_id, generation in list(live.items()):
                events = generation.drain()
                if events:
                    shipped.append(RequestEvents(request_id, events))
                    if is_terminal(events[-1]):
                        del live[request_id]
            if shipped or left or arrived:
                send(shipped)

    backend.on_events = ship
    conn.send(Ready(backend.stats))
    backend.start()
    try:
        while True:
            try:
                message: ToEngine = conn.recv()
            except (EOFError, OSError):
                log.warning("the worker is gone; stopping its engine")
                return
            if isinstance(message, Submit):
                request_id = message.submission.request_id
                with ship_lock:  # registered before the stepping thread can ship its events
                    try:
                        generation = live[request_id] = backend.submit(message.submission)
                    except ValueError as exc:  # still running here
                        log.error("refused %s: %s", request_id, exc)
                        send([RequestEvents(request_id, [Failed(f"refused: {exc}")])])
                    else:
                        if generation.cache_use is not None:  # kept off the event queue
                            send([RequestEvents(request_id, [generation.cache_use])])
                ship()  # a prompt the backend refused has its Failed queued already
            elif isinstance(message, Cancel):
                backend.cancel(message.request_id)
            elif isinstance(message, Stop):
                return
    finally:
        backend.stop()  # fails what is left, then ships it
        ship()
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model_path", type=Path)
    parser.add_argument("--fd", type=int, required=True, help="the worker's socket")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "echo"])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prepare", metavar="MODEL_ID", help="make the model's folder first")
    parser.add_argument("--kv-budget-bytes", type=int, default=None)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None)
    parser.add_argument("--background-reserve", type=int, default=None)
    parser.add_argument("--prefix-cache-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    # The worker stops this process when its own shutdown grace is over.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    conn = Connection(args.fd)
    if args.prepare is not None:
        from workers.models.fetch import ModelFetchError
        from workers.models.prepare import prepare_model, served
        from workers.settings import WorkerSettings

        settings = WorkerSettings()
        try:
            (spec,) = served(load_catalog(settings.models_file), [args.prepare])
            prepare_model(spec, settings)
        except ModelFetchError as exc:
            log.critical("%s", exc)
            return 2
    options = BackendOptions(
        max_batch=args.max_batch,
        num_threads=args.threads,
        kv_budget_bytes=args.kv_budget_bytes,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        background_reserve=args.background_reserve,
        prefix_cache_bytes=args.prefix_cache_bytes,
    )
    serve(conn, args.backend, args.model_path, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
