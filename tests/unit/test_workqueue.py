"""The controller's work queue: dedup, delays, one worker per key at a time, and the global rate limit."""

from __future__ import annotations

import threading

from spin_k8s.controller.manager import RateLimiter, WorkQueue

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


def test_a_resync_spreads_its_keys_over_the_period_and_an_event_still_goes_first() -> None:
    q = WorkQueue()
    q.add_spread([("ns", "a"), ("ns", "b"), ("ns", "c")], 60)  # due at 0, 20 and 40 s
    assert q.get(STOP) == ("ns", "a")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert q.get(stop) is None  # b and c are not due yet
    q.add(("ns", "c"))  # an event for c
    assert q.get(STOP) == ("ns", "c")


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


def test_the_global_bucket_spaces_requeues_of_different_keys() -> None:
    """Per-key backoff alone lets many failing runs retry together; the shared bucket (here 1 token, refilled
    once a minute) hands out the first at once and holds the next although its own delay is 0."""
    q = WorkQueue(RateLimiter(qps=1 / 60, burst=1))
    q.add_rate_limited(("ns", "a"))
    q.add_rate_limited(("ns", "b"))
    assert q.get(STOP) == ("ns", "a")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert q.get(stop) is None  # "b" waits for the bucket
    q.add(("ns", "b"))  # a watch event is not rate limited: it goes at once
    assert q.get(STOP) == ("ns", "b")

