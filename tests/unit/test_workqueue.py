"""The controller's work queue: dedup, delays, and one worker per key at a time."""

from __future__ import annotations

import threading

from spin_k8s.controller.manager import WorkQueue

STOP = threading.Event()


def test_a_key_is_queued_once_at_its_earliest_due_time() -> None:
    q = WorkQueue()
    q.add(("ns", "a"), 60)
    q.add(("ns", "a"))  # sooner wins
    q.add(("ns", "a"), 30)  # later is ignored
    assert q.get(STOP) == ("ns", "a")
    q.done(("ns", "a"))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert q.get(stop) is None  # nothing left


def test_a_key_in_progress_is_not_handed_out_again_until_done() -> None:
    q = WorkQueue()
    q.add(("ns", "a"))
    assert q.get(STOP) == ("ns", "a")
    q.add(("ns", "a"))  # an event arrives while a worker reconciles it
    q.add(("ns", "b"))
    assert q.get(STOP) == ("ns", "b")  # another worker gets the other run, not this one twice
    q.done(("ns", "b"))
    q.done(("ns", "a"))
    assert q.get(STOP) == ("ns", "a")  # the change seen meanwhile is reconciled afterwards
