"""What the engine holds: every delivery taken from a source and not yet let go, the room left for more,
the turn of one source to run a delivery alone, and the sink calls that let deliveries go (stored and
acknowledged, or released back to their source).

Every sink call is retried while Redis is at fault (``bertq.connection.retry``): an outage delays
results, it never fails a job.

Running alone: a job on its last delivery runs with nothing beside it, from whichever source. If it is
what kills workers, it dies alone, and no healthy job of any source shares its fate (or its delivery
count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from bertq.workers.engine.delivery import Claim, Delivery, Observer, Outcome
from bertq.workers.engine.jobs import log_outcome
from bertq.workers.stages import STAGES

from bertq.connection import GiveUp, retry
from bertq.log import get_logger
from bertq.settings import Settings

log = get_logger(__name__)


class Held:
    def __init__(self, settings: Settings, observer: Observer, worker_name: str, stop: threading.Event) -> None:
        self.settings = settings
        self.observer = observer
        self.worker_name = worker_name
        self._stop = stop  # once set, sink calls give up retrying
        self.closed = False  # draining: no room for more
        self.items = 0
        self.released = 0  # deliveries released back to their sources, all told
        self.redis_trouble_at = 0.0  # last failed sink call
        self._deliveries: dict[int, Delivery] = {}
        self._changed = threading.Condition()
        self._alone_wanted: set[str] = set()  # sources with a delivery to run alone (on its last delivery)
        self._alone: str | None = None  # the source whose turn it is to run deliveries alone
        self._alone_left: set[int] = set()  # its deliveries not yet stored or released

    # ---- taking ---------------------------------------------------------------------------------

    def take(self, deliveries: list[Delivery], alone: bool) -> None:
        with self._changed:
            if alone:
                assert self._alone is not None
                self._alone_left = {id(delivery) for delivery in deliveries}
            for delivery in deliveries:
                self._deliveries[id(delivery)] = delivery
                self.items += delivery.item_count

    def close(self) -> None:
        """Draining: no room for more, whatever leaves."""
        self.closed = True

    @property
    def messages(self) -> int:
        return len(self._deliveries)

    def deliveries(self) -> list[Delivery]:
        with self._changed:
            return list(self._deliveries.values())

    def room(self) -> int:
        """Deliveries a source may still hand over: under both the prefetch and the held-items caps, and
        none while a delivery waits to run alone or runs alone, whatever its source."""
        if self.closed or self._alone_wanted or self._alone is not None:
            return 0
        if self.items >= self.settings.max_held_items:
            return 0
        return max(0, self.settings.prefetch - len(self._deliveries))

    def wait_for_room(self, timeout: float, needed: int) -> None:
        with self._changed:
            if self.room() < needed:
                self._changed.wait(timeout)

    def wait_until_empty(self, give_up: threading.Event) -> None:
        with self._changed:
            while self._deliveries and not give_up.is_set():
                self._changed.wait(0.1)

    # ---- running one delivery alone ---------------------------------------------------------------

    def want_alone(self, source: str, wanted: bool) -> None:
        with self._changed:
            if wanted == (source in self._alone_wanted):
                return  # every step of every source says it: waking the others for nothing made two spin
            (self._alone_wanted.add if wanted else self._alone_wanted.discard)(source)
            self._changed.notify_all()

    def take_turn_alone(self, source: str) -> bool:
        with self._changed:
            if self._deliveries or self._alone is not None:
                return False
            self._alone = source
            return True

    def end_turn_alone(self) -> None:
        with self._changed:
            self._alone, self._alone_left = None, set()
            self._changed.notify_all()

    def running_alone(self) -> bool:
        return self._alone is not None

    # ---- letting go: the sink calls ---------------------------------------------------------------

    def claim(self, deliveries: list[Delivery]) -> list[Claim]:
        """Each delivery's claim, in their order (one call per sink)."""
        STAGES.enter("claim")
        claims: dict[int, Claim] = {}
        for sink, group in _by_sink(deliveries):
            claims.update(zip(map(id, group), self._retry(partial(sink.claim, group), "claim")))
        return [claims[id(delivery)] for delivery in deliveries]

    def store(self, outcomes: list[Outcome]) -> None:
        for sink, group in _by_sink(outcomes, key=lambda o: o.delivery.sink):
            STAGES.enter("store")  # a Redis sink enters serialise for its records' JSON, then store again
            stored = self._retry(partial(sink.finish, group), "store results")
            for outcome, fresh in zip(group, stored):
                log_outcome(outcome, fresh, self.worker_name)
                self.observer.finished(outcome, fresh)
            self.forget(o.delivery for o in group)

    def acknowledge(self, deliveries: list[Delivery]) -> None:
        STAGES.enter("store")
        for sink, group in _by_sink(deliveries):
            self._retry(partial(sink.acknowledge, group), "acknowledge")
            self.forget(group)

    def release(self, deliveries: list[Delivery], give_up: threading.Event | None = None) -> int:
        """Back to their sources; with Redis away until ``give_up``, they stay in flight (and are
        reclaimed once this worker's heartbeat stops). Returns how many went back."""
        released = 0
        for sink, group in _by_sink(deliveries):
            try:
                retry(partial(sink.release, group), "release", give_up or self._stop)
            except GiveUp:
                log.warning("could not release to the queue: Redis unreachable", jobs=len(group))
                continue
            self.forget(group)
            released += len(group)
        with self._changed:  # the prepare thread and drain both release
            self.released += released
        if released:
            log.info("released to the queue", jobs=released)
        return released

    def forget(self, deliveries: Iterable[Delivery]) -> None:
        """No longer held: stored, acknowledged, released, or no longer this worker's."""
        with self._changed:
            for delivery in deliveries:
                if self._deliveries.pop(id(delivery), None) is not None:
                    self.items -= delivery.item_count
                if id(delivery) in self._alone_left:
                    self._alone_left.discard(id(delivery))
                    if not self._alone_left:
                        self._alone = None
            self._changed.notify_all()

    def _retry(self, operation: Callable[[], Any], what: str) -> Any:
        failures = 0

        def trouble(_: BaseException) -> None:
            nonlocal failures
            failures += 1
            self.redis_trouble_at = time.monotonic()
            self.observer.redis_error(what)

        result = retry(operation, what, self._stop, on_error=trouble)
        if failures:
            self.observer.redis_back(what)
        return result


def _by_sink(things: Iterable[Any], key: Callable[[Any], Any] = lambda d: d.sink) -> list[tuple[Any, list[Any]]]:
    groups: dict[int, tuple[Any, list[Any]]] = {}
    for thing in things:
        sink = key(thing)
        groups.setdefault(id(sink), (sink, []))[1].append(thing)
    return list(groups.values())
