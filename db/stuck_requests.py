"""Settle requests that nobody else will: their worker died, or they were never picked up.

The rule. A request is swept when it is
- `queued` for longer than `queued_timeout_s` (no worker took it: the broker lost the task or
  the API died before it gave up on it), or
- `running` on a worker that is not alive (its heartbeat is gone: the process died), or
- `running` for longer than `running_timeout_s` (the longest generation allowed).
A swept request is settled as `failed` through `db.ledger.settle_request`: charged nothing,
its whole reservation released, like any request that failed on our side. Tokens a dead worker
produced are not billed: we cannot prove what the client received, and the client got no
complete answer. A worker that settles the request later finds it settled and changes nothing.

Any number of sweepers (one per worker process) may run at once: candidates are locked with
SELECT ... FOR UPDATE SKIP LOCKED, so each stuck request is settled by exactly one of them and
no sweeper waits on another. Functions take a session and never commit.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, literal_column, or_, select
from sqlalchemy.orm import Session

from db.ledger import Outcome, settle_request
from db.models import Request

log = logging.getLogger("abl.sweeper")

WorkerAlive = Callable[[str], bool]
"""Whether the worker with this name is alive (e.g. its Redis heartbeat exists). It should
raise, not answer False, when it cannot tell: an unreachable Redis is not a dead worker."""

# Requests settled per call; the caller loops while a call returns a full batch.
SWEEP_BATCH = 500
# Literals, not parameters: a prepared (generic) plan can then still prove that the partial
# index ix_request_open (status IN ('queued','running')) covers the query, and use it.
QUEUED = Request.status == literal_column("'queued'")
RUNNING = Request.status == literal_column("'running'")


@dataclass(frozen=True)
class _Stuck:
    id: str
    status: str
    worker: str | None


def sweep(
    session: Session,
    is_worker_alive: WorkerAlive,
    now: datetime | None = None,
    *,
    queued_timeout_s: float,
    running_timeout_s: float,
    limit: int = SWEEP_BATCH,
) -> list[str]:
    """Settle up to `limit` stuck requests as failed (the rule above); their ids.

    `now` defaults to the database's clock, the one that stamped `created_at`.
    """
    clock: Any = func.now() if now is None else now
    queued_deadline = clock - timedelta(seconds=queued_timeout_s)
    running_deadline = clock - timedelta(seconds=running_timeout_s)
    workers = session.scalars(select(Request.worker).where(RUNNING).distinct()).all()
    dead = sorted(w for w in workers if w is not None and not is_worker_alive(w))
    stuck = or_(
        and_(QUEUED, Request.created_at < queued_deadline),
        and_(
            RUNNING,
            or_(
                func.coalesce(Request.started_at, Request.created_at) < running_deadline,
                Request.worker.is_(None),
                Request.worker.in_(dead) if dead else false(),
            ),
        ),
    )

    def reason(row: _Stuck) -> str:
        if row.status == "queued":
            return f"swept: queued for over {queued_timeout_s:g}s, no worker took it"
        if row.worker is None or row.worker in dead:
            return f"swept: worker {row.worker} died (heartbeat gone)"
        return f"swept: running for over {running_timeout_s:g}s"

    return _settle_failed(session, stuck, reason, limit)


def release_orphans(session: Session, worker: str, *, limit: int = SWEEP_BATCH) -> list[str]:
    """Settle as failed the requests `running` on `worker`: call it when a worker starts, so a
    process reusing a dead one's name (a restarted container) frees what that one held."""
    orphaned = and_(RUNNING, Request.worker == worker)
    return _settle_failed(
        session, orphaned, lambda _: f"swept: worker {worker} restarted while running it", limit
    )


def _settle_failed(
    session: Session,
    condition: ColumnElement[bool],
    reason: Callable[[_Stuck], str],
    limit: int,
) -> list[str]:
    # FOR UPDATE re-checks `condition` on the newest row version, so a request settled by its
    # worker meanwhile drops out; SKIP LOCKED leaves rows another sweeper holds to it.
    rows = session.execute(
        select(Request.id, Request.status, Request.worker, Request.account_id)
        .where(condition)
        .order_by(Request.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    settled: list[str] = []
    # Account rows locked in one global order: two sweepers settling requests of the same
    # accounts can never deadlock.
    for row in sorted(rows, key=lambda r: (r.account_id, r.id)):
        stuck = _Stuck(row.id, row.status, row.worker)
        why = reason(stuck)
        outcome = Outcome.unbilled("failed", why)
        if not settle_request(session, stuck.id, outcome).already_settled:
            log.warning("request %s (%s on %s): %s", stuck.id, stuck.status, stuck.worker, why)
            settled.append(stuck.id)
    return settled
