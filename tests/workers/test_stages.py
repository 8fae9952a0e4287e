"""The stage clock: each thread's CPU time goes to the stage it was in, waiting costs nothing, and the
threads' stages add up."""

from __future__ import annotations

import threading
import time

from bertq.workers.stages import NAMES, StageClock


def spin(seconds: float) -> None:
    """Burn this thread's CPU for about ``seconds``."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_goes_to_the_stage_the_thread_was_in() -> None:
    clock = StageClock()
    clock.enter("tokenize")
    spin(0.05)
    clock.enter("forward")
    spin(0.02)
    clock.leave()
    spin(0.05)  # after leaving: charged to no stage
    seconds = clock.seconds()
    assert 0.05 <= seconds["tokenize"] < 0.07
    assert 0.02 <= seconds["forward"] < 0.04
    assert sum(seconds.values()) < 0.1
    assert set(seconds) == set(NAMES)


def test_a_thread_that_waits_is_charged_nothing_for_the_wait() -> None:
    clock = StageClock()
    clock.enter("store")
    time.sleep(0.2)  # a Redis round trip, say: no CPU
    clock.leave()
    assert clock.seconds()["store"] < 0.02


def test_the_stages_of_every_thread_add_up() -> None:
    clock = StageClock()

    def work(stage: str) -> None:
        clock.enter(stage)
        spin(0.03)
        clock.leave()

    threads = [threading.Thread(target=work, args=(stage,)) for stage in ("decode", "decode", "collate")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = clock.seconds()
    assert 0.06 <= seconds["decode"] < 0.1
    assert 0.03 <= seconds["collate"] < 0.06


def test_what_a_thread_spends_in_its_current_stage_is_counted_once_it_moves_on() -> None:
    clock = StageClock()
    clock.enter("batch")
    spin(0.03)
    assert clock.seconds()["batch"] == 0
    clock.enter("collate")
    assert clock.seconds()["batch"] >= 0.03
