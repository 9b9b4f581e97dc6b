"""The controller process: leader election, watches that only enqueue run keys, a deduplicating work
queue with per-key backoff, a periodic resync, and ``python -m spin_k8s.controller``.

Watches relist on 410 Gone. Only the leader (a coordination.k8s.io Lease) reconciles, so two replicas are
safe; a new leader needs no hand-over: everything it needs is in the API server and in lineage.
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from spin_k8s import api, naming
from spin_k8s.controller import crdcheck, metrics
from spin_k8s.controller.reconcile import LOCKED_DOWN, Cache, Kube, Reconciler, StoragePolicy

log = logging.getLogger("spin_k8s.controller")
Key = tuple[str, str]
LEASE_NAME = "spin-k8s-controller"


class WorkQueue:
    """Keys waiting for a reconcile, each at most once, each at its own due time; a key being reconciled
    is handed to no other worker (one added meanwhile waits for :meth:`done`)."""

    def __init__(self) -> None:
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

    def get(self, stop: threading.Event) -> Key | None:
        with self._cv:
            while not stop.is_set():
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded entry
                wait = self._heap[0][0] - time.monotonic() if self._heap else 1.0
                if self._heap and wait <= 0:
                    _, key = heapq.heappop(self._heap)
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


class LeaderElector:
    """A coordination.k8s.io Lease held by one replica at a time."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15) -> None:
        self.leases = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity, self.lease_seconds = namespace, name, identity, lease_seconds

    @staticmethod
    def _stamp(t: datetime.datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def try_acquire(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": self._stamp(now)}
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            try:
                self.leases.create_namespaced_lease(self.namespace, {
                    "metadata": {"name": self.name}, "spec": {**spec, "acquireTime": self._stamp(now)}})
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        held = lease.spec
        renewed = held.renew_time
        expired = renewed is None or (now - renewed).total_seconds() > (held.lease_duration_seconds or 15)
        if held.holder_identity != self.identity and not expired:
            return False
        if held.holder_identity != self.identity:
            spec["acquireTime"] = self._stamp(now)
        body = {"metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.leases.replace_namespaced_lease(self.name, self.namespace, body)  # optimistic: rv must match
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True


def _watch(stop: threading.Event, cache: Cache, kind: str, lister: Callable[..., Any],
           enqueue: Callable[[Any], None], **kwargs: Any) -> None:
    """List into the cache, then watch into it forever; a 410 Gone (or any break) means list again."""
    while not stop.is_set():
        try:
            listed = lister(**kwargs)
            items = listed["items"] if isinstance(listed, dict) else listed.items
            cache.replace(kind, items)
            for item in items:
                enqueue(item)
            rv = listed["metadata"]["resourceVersion"] if isinstance(listed, dict) else listed.metadata.resource_version
            stream: Iterator[dict[str, Any]] = watch.Watch().stream(
                lister, resource_version=rv, timeout_seconds=300, **kwargs)
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
        except ApiException as e:
            if e.status != 410:
                log.warning("watch %s: %s %s", kind, e.status, e.reason)
                stop.wait(1)
        except Exception as e:  # a dropped connection: list again
            if not stop.is_set():
                log.warning("watch %s: %s", kind, e)
                stop.wait(1)


class Manager:
    def __init__(self, api_client: client.ApiClient, namespace: str | None, identity: str,
                 lease_namespace: str, leader_elect: bool = True, resync_seconds: float = 30.0,
                 workers: int = 2, lease_seconds: int = 15, images: api.Images = api.DEFAULT_IMAGES,
                 policy: StoragePolicy = LOCKED_DOWN) -> None:
        self.api = api_client
        self.namespace = namespace
        self.cache = Cache()
        self.reconciler = Reconciler(Kube(api_client), self.cache, images=images, policy=policy)
        self.queue = WorkQueue()
        self.stop = threading.Event()
        self.elector = LeaderElector(api_client, lease_namespace, LEASE_NAME, identity, lease_seconds) \
            if leader_elect else None
        self.resync_seconds = resync_seconds
        self.workers = workers
        self._failures: dict[Key, int] = {}
        self._known: set[Key] = set()

    def _on_run(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self._known.add(key)
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
        try:
            changed = self.reconciler.reconcile(*key)
        except Exception as e:
            metrics.inc("spin_controller_reconciles_total", result="error")
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(30.0, 0.5 * 2 ** min(n, 6))
            log.warning("reconcile %s/%s failed (retry in %.1fs): %s", *key, delay, e)
            self.queue.add(key, delay)
            return
        metrics.inc("spin_controller_reconciles_total", result="changed" if changed else "ok")
        self._failures.pop(key, None)
        if changed:
            self.queue.add(key, 0.05)  # the cache already holds our writes: go on at once

    def _resync(self) -> None:
        while not self.stop.wait(self.resync_seconds):
            for key in list(self._known):
                self.queue.add(key)

    def run(self) -> None:
        if self.elector is not None:
            while not self.stop.is_set() and not self.elector.try_acquire():
                self.stop.wait(2)
            log.info("leading as %s", self.elector.identity)
            threading.Thread(target=self._renew, daemon=True, name="lease").start()
        objects, batch, core = (client.CustomObjectsApi(self.api), client.BatchV1Api(self.api),
                                client.CoreV1Api(self.api))
        label = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER}"
        crd = {"group": api.GROUP, "version": api.VERSION, "plural": api.PLURAL}
        if self.namespace:
            ns = {"namespace": self.namespace}
            sources = [("runs", objects.list_namespaced_custom_object, {**crd, **ns}, self._on_run),
                       ("jobs", batch.list_namespaced_job, {**ns, "label_selector": label}, self._on_child),
                       ("services", core.list_namespaced_service, {**ns, "label_selector": label}, self._on_child)]
        else:
            sources = [("runs", objects.list_cluster_custom_object, crd, self._on_run),
                       ("jobs", batch.list_job_for_all_namespaces, {"label_selector": label}, self._on_child),
                       ("services", core.list_service_for_all_namespaces, {"label_selector": label}, self._on_child)]
        threads = [threading.Thread(target=_watch, args=(self.stop, self.cache, kind, lister, handler), kwargs=kw,
                                    daemon=True, name=f"watch-{kind}") for kind, lister, kw, handler in sources]
        threads.append(threading.Thread(target=self._resync, daemon=True, name="resync"))
        for t in threads:
            t.start()
        for event in self.cache.synced.values():  # plan only from complete caches
            while not event.wait(1) and not self.stop.is_set():
                pass
        threads = [threading.Thread(target=self._worker, daemon=True, name=f"worker-{i}")
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        self.stop.wait()

    def _renew(self) -> None:
        assert self.elector is not None
        while not self.stop.wait(self.elector.lease_seconds / 3):
            try:
                if not self.elector.try_acquire():
                    log.error("lost the leader lease: exiting so a restart starts clean")
                    os._exit(1)
            except Exception as e:
                log.warning("lease renewal: %s", e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_k8s.controller",
                                     description="Run the SpinRun controller.")
    parser.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--namespace", help="watch one namespace (default: all)")
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                        help="hold a Lease so only one replica reconciles (default on)")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                        help="namespace of the leader Lease (default $POD_NAMESPACE or default)")
    parser.add_argument("--lease-seconds", type=int, default=15,
                        help="how long a dead leader blocks a standby replica (default 15)")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="re-plan every run this often")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    api_client = (config.new_client_from_config(config_file=kubeconfig) if kubeconfig
                  else _incluster())
    refused = crdcheck.problem(api_client)
    if refused:
        log.error("refusing to start: %s", refused)
        return 1
    metrics.count_requests(api_client)
    if args.metrics_bind:
        address, _, port = args.metrics_bind.rpartition(":")
        metrics.serve(address, int(port))
    identity = f"{socket.gethostname()}-{os.getpid()}"
    manager = Manager(api_client, args.namespace, identity, args.lease_namespace, args.leader_elect,
                      args.resync_seconds, lease_seconds=args.lease_seconds,
                      images=api.Images(generate=args.generate_image, train=args.train_image),
                      policy=StoragePolicy(tuple(args.allowed_endpoint), tuple(args.own_identity_prefix)))
    manager.run()
    return 0


def _incluster() -> client.ApiClient:
    config.load_incluster_config()
    return client.ApiClient()
