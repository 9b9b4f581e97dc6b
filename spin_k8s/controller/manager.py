"""The controller process: leader election, watches that only enqueue run keys, a deduplicating work
queue with per-key backoff under one global token bucket, a periodic resync, and ``python -m spin_k8s.controller``.

Only the leader (a coordination.k8s.io Lease, client-go's semantics: :class:`LeaderElector`) reconciles, so two
replicas are safe: a leader that has not renewed within the renew deadline has every write refused before it is
sent, and one that stops (SIGTERM) releases the Lease for a standby to take at once. A new leader needs no
hand-over: everything it needs is in the API server and in lineage.

Every API call has a client-side timeout; watches also have a server-side one and a socket read timeout just
above it (a half-open connection otherwise blocks a watch forever), ask for bookmarks and resume from the last
resourceVersion seen; lists are paginated, and a 410 Gone or a broken watch means list again.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import heapq
import logging
import math
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from spin_k8s import api, naming
from spin_k8s.controller import crdcheck, metrics
from spin_k8s.controller.reconcile import LOCKED_DOWN, Cache, Kube, Reconciler, StoragePolicy

log = logging.getLogger("spin_k8s.controller")
Key = tuple[str, str]
LEASE_NAME = "spin-k8s-controller"
PAGE = 500  # objects per list page
WORKERS = 32  # reconciles at once (--workers): each mostly waits on the API server or S3


class RateLimiter:
    """A token bucket shared by every key (client-go's default controller rate limiter pairs one, 10 qps with
    a burst of 100, with the per-key backoff): however many keys fail or change at once, reconciles start at
    no more than ``qps`` a second once ``burst`` is spent."""

    def __init__(self, qps: float = 10.0, burst: int = 100) -> None:
        self.qps, self.burst = qps, burst
        self._tokens, self._at = float(burst), time.monotonic()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it (0 while the bucket has tokens). Not thread-safe:
        the queue calls it under its lock."""
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
        self._at = now
        self._tokens -= 1
        return max(0.0, -self._tokens / self.qps)


class WorkQueue:
    """Keys waiting for a reconcile, each at most once, each at its own due time; a key being reconciled
    is handed to no other worker (one added meanwhile waits for :meth:`done`)."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()
        self._due: dict[Key, float] = {}
        self._heap: list[tuple[float, Key]] = []
        self._processing: set[Key] = set()
        self._again: dict[Key, float] = {}
        self._cv = threading.Condition()

    def add(self, key: Key, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        with self._cv:
            if key in self._processing:
                self._again[key] = min(delay, self._again.get(key, delay))
                return
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))
            self._cv.notify()

    def add_spread(self, keys: list[Key], seconds: float) -> None:
        """Keys due one after another over ``seconds`` (a resync): a thousand runs due at once would hold up
        every reaction queued behind them. An event for one of them makes it due at once, as :meth:`add` does."""
        for i, key in enumerate(keys):
            self.add(key, i * seconds / len(keys))

    def add_rate_limited(self, key: Key, delay: float = 0.0) -> None:
        """A requeue the controller asks for itself (a retry, more to do): no sooner than ``delay`` nor than the
        global bucket allows, so no number of failing or busy runs makes a hot loop."""
        with self._cv:
            wait = self.limiter.reserve()
        self.add(key, max(delay, wait))

    def get(self, stop: threading.Event) -> Key | None:
        with self._cv:
            while not stop.is_set():
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded entry
                wait = self._heap[0][0] - time.monotonic() if self._heap else 1.0
                if self._heap and wait <= 0:
                    _, key = heapq.heappop(self._heap)
                    metrics.observe("spin_controller_queue_wait_seconds", -wait)
                    del self._due[key]
                    self._processing.add(key)
                    return key
                self._cv.wait(min(wait, 1.0))
        return None

    def done(self, key: Key) -> None:
        with self._cv:
            self._processing.discard(key)
            again = self._again.pop(key, None)
        if again is not None:
            self.add(key, again)


@dataclass(frozen=True)
class LeaseTimes:
    """client-go's leader election durations, in seconds (duration > renew_deadline > retry_period)."""

    duration: float = 15.0  # a standby takes over this long after it last saw the Lease's record change
    renew_deadline: float = 10.0  # a leader that has not renewed for this long stops acting at once
    retry_period: float = 2.0  # how often a leader renews and a standby tries to acquire

    def __post_init__(self) -> None:
        if not self.duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError(f"lease times must keep duration > renew deadline > retry period > 0: {self}")

    @classmethod
    def scaled(cls, duration: float) -> LeaseTimes:
        """client-go's defaults (15/10/2 s) scaled to ``duration``."""
        return cls(duration, duration * 2 / 3, duration * 2 / 15)


