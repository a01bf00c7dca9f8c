"""The engine in a child process (`workers.engine_process`): same answers as in-process, and the
child's life is tied to the worker's (real child processes, the default model)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from contract.rendering import PromptRenderer
from tests.unit.test_engine import PROMPTS, greedy
from workers.backends.seam import (
    BackendOptions,
    Failed,
    Finished,
    Generation,
    Submission,
    TextChunk,
)
from workers.backends.transformers.engine import TransformersEngine
from workers.engine_ipc import Cancel, Events, Ready, Stop, Submit
from workers.engine_process import EngineProcess, serve


def collect(generation: Generation, timeout: float = 60) -> tuple[str, Finished | Failed]:
    events = list(generation.events(timeout=timeout))
    final = events[-1]
    assert isinstance(final, Finished | Failed)
    return "".join(e.text for e in events if isinstance(e, TextChunk)), final


def alive(pid: int) -> bool:
    """Running (an exited child nobody has reaped yet is a zombie: not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def renderer(tiny_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_folder(tiny_model_dir)


def ids_of(renderer: PromptRenderer, text: str) -> list[int]:
    return renderer.encode(renderer.render(None, [("user", text)]))


@pytest.fixture(scope="module")
def proc(tiny_model_dir: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess.load(tiny_model_dir, max_batch=8)
    yield engine
    engine.stop()


def test_concurrent_requests_match_the_in_process_engine(
    proc: EngineProcess, renderer: PromptRenderer, tiny_model_dir: Path
) -> None:
    reference = TransformersEngine.load(tiny_model_dir, max_batch=8)
    try:
        expected = [
            collect(reference.submit(Submission(f"ref{i}", ids_of(renderer, p), greedy())))
            for i, p in enumerate(PROMPTS)
        ]
    finally:
        reference.stop()
    before = proc.stats
    generations = [
        proc.submit(Submission(f"p{i}", ids_of(renderer, p), greedy()))
        for i, p in enumerate(PROMPTS)
    ]
    assert [collect(g) for g in generations] == expected
    # The stats arrive with the events, so they already count every request that ended.
    assert proc.stats.finished - before.finished == len(PROMPTS)
    assert proc.stats.max_batch_seen > 1
    assert proc.stats.active == 0


def test_cancel_frees_the_slot(proc: EngineProcess, renderer: PromptRenderer) -> None:
    generation = proc.submit(Submission("long", ids_of(renderer, PROMPTS[0]), greedy(1000)))
    first = generation.get(timeout=30)
    assert isinstance(first, TextChunk)
    assert proc.cancel("long")
    _, final = collect(generation)
    assert isinstance(final, Finished) and final.cancelled
    assert 0 < final.output_tokens < 1000
    assert proc.stats.active == 0
    assert not proc.cancel("long")  # gone: nothing to cancel


def test_bad_prompts_and_duplicates_are_refused(
    proc: EngineProcess, renderer: PromptRenderer
) -> None:
    assert collect(proc.submit(Submission("empty", [], greedy())))[1] == Failed(
        "the prompt is empty"
    )
    _, final = collect(proc.submit(Submission("vocab", [10**9], greedy())))
    assert isinstance(final, Failed) and "outside the vocabulary" in final.message
    generation = proc.submit(Submission("twice", ids_of(renderer, PROMPTS[0]), greedy(1000)))
    with pytest.raises(ValueError):
        proc.submit(Submission("twice", ids_of(renderer, "hi"), greedy()))
    proc.cancel("twice")
    collect(generation)
    # Once it has ended, the id may be used again.
    assert isinstance(
        collect(proc.submit(Submission("twice", ids_of(renderer, "hi"), greedy(4))))[1], Finished
    )


def test_stop_fails_what_is_running(tiny_model_dir: Path, renderer: PromptRenderer) -> None:
    engine = EngineProcess.load(tiny_model_dir, max_batch=2)
    generations = [
        engine.submit(Submission(f"s{i}", ids_of(renderer, PROMPTS[0]), greedy(1500)))
        for i in range(3)
    ]
    assert isinstance(generations[0].get(timeout=30), TextChunk)
    engine.stop()
    for generation in generations:
        assert collect(generation)[1] == Failed("the engine stopped")
    assert engine.pid is not None and not alive(engine.pid)
    after = engine.submit(Submission("late", ids_of(renderer, "hi"), greedy()))
    assert collect(after)[1] == Failed("the engine stopped")


def test_a_dead_child_fails_its_requests_and_tells_the_owner(
    tiny_model_dir: Path, renderer: PromptRenderer
) -> None:
    exits: list[int | None] = []
    told = threading.Event()

    def on_exit(code: int | None) -> None:
        exits.append(code)
        told.set()

    engine = EngineProcess.load(tiny_model_dir, max_batch=4, on_exit=on_exit)
    generation = engine.submit(Submission("victim", ids_of(renderer, PROMPTS[0]), greedy(1500)))
    assert isinstance(generation.get(timeout=30), TextChunk)
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    _, final = collect(generation)
    assert isinstance(final, Failed) and "engine process exited" in final.message
    assert told.wait(10) and exits == [-signal.SIGKILL]
    later = engine.submit(Submission("later", ids_of(renderer, "hi"), greedy()))
    assert isinstance(collect(later)[1], Failed)
    engine.stop()


def test_the_child_ignores_sigterm(proc: EngineProcess, renderer: PromptRenderer) -> None:
    """A terminal's Ctrl-C or a group SIGTERM goes to the worker; it decides when to stop."""
    generation = proc.submit(Submission("term", ids_of(renderer, "hi"), greedy(40)))
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGINT)
    _, final = collect(generation)
    assert isinstance(final, Finished) and not final.cancelled
    assert alive(proc.pid)


def test_the_child_exits_when_the_worker_is_killed(tiny_model_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from workers.engine_process import EngineProcess, serve
        engine = EngineProcess.load({str(tiny_model_dir)!r}, max_batch=2)
        print(engine.pid, flush=True)
        time.sleep(600)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        assert alive(child)
        worker.kill()
        worker.wait()
        wait_until(lambda: not alive(child))
    finally:
        worker.kill()


def test_the_child_answers_a_duplicate_submit_with_a_failure(
    tiny_model_dir: Path, renderer: PromptRenderer
) -> None:
    """The child's side of the socket, run here: a request id it already runs is refused with a
    Failed event (the worker side never sends one, but must not wait forever if it did)."""
    ours, theirs = socket.socketpair()
    worker, child = Connection(ours.detach()), Connection(theirs.detach())
    args = (child, "transformers", tiny_model_dir, BackendOptions(max_batch=2))
    thread = threading.Thread(target=serve, args=args, daemon=True)
    thread.start()
    try:
        assert isinstance(worker.recv(), Ready)
        submit = Submit(Submission("dup", ids_of(renderer, PROMPTS[0]), greedy(1000)))
        worker.send(submit)
        worker.send(submit)
        refusals: list[Failed] = []
        while not refusals:
            assert worker.poll(30)
            message = worker.recv()
            assert isinstance(message, Events)
            refusals += [
                e for shipped in message.requests for e in shipped.events if isinstance(e, Failed)
            ]
        assert refusals[0].message.startswith("refused")
        worker.send(Cancel("dup"))
    finally:
        worker.send(Stop())
        thread.join(30)
    assert not thread.is_alive()
