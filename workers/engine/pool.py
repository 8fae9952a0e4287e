"""The engine's pool: prepared rows waiting for the device, by (task, model), across jobs (TEI's queue).

Each model's rows are kept in (priority, start tag) order: 0 first, then the lowest tag. The tags share
the device between tenants by rows (start-time fair queueing, as the fair fetch shares the queues): a job
starts at the later of the pool's clock (the tag of the last batch's first row) and its tenant's previous
job's finish, and each of its rows after the first adds one over the tenant's weight (BERTQ_TENANT_WEIGHTS).
One tenant's jobs keep their arrival order, as before tenants; another tenant's new job does not wait
behind the thousands of rows the first one's jobs hold here, only behind its share of them. The forward
thread takes one batch at a time: when the device is idle and no batch is full yet, it waits up to
``BERTQ_MAX_WAIT_MS`` after the first row arrived for more to fill it, then takes the length-sorted batch
that holds that first row, under the model's budget of padded tokens."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

from bertq.schemas import TaskName
from bertq.tasks.base import Row, padded_length
from bertq.workers.batcher import batch_of
from bertq.workers.engine.jobs import Job
from bertq.workers.runner import distinct_rows

from bertq.settings import Settings

#: Deadline entries kept before those of jobs no longer pooled are dropped: finished jobs would otherwise
#: stay referenced (results and all) until their deadline, an hour of jobs under a one-hour limit.
COMPACT_DEADLINES = 1024
SCAN_BATCHES = 8  # a batch is packed from at most this many full batches' worth of the oldest rows


@dataclass(eq=False)
class PendingRow:
    row: Row
    job: Job
    rank: tuple[int, float]  # (priority, start tag): 0 first, then the lowest tag first
    arrived: float = 0.0  # monotonic time it was pooled: the bounded wait counts from the first row's
    copies: list[Row] = field(default_factory=list)  # rows of the same job with the same input


class Pool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.closed = False  # draining: no rows come in, and no batch waits to fill
        self._stopped = False
        self._rows: dict[tuple[TaskName, str], list[PendingRow]] = {}
        self._changed = threading.Condition()
        self._deadlines: list[tuple[float, int, Job]] = []  # a heap, of jobs with a time limit
        self._order = itertools.count()
        self._compact_at = COMPACT_DEADLINES
        self._weights = settings.weights()
        self._clock = 0.0  # the start tag of the last batch's first row
        self._finish: dict[str, float] = {}  # per tenant: the finish tag of its last job pooled

    def add(self, jobs: list[tuple[Job, list[Row]]]) -> bool:
        """Pool each job's rows, each distinct input once, in their place by rank, all at once (the forward
        thread sees them together). False, and nothing pooled, once the pool is closed."""
        now = time.monotonic()
        with self._changed:
            if self.closed:
                return False
            ranked = [self._pending(job, rows, now) for job, rows in jobs if rows]
            for pending in ranked:
                job = pending[0].job
                key = (job.task.name, job.loaded.model_id)
                rows_of = self._rows.setdefault(key, [])
                if rows_of and rows_of[-1].rank > pending[0].rank:  # ahead of some: merged in their places
                    self._rows[key] = list(heapq.merge(rows_of, pending, key=lambda p: p.rank))
                else:
                    rows_of += pending
                job.pooled += len(pending)
                if job.time_limit is not None:
                    heapq.heappush(self._deadlines, (job.deadline, next(self._order), job))
            if len(self._deadlines) > self._compact_at:  # finished jobs' entries, held until their deadline
                self._deadlines = [entry for entry in self._deadlines if entry[2].pooled]
                heapq.heapify(self._deadlines)
                self._compact_at = max(COMPACT_DEADLINES, 2 * len(self._deadlines))
            self._changed.notify_all()
        return True

    def _pending(self, job: Job, rows: list[Row], now: float) -> list[PendingRow]:
        """The job's rows as the pool holds them: each distinct input once, its copies beside it, each with
        its start tag: the job's start, plus the rows before it over the tenant's weight."""
        distinct, position = distinct_rows(rows)
        tenant, priority = job.delivery.tenant, job.delivery.priority
        weight = self._weights.get(tenant, 1.0)
        start = max(self._clock, self._finish.get(tenant, 0.0))
        self._finish[tenant] = start + len(distinct) / weight
        pending = [PendingRow(rows[i], job, (priority, start + k / weight), now) for k, i in enumerate(distinct)]
        for index, row in enumerate(rows):
            if distinct[position[index]] != index:
                pending[position[index]].copies.append(row)
        return pending

    def close(self) -> list[Job]:
        """Take no more rows. Returns the jobs none of whose rows has started, taken out of the pool;
        the rows of started jobs stay, to be finished."""
        with self._changed:
            self.closed = True
            unstarted = {id(p.job): p.job for rows in self._rows.values() for p in rows if not p.job.started}
            self._take_out(unstarted)
            self._changed.notify_all()
        return list(unstarted.values())

    def past_time_limit(self) -> list[Job]:
        """The jobs whose time limit has passed while rows of theirs still wait, those rows taken out."""
        now = time.monotonic()
        with self._changed:
            late: dict[int, Job] = {}
            while self._deadlines and self._deadlines[0][0] <= now:
                job = heapq.heappop(self._deadlines)[2]
                if job.pooled:
                    late[id(job)] = job
            if late:
                self._take_out(late)
        return list(late.values())

    def _take_out(self, jobs: dict[int, Job]) -> None:
        for key, rows in self._rows.items():
            self._rows[key] = [pending for pending in rows if id(pending.job) not in jobs]
        for job in jobs.values():
            job.pooled = 0

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def next_batch(self) -> tuple[list[PendingRow], list[Job]] | None:
        """Wait for the next batch (None once stopped): the one that holds the first row, of the highest
        priority (0 first) and the oldest among equals. Also returns the jobs this batch starts."""
        max_wait = self.settings.max_wait_ms / 1000
        with self._changed:
            while True:
                if self._stopped:
                    return None
                groups = [(rows[0].rank, key) for key, rows in self._rows.items() if rows]
                if not groups:
                    self._changed.wait()
                    continue
                _, key = min(groups)
                rows = self._rows[key]
                wait = rows[0].arrived + max_wait - time.monotonic()
                if wait <= 0 or self._is_full(rows) or self.closed:
                    break
                self._changed.wait(wait)
            batch = self.select(rows)
            self._clock = max(self._clock, rows[0].rank[1])
            taken = {id(pending) for pending in batch}
            for pending in batch:
                pending.job.pooled -= 1
            scanned = self.settings.max_batch_rows * SCAN_BATCHES  # the batch is of these: the rest stays as is
            self._rows[key] = [pending for pending in rows[:scanned] if id(pending) not in taken] + rows[scanned:]
            first = list({id(p.job): p.job for p in batch if not p.job.started}.values())
            for job in first:
                job.started = True  # under the pool lock: close sees it
        return batch, first

    def select(self, rows: list[PendingRow]) -> list[PendingRow]:
        """Of the length-sorted batches the first rows pack into, the one holding the first row:
        sorted batches for throughput, and no row waits behind newer or lower-priority work for long.
        Only the first ``SCAN_BATCHES`` batches' worth of rows are packed, so a full pool (thousands of
        held rows) does not make every batch pay for sorting all of it."""
        window = rows[: self.settings.max_batch_rows * SCAN_BATCHES]
        rows_of_window = [pending.row for pending in window]
        first = 0  # the pool is kept in (priority, arrival) order
        chosen = batch_of(rows_of_window, first, self._budget(window), self.settings.max_batch_rows)
        return [window[i] for i in chosen]

    def _budget(self, rows: list[PendingRow]) -> int:
        """Padded tokens a batch of these rows' model may hold: less after it ran out of memory."""
        budget = rows[0].job.loaded.budget
        return budget.tokens(self.settings.max_batch_tokens) if budget is not None else self.settings.max_batch_tokens

    def _is_full(self, rows: list[PendingRow]) -> bool:
        if len(rows) >= self.settings.max_batch_rows:
            return True
        return len(rows) * padded_length(max(len(pending.row) for pending in rows)) >= self._budget(rows)