class NotLeading(RuntimeError):
    """A write refused before it was sent: this process is not a leader that renewed in time."""


class LeaderElector:
    """A coordination.k8s.io Lease held by one replica at a time, with client-go's semantics.

    Expiry is judged only from local observation times (monotonic: a paused process sees the pause as time
    gone by): a standby takes over once the record has not changed for the record's lease duration since it
    first saw it, or at once when the holder released it (empty holderIdentity). A leader counts as leading
    only within ``renew_deadline`` of the start of its last successful renewal; :meth:`check` refuses every
    other write past that, so a leader that was paused, partitioned or slow stops acting before a standby may
    take over (renew deadline < duration)."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str, identity: str,
                 times: LeaseTimes = LeaseTimes()) -> None:
        self.leases = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity, self.times = namespace, name, identity, times
        self._observed: dict[str, Any] | None = None  # the Lease's spec as last seen
        self._observed_at = 0.0  # monotonic time it was first seen so
        self.leading = False  # believes it holds the Lease (the last record it saw names it)
        self.renewed_at = -math.inf  # monotonic start of its last successful acquire or renewal

    @staticmethod
    def _stamp() -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _observe(self, spec: dict[str, Any], at: float) -> None:
        if spec != self._observed:
            self._observed, self._observed_at = spec, at
        self.leading = spec.get("holderIdentity") == self.identity

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease now."""
        started = time.monotonic()
        timeout = self.times.renew_deadline  # one hung request cannot outlast what a renewal may take
        now = self._stamp()
        spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": math.ceil(self.times.duration),
                                "renewTime": now, "acquireTime": now, "leaseTransitions": 0}
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            try:
                self.leases.create_namespaced_lease(self.namespace, {"metadata": {"name": self.name}, "spec": spec},
                                                    _request_timeout=timeout)
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
            self._observe(spec, started)
            self.renewed_at = started
            return True
        held = self.leases.api_client.sanitize_for_serialization(lease.spec)
        self._observe(held, started)
        holder = held.get("holderIdentity")
        duration = held.get("leaseDurationSeconds") or self.times.duration
        if holder and holder != self.identity and started < self._observed_at + duration:
            return False
        if holder == self.identity:
            spec["acquireTime"] = held.get("acquireTime", now)
            spec["leaseTransitions"] = held.get("leaseTransitions", 0)
        else:
            spec["leaseTransitions"] = held.get("leaseTransitions", 0) + 1
        body = {"metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:  # optimistic: the resourceVersion must still be the one judged above
            self.leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=timeout)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        self._observe(spec, started)
        self.renewed_at = started
        return True

    @property
    def holder(self) -> str | None:
        """Who the Lease named when last read."""
        return (self._observed or {}).get("holderIdentity")

    def renewed_in_time(self) -> bool:
        """Leading, and renewed within the renew deadline: the only state in which this process may write."""
        return self.leading and time.monotonic() - self.renewed_at < self.times.renew_deadline

    def healthy(self) -> bool:
        """False for a process that believes it leads but has not renewed within the renew deadline."""
        return not self.leading or self.renewed_in_time()

    def release(self) -> None:
        """Hand the Lease back (client-go's ReleaseOnCancel): an empty holder lets a standby acquire it at once
        instead of waiting out the lease duration. Writes are refused from the first line on."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace,
                                                      _request_timeout=self.times.retry_period)
            if lease.spec.holder_identity != self.identity:
                return
            now = self._stamp()
            self.leases.replace_namespaced_lease(self.name, self.namespace, {
                "metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": now, "acquireTime": now,
                         "leaseTransitions": lease.spec.lease_transitions or 0}},
                _request_timeout=self.times.retry_period)
            log.info("released the leader Lease")
        except Exception as e:  # a standby then waits out the lease duration: slower, still safe
            log.warning("releasing the leader Lease: %s", e)

    def check(self, method: str, url: str) -> None:
        """Raise :class:`NotLeading` for a request this process may not send: a write (anything but a read or
        this Lease's own update) while not :meth:`renewed_in_time`."""
        path = urllib.parse.urlsplit(url).path
        if (method.upper() in ("GET", "HEAD") or self.renewed_in_time()
                or path.startswith(f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases")):
            return
        metrics.inc("spin_controller_fenced_requests_total", verb=method.upper())
        raise NotLeading(f"refused {method.upper()} {path}: not a leader that renewed its Lease within "
                         f"{self.times.renew_deadline:g}s")


@dataclass(frozen=True)
class Timeouts:
    """Client-side and server-side limits on API calls, in seconds."""

    request: float = 30.0  # any call but a watch: connect and each socket read
    watch: int = 300  # the server ends a watch after this long; the client's read timeout is this + request


def _list(lister: Callable[..., Any], **kwargs: Any) -> tuple[list[Any], str]:
    """Every object, a page at a time: the items and the list's resourceVersion (every page's is the same)."""
    items: list[Any] = []
    token = None
    while True:
        page = lister(limit=PAGE, _continue=token, **kwargs)
        if isinstance(page, dict):  # custom objects come as dicts, built-in kinds as models
            items += page["items"]
            token, rv = page["metadata"].get("continue"), page["metadata"]["resourceVersion"]
        else:
            items += page.items
            token, rv = page.metadata._continue, page.metadata.resource_version
        if not token:
            return items, str(rv)


def _watch(stop: threading.Event, cache: Cache, kind: str, lister: Callable[..., Any],
           enqueue: Callable[[Any], None], timeouts: Timeouts, **kwargs: Any) -> None:
    """List into the cache, then watch into it, resuming from the last resourceVersion seen (bookmarks move it
    on too); a 410 Gone or any error means list again."""
    rv = None
    while not stop.is_set():
        try:
            if rv is None:
                items, rv = _list(lister, **kwargs)
                cache.replace(kind, items)
                for item in items:
                    enqueue(item)
            w = watch.Watch()
            stream: Iterator[dict[str, Any]] = w.stream(
                lister, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=timeouts.watch,
                _request_timeout=(timeouts.request, timeouts.watch + timeouts.request), **kwargs)
            for event in stream:
                if stop.is_set():
                    return
                obj = event["object"]
                if event["type"] == "DELETED":
                    cache.delete(kind, obj)
                elif event["type"] in ("ADDED", "MODIFIED"):
                    cache.put(kind, obj)
                else:
                    continue
                enqueue(obj)
            rv = w.resource_version or rv  # the server ended the watch: resume where it ended
        except ApiException as e:
            rv = None
            if e.status != 410:
                log.warning("watch %s: %s %s", kind, e.status, e.reason)
                stop.wait(1)
        except Exception as e:  # a dropped or timed-out connection: list again
            rv = None
            if not stop.is_set():
                log.warning("watch %s: %s", kind, e)
                stop.wait(1)


class Manager:
    def __init__(self, api_client: client.ApiClient, namespace: str | None, identity: str,
                 lease_namespace: str, leader_elect: bool = True, resync_seconds: float = 30.0,
                 workers: int = WORKERS, lease: LeaseTimes = LeaseTimes(), timeouts: Timeouts = Timeouts(),
                 images: api.Images = api.DEFAULT_IMAGES, policy: StoragePolicy = LOCKED_DOWN,
                 storage_check_seconds: float = 300.0) -> None:
        self.api = api_client
        self.namespace = namespace
        self.cache = Cache()
        self.elector = LeaderElector(api_client, lease_namespace, LEASE_NAME, identity, lease) \
            if leader_elect else None
        self.reconciler = Reconciler(Kube(api_client), self.cache, images=images, policy=policy,
                                     may_write=self.elector.renewed_in_time if self.elector else lambda: True,
                                     storage_check_seconds=storage_check_seconds)
        self.queue = WorkQueue()
        self.stop = threading.Event()
        self.resync_seconds = resync_seconds
        self.workers = workers
        self.timeouts = timeouts
        self._failures: dict[Key, int] = {}
        self._known: set[Key] = set()
        self._guard_requests()

    def _guard_requests(self) -> None:
        """Every request leaves through the client's REST layer: one without a timeout gets the default, and
        a write this process may not make (:meth:`LeaderElector.check`) is refused before it is sent."""
        rest = self.api.rest_client
        send = rest.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            if self.elector is not None:
                self.elector.check(method, url)
            if kwargs.get("_request_timeout") is None:
                kwargs["_request_timeout"] = (self.timeouts.request, self.timeouts.request)  # connect, each read
            return send(method, url, *args, **kwargs)

        rest.request = request

    def healthy(self) -> bool:
        """What /healthz answers: False for a leader whose Lease was not renewed within the renew deadline."""
        return self.elector is None or self.elector.healthy()

    def _on_run(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self._known.add(key)
        self.queue.add(key)

    def _on_runtime(self, obj: dict[str, Any]) -> None:
        """A SpinRuntime changed: reconcile the runs that have not taken their copy yet (one may wait for it)."""
        for key in list(self._known):
            run = self.cache.get("runs", *key)
            if run is not None and "runtime" not in (run.get("status") or {}):
                self.queue.add(key)

    def _on_child(self, obj: Any) -> None:
        """A Job or Service of ours changed: reconcile its run."""
        run = (obj.metadata.labels or {}).get(naming.LABEL_RUN)
        if run:
            self.queue.add((obj.metadata.namespace, run))

    def _worker(self) -> None:
        while not self.stop.is_set():
            key = self.queue.get(self.stop)
            if key is None:
                return
            try:
                self._reconcile(key)
            finally:
                self.queue.done(key)

    def _reconcile(self, key: Key) -> None:
        started = time.monotonic()
        try:
            changed = self.reconciler.reconcile(*key)
        except Exception as e:
            metrics.inc("spin_controller_reconciles_total", result="error")
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(30.0, 0.5 * 2 ** min(n, 6))
            log.warning("reconcile %s/%s failed (retry in %.1fs): %s", *key, delay, e)
            self.queue.add_rate_limited(key, delay)
            return
        finally:
            metrics.observe("spin_controller_reconcile_seconds", time.monotonic() - started)
        metrics.inc("spin_controller_reconciles_total", result="changed" if changed else "ok")
        self._failures.pop(key, None)
        if changed:
            self.queue.add_rate_limited(key, 0.05)  # the cache already holds our writes: go on at once

    def _resync(self) -> None:
        while not self.stop.wait(self.resync_seconds):
            self.queue.add_spread(list(self._known), self.resync_seconds)

    def run(self) -> None:
        """Reconcile until :attr:`stop` is set (SIGTERM), then let the workers finish and release the Lease."""
        renewer = None
        if self.elector is not None:
            if not self._acquire():
                return
            log.info("leading as %s", self.elector.identity)
            renewer = threading.Thread(target=self._renew, daemon=True, name="lease")
            renewer.start()
        objects, batch, core = (client.CustomObjectsApi(self.api), client.BatchV1Api(self.api),
                                client.CoreV1Api(self.api))
        label = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER}"
        crd = {"group": api.GROUP, "version": api.VERSION, "plural": api.PLURAL}
        # Cluster-scoped, watched even with a watched namespace: a run reads its SpinRuntime from here, no GET.
        runtimes = functools.partial(objects.list_cluster_custom_object, api.GROUP, api.VERSION, api.RUNTIME_PLURAL)
        if self.namespace:
            ns = {"namespace": self.namespace}
            sources = [("runs", objects.list_namespaced_custom_object, {**crd, **ns}, self._on_run),
                       ("jobs", batch.list_namespaced_job, {**ns, "label_selector": label}, self._on_child),
                       ("services", core.list_namespaced_service, {**ns, "label_selector": label}, self._on_child)]
        else:
            sources = [("runs", objects.list_cluster_custom_object, crd, self._on_run),
                       ("jobs", batch.list_job_for_all_namespaces, {"label_selector": label}, self._on_child),
                       ("services", core.list_service_for_all_namespaces, {"label_selector": label}, self._on_child)]
        sources.append(("runtimes", runtimes, {}, self._on_runtime))
        threads = [threading.Thread(target=_watch, args=(self.stop, self.cache, kind, lister, handler, self.timeouts),
                                    kwargs=kw, daemon=True, name=f"watch-{kind}")
                   for kind, lister, kw, handler in sources]
        threads.append(threading.Thread(target=self._resync, daemon=True, name="resync"))
        for t in threads:
            t.start()
        while not all(e.is_set() for e in self.cache.synced.values()):  # plan only from complete caches
            if self.stop.wait(0.05):
                break
        workers = [threading.Thread(target=self._worker, daemon=True, name=f"worker-{i}")
                   for i in range(self.workers)]
        for t in workers:
            t.start()
        self.stop.wait()
        log.info("stopping: finishing the reconciles in flight")
        if self.elector is not None and renewer is not None:
            deadline = time.monotonic() + self.elector.times.renew_deadline
            for t in [*workers, renewer]:  # a reconcile in flight ends, as does a renewal that could race the release
                t.join(max(0.0, deadline - time.monotonic()))
            self.elector.release()

    def _acquire(self) -> bool:
        """Stand by until this process holds the Lease; False when stopped first."""
        assert self.elector is not None
        seen = None
        while not self.stop.is_set():
            try:
                if self.elector.try_acquire_or_renew():
                    return True
                if self.elector.holder != seen:
                    seen = self.elector.holder
                    log.info("standing by: the Lease is held by %s", seen)
            except Exception as e:  # the API server unreachable: keep standing by
                log.warning("acquiring the leader Lease: %s", e)
            self.stop.wait(self.elector.times.retry_period)
        return False

    def _renew(self) -> None:
        """Renew every retry period; exit once another holder is seen or the renew deadline passed without a
        renewal (writes are refused from that moment on already: :meth:`LeaderElector.check`)."""
        elector = self.elector
        assert elector is not None
        while not self.stop.wait(elector.times.retry_period):
            try:
                if elector.try_acquire_or_renew():
                    continue
            except Exception as e:
                log.warning("lease renewal: %s", e)
            if not elector.renewed_in_time():
                log.error("lost the leader Lease (%s): exiting so a restart starts clean",
                          "another holder" if not elector.leading else "not renewed within the renew deadline")
                os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_k8s.controller",
                                     description="Run the SpinRun controller.")
    parser.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--namespace", help="watch one namespace (default: all)")
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                        help="hold a Lease so only one replica reconciles (default on)")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                        help="namespace of the leader Lease (default $POD_NAMESPACE or default)")
    parser.add_argument("--lease-seconds", type=float, default=15.0,
                        help="how long a dead leader blocks a standby replica (default 15)")
    parser.add_argument("--renew-deadline-seconds", type=float,
                        help="a leader that has not renewed for this long stops writing at once and exits; "
                             "less than --lease-seconds (default 2/3 of it)")
    parser.add_argument("--retry-period-seconds", type=float,
                        help="how often the leader renews and a standby tries to acquire; less than the renew "
                             "deadline (default 2/15 of --lease-seconds)")
    parser.add_argument("--request-timeout-seconds", type=float, default=Timeouts.request,
                        help=f"client-side timeout of every API call (default {Timeouts.request:g})")
    parser.add_argument("--watch-timeout-seconds", type=int, default=Timeouts.watch,
                        help="the server ends each watch after this long; the client gives up on one silent for "
                             f"this plus the request timeout (default {Timeouts.watch})")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="re-plan every run this often")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="reconciles at once; each mostly waits on the API server and S3, so more workers cut "
                             f"the queue when many runs move together (default {WORKERS})")
    parser.add_argument("--storage-check-seconds", type=float, default=300.0,
                        help="read an idle run's lineage from storage at least this often, to see an outage "
                             "(between, it plans from what it read and wrote; default 300)")
    parser.add_argument("--metrics-bind", default="",
                        help="address:port serving /metrics and /healthz, e.g. 0.0.0.0:8080 in a pod (default: off)")
    parser.add_argument("--generate-image", default=api.DEFAULT_IMAGES.generate,
                        help="generation image for SpinRuns that set no spec.images.generate "
                             f"(default {api.DEFAULT_IMAGES.generate})")
    parser.add_argument("--train-image", default=api.DEFAULT_IMAGES.train,
                        help="training image for SpinRuns that set no spec.images.train "
                             f"(default {api.DEFAULT_IMAGES.train})")
    parser.add_argument("--allowed-endpoint", action="append", default=[], metavar="URL",
                        help="an S3 endpoint a SpinRun's spec.storage.endpoint may name (repeatable; default: none, "
                             "only AWS S3)")
    parser.add_argument("--own-identity-prefix", action="append", default=[], metavar="S3_URI",
                        help="an s3://bucket[/prefix] the controller may reach with its own cloud identity for runs "
                             "that name no credentials Secret (repeatable; default: none, every S3 run names one)")
    args = parser.parse_args(argv)
    scaled = LeaseTimes.scaled(args.lease_seconds)
    try:
        lease = LeaseTimes(args.lease_seconds, args.renew_deadline_seconds or scaled.renew_deadline,
                           args.retry_period_seconds or scaled.retry_period)
    except ValueError as e:
        parser.error(str(e))
    # SIGTERM and SIGINT stop the manager: the workers finish, the Lease is released. They are taken by one
    # thread with sigwait, blocked everywhere else (threads inherit the mask: so before any starts), rather than
    # by a Python handler: that runs in the main thread only, whenever it next wakes, and may not take locks.
    stopping = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    # Every worker, watch and the lease renewal hold a connection at once: a pool smaller than that (the client's
    # default is 5 per CPU) discards connections, and each request after pays a new TLS handshake.
    configuration.connection_pool_maxsize = args.workers + 8
    api_client = client.ApiClient(configuration)
    refused = crdcheck.problem(api_client, args.request_timeout_seconds)
    if refused:
        log.error("refusing to start: %s", refused)
        return 1
    metrics.count_requests(api_client)
    identity = f"{socket.gethostname()}-{os.getpid()}"
    manager = Manager(api_client, args.namespace, identity, args.lease_namespace, args.leader_elect,
                      args.resync_seconds, workers=args.workers, lease=lease,
                      timeouts=Timeouts(request=args.request_timeout_seconds, watch=args.watch_timeout_seconds),
                      images=api.Images(generate=args.generate_image, train=args.train_image),
                      policy=StoragePolicy(tuple(args.allowed_endpoint), tuple(args.own_identity_prefix)),
                      storage_check_seconds=args.storage_check_seconds)
    if args.metrics_bind:
        address, _, port = args.metrics_bind.rpartition(":")
        metrics.serve(address, int(port), manager.healthy)

    def on_signal() -> None:
        signal.sigwait(stopping)
        manager.stop.set()

    threading.Thread(target=on_signal, daemon=True, name="signals").start()
    manager.run()
    return 0

