"""One reconcile of one SpinRun: observe everything, call the pure planner, apply its actions in order,
write status once, last, then emit the events that status describes.

Side effects live here and in nothing the planner imports. Every action is safe to repeat: a create that
answers 409 is success when the existing object carries this run's uid label.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException

from spin_k8s import api, lineage, naming, planner, storage
from spin_k8s.controller import metrics

log = logging.getLogger("spin_k8s.controller")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_view(job: client.V1Job) -> planner.JobView | None:
    """A Job reduced to what the planner needs; None for a Job without our labels."""
    labels = job.metadata.labels or {}
    try:
        iteration, role = int(labels[naming.LABEL_ITERATION]), labels[naming.LABEL_ROLE]
        attempt = int(labels.get(naming.LABEL_ATTEMPT, "0"))
    except (KeyError, ValueError):
        return None
    status = job.status
    conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
    state: planner.JobState
    if "Complete" in conditions:
        state, cond = "complete", conditions["Complete"]
    elif "Failed" in conditions:
        state, cond = "failed", conditions["Failed"]
    else:
        state, cond = ("suspended" if job.spec.suspend else "active"), None
    return planner.JobView(
        name=job.metadata.name, uid=job.metadata.uid, iteration=iteration, role=role, attempt=attempt, state=state,
        succeeded=status.succeeded or 0, failed=status.failed or 0,
        reason=(cond.reason or "") if cond else "", message=(cond.message or "") if cond else "",
        image=job.spec.template.spec.containers[0].image,
        stopped=naming.ANNOTATION_STOPPED in (job.metadata.annotations or {}),
        generation=planner.carried_generation(job.metadata.annotations),
        started=status.start_time.strftime("%Y-%m-%dT%H:%M:%SZ") if status.start_time else None,
        finished=status.completion_time.strftime("%Y-%m-%dT%H:%M:%SZ") if status.completion_time else None)


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def api_message(e: Exception) -> str:
    """An error in one line: the API server's own message for an ApiException (its Status body), never the
    response headers the client puts in str(e)."""
    if isinstance(e, ApiException):
        try:
            message = json.loads(e.body or "")["message"]
        except (ValueError, KeyError, TypeError):
            message = f"{e.status} {e.reason}"
        return one_line(str(message))
    return one_line(str(e) or type(e).__name__)


def create_error(events: list[client.CoreV1Event]) -> str:
    """Of a Job's events, the Job controller's FailedCreate message when it is the newest word on creating its
    pods (a later SuccessfulCreate means the cause passed), else ""."""
    def when(e: client.CoreV1Event) -> datetime.datetime:
        series = e.series.last_observed_time if e.series else None
        return (series or e.last_timestamp or e.event_time or e.first_timestamp
                or e.metadata.creation_timestamp or datetime.datetime.min.replace(tzinfo=datetime.UTC))

    relevant = [e for e in events if e.reason in ("FailedCreate", "SuccessfulCreate")]
    newest = max(relevant, key=when, default=None)
    return one_line(newest.message or "") if newest is not None and newest.reason == "FailedCreate" else ""


def _count_s3(event_name: str = "", **_: Any) -> None:
    metrics.inc("spin_controller_s3_requests_total", operation=event_name.rsplit(".", 1)[-1])


class ActionFailed(RuntimeError):
    """An action was refused (API server, admission, storage); the run's status already says so."""


def failure_of(pods: list[client.V1Pod], container: str) -> tuple[str, int | None]:
    """Of a failed Job's pods, the one that failed first: its container's termination message (its last line: a
    worker's one-line reason, or the last line of the log the kubelet fell back to) and exit code."""
    failed = []
    for pod in pods:
        if pod.status is None or pod.status.phase != "Failed":
            continue
        term = next((s.state.terminated for s in pod.status.container_statuses or []
                     if s.name == container and s.state is not None and s.state.terminated is not None), None)
        lines = [line for line in ((term.message or "") if term else "").splitlines() if line.strip()]
        message = lines[-1] if lines else (pod.status.message or "")
        finished = (term.finished_at if term else None) or pod.metadata.creation_timestamp
        failed.append((finished is None, finished, one_line(message), term.exit_code if term else None))
    if not failed:
        return "", None
    _, _, message, code = min(failed, key=lambda f: (f[0], f[1] or 0))
    return message, code


class StorageRefused(RuntimeError):
    """The controller will not (or cannot) reach a run's storage as its spec asks; ``reason`` is the condition
    reason that says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StoragePolicy:
    """What storage a tenant's SpinRun may make the controller reach, set by the platform team (chart values
    ``storage.allowedEndpoints`` and ``storage.controllerIdentityPrefixes``). Without it any tenant could point
    the controller at an internal URL, or have it read and write any bucket its own cloud identity reaches."""

    endpoints: tuple[str, ...] = ()  # storage.endpoint values a run may name; none: only the default (AWS)
    own_identity_prefixes: tuple[str, ...] = ()  # s3:// prefixes reached with the controller's own identity

    def refusal(self, spec: api.Storage) -> StorageRefused | None:
        """Why the run's storage is refused, or None."""
        if spec.endpoint is not None and spec.endpoint.rstrip("/") not in {e.rstrip("/") for e in self.endpoints}:
            allowed = ", ".join(self.endpoints) or "none"
            return StorageRefused("EndpointNotAllowed", f"spec.storage.endpoint {spec.endpoint} is not one the "
                                  f"controller may reach (allowed: {allowed}; chart value storage.allowedEndpoints)")
        if storage.is_s3(spec.uri) and not spec.credentials_secret and not any(
                spec.uri.rstrip("/") == p.rstrip("/") or spec.uri.startswith(p.rstrip("/") + "/")
                for p in self.own_identity_prefixes):
            where = (f"only under {', '.join(self.own_identity_prefixes)}" if self.own_identity_prefixes
                     else "nowhere")
            return StorageRefused("CredentialsRequired", "spec.storage.credentialsSecret is required: the "
                                  f"controller uses its own identity {where} (chart value "
                                  "storage.controllerIdentityPrefixes)")
        return None


# A Job still short of pods this long after the Job controller took it up (status.startTime, set in the same sync
# that creates the pods, whether or not they were refused) is asked why: its events listed, again at most every
# REFUSAL_RECHECK_SECONDS. Not from the Job's creation: the Job controller of a busy cluster takes Jobs up tens of
# seconds late (measured: 1,000 runs on 2 cores), and a list by involvedObject.uid scans the namespace's events.
POD_GRACE_SECONDS = 5.0
REFUSAL_RECHECK_SECONDS = 30.0
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")  # Kueue 0.15+ stores v1beta2; older ones serve v1beta1 only
LOCKED_DOWN = StoragePolicy()  # the default: no custom endpoint, never the controller's own identity


def slim(obj: Any) -> Any:
    """``obj`` as the cache keeps it: without ``metadata.managedFields`` (the server's field-ownership bookkeeping),
    and a Job without its pod template beyond the first container's image and without its podFailurePolicy. Nothing
    here reads them, and the cache holds every Job a run ever made: the full objects were 67 KB each as client
    models (10,000 Jobs: 650 MB), the scale benchmark measured."""
    if isinstance(obj, dict):
        (obj.get("metadata") or {}).pop("managedFields", None)
        return obj
    obj.metadata.managed_fields = None
    if isinstance(obj, client.V1Job) and obj.spec is not None:
        containers = obj.spec.template.spec.containers if obj.spec.template and obj.spec.template.spec else []
        obj.spec.template = client.V1PodTemplateSpec(spec=client.V1PodSpec(
            containers=[client.V1Container(name=c.name, image=c.image) for c in containers[:1]]))
        obj.spec.pod_failure_policy = None
    return obj


K = TypeVar("K")
V = TypeVar("V")


def keep(memo: dict[K, V], key: K, value: V, limit: int) -> None:
    """Remember ``value`` in a memo of API or S3 answers bounded to ``limit`` entries, the oldest dropped first:
    a forgotten entry (most often a deleted run's) costs one more request, never a wrong answer."""
    memo[key] = value
    if len(memo) > limit:
        del memo[next(iter(memo))]


class Cache:
    """What the watches delivered, by (namespace, name): SpinRuns and SpinRuntimes (namespace "") as dicts, Jobs
    and Services as client models, each :func:`slim`. Reconciles read here instead of the API server; objects we
    create or write go in at once, so a quick requeue does not miss them. Read-only for everyone but the watches
    and :class:`Reconciler`. Jobs and Services are indexed by the run uid they carry: a reconcile finds its run's
    among tens of thousands without a scan.

    Our own writes race the watch: the answer to a create can arrive after the watch already delivered the
    object's deletion (a user deleting a Job the moment it appears), and the answer to a status write after a
    newer version. So a put never brings back an object the watch saw deleted (its uid is remembered) and never
    replaces a newer version of the same object (resourceVersions compared where they are numbers, as etcd's)."""

    KINDS = ("runs", "jobs", "services", "runtimes")
    DELETED_KEPT = 16384  # uids of deleted objects remembered, the oldest forgotten first

    def __init__(self) -> None:
        self._items: dict[str, dict[tuple[str, str], Any]] = {k: {} for k in self.KINDS}
        # kind -> (namespace, run uid) -> the keys of the objects labelled with that run uid
        self._owned: dict[str, dict[tuple[str, str], set[tuple[str, str]]]] = {k: {} for k in self.KINDS}
        self._deleted: dict[str, None] = {}
        self._lock = threading.Lock()
        self.synced = {k: threading.Event() for k in self.KINDS}

    @staticmethod
    def _key(obj: Any) -> tuple[str, str]:
        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
        return ((meta.get("namespace") or "", meta["name"]) if isinstance(meta, dict)
                else (meta.namespace or "", meta.name))

    @staticmethod
    def _version(obj: Any) -> tuple[str, int | None]:
        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
        uid, rv = (meta.get("uid"), meta.get("resourceVersion")) if isinstance(meta, dict) else (
            meta.uid, meta.resource_version)
        return str(uid or ""), int(rv) if isinstance(rv, str) and rv.isdigit() else None

    @staticmethod
    def _owner(key: tuple[str, str], obj: Any) -> tuple[str, str] | None:
        labels = (obj["metadata"].get("labels") if isinstance(obj, dict) else obj.metadata.labels) or {}
        uid = labels.get(naming.LABEL_RUN_UID)
        return (key[0], uid) if uid else None

    def _store(self, kind: str, key: tuple[str, str], obj: Any | None) -> None:
        """Set (or, with None, drop) one object, keeping the owner index in step; under the lock."""
        old = self._items[kind].pop(key, None)
        if old is not None and (owner := self._owner(key, old)) is not None:
            keys = self._owned[kind].get(owner, set())
            keys.discard(key)
            if not keys:
                self._owned[kind].pop(owner, None)
        if obj is not None:
            self._items[kind][key] = obj
            if (owner := self._owner(key, obj)) is not None:
                self._owned[kind].setdefault(owner, set()).add(key)

    def replace(self, kind: str, objects: list[Any]) -> None:
        """A fresh list: drops what disappeared while no watch was running."""
        with self._lock:
            self._items[kind], self._owned[kind] = {}, {}
            for o in objects:
                self._store(kind, self._key(o), slim(o))
        self.synced[kind].set()

    def put(self, kind: str, obj: Any) -> None:
        uid, rv = self._version(obj)
        key = self._key(obj)
        with self._lock:
            if uid in self._deleted:
                return
            old = self._items[kind].get(key)
            if old is not None:
                old_uid, old_rv = self._version(old)
                if old_uid == uid and rv is not None and old_rv is not None and old_rv > rv:
                    return
            self._store(kind, key, slim(obj))

    def delete(self, kind: str, obj: Any) -> None:
        uid, _ = self._version(obj)
        with self._lock:
            self._store(kind, self._key(obj), None)
            if uid:
                self._deleted[uid] = None
                if len(self._deleted) > self.DELETED_KEPT:
                    del self._deleted[next(iter(self._deleted))]

    def get(self, kind: str, namespace: str, name: str) -> Any:
        with self._lock:
            return self._items[kind].get((namespace, name))

    def owned(self, kind: str, namespace: str, run_uid: str) -> list[Any]:
        with self._lock:
            return [self._items[kind][key] for key in sorted(self._owned[kind].get((namespace, run_uid), ()))]


@dataclass
class Kube:
    """The controller's Kubernetes clients."""

    api: client.ApiClient

    @functools.cached_property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @functools.cached_property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @functools.cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)


class Reconciler:
    """Reconciles SpinRuns by key. Holds S3 clients per credentials, nothing else between calls."""

    # Seconds a credentials Secret is trusted before it is read again. Long, because storage failing drops it at
    # once (rotated keys are read at the next retry) and a read per step would cost more than the step's writes.
    SECRET_TTL = 3600.0

    def __init__(self, kube: Kube, cache: Cache, component: str = "spin-controller",
                 images: api.Images = api.DEFAULT_IMAGES, policy: StoragePolicy = LOCKED_DOWN,
                 may_write: Callable[[], bool] = lambda: True, storage_check_seconds: float = 300.0) -> None:
        self.kube = kube
        self.images = images
        self.policy = policy
        # Whether this process may still write (a leader within its renew deadline). API writes are fenced at
        # the client (manager); lineage goes to S3, so its writes ask here.
        self.may_write = may_write
        # The lineage manifest as last read or written (monotonic time of the read, manifest), by run uid. Only
        # this process writes a run's lineage while it leads, so an idle reconcile needs no read and a write
        # needs no read first; storage is still read every storage_check_seconds, to see an outage
        # (StorageAvailable) and to pick up what another leader wrote before this one took over.
        self.storage_check_seconds = storage_check_seconds
        self._lineage: dict[str, tuple[float, lineage.Manifest]] = {}
        self.cache = cache
        self.component = component
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        # Why each failed Job failed, by Job uid: a failed Job never changes, so its pods are listed once.
        self._failures: dict[str, tuple[str, int | None]] = {}
        # Why an active Job lacks pods, by Job uid: (monotonic time asked, the answer).
        self._refusals: dict[str, tuple[float, str]] = {}

    # -- observe --------------------------------------------------------------------------------------------
    def _store(self, run: api.SpinRun) -> lineage.Store:
        refused = self.policy.refusal(run.spec.storage)
        if refused is not None:
            raise refused
        prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
        creds: dict[str, str] = {}
        if run.spec.storage.credentials_secret and storage.is_s3(prefix):
            key = (run.namespace, run.spec.storage.credentials_secret)
            read_at, creds = self._secrets.get(key, (0.0, {}))
            if time.monotonic() - read_at > self.SECRET_TTL:
                try:
                    secret = self.kube.core.read_namespaced_secret(key[1], key[0])
                except ApiException as e:
                    what = "not found" if e.status == 404 else f"not readable by the controller ({e.status} {e.reason})"
                    hint = ": the chart grants it Secrets only in the namespaces tenantNamespaces lists" \
                        if e.status == 403 else ""
                    raise StorageRefused("CredentialsUnavailable", f'Secret "{key[1]}" {what} in namespace '
                                         f'"{key[0]}" (spec.storage.credentialsSecret){hint}') from e
                creds = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
                self._secrets[key] = (time.monotonic(), creds)
        store = lineage.open_store(prefix, endpoint=run.spec.storage.endpoint, region=run.spec.storage.region,
                                   credentials=creds)
        if isinstance(store, lineage.S3Store):  # count its requests next to the Kubernetes ones (/metrics)
            store.client.meta.events.register("before-send.s3", _count_s3, unique_id="spin-controller-s3-count")
        return store

    def _with_pod_facts(self, namespace: str, job: client.V1Job) -> planner.JobView | None:
        """A Job's view with what its pods tell: a failed Job's failed pod in its own words (a worker's reason
        beats the Job controller's), or why an active Job lacks pods (admission or quota refused them)."""
        view = job_view(job)
        if view is None:
            return None
        if view.state == "failed":
            if view.uid not in self._failures:
                pods = self.kube.core.list_namespaced_pod(
                    namespace, label_selector=f"batch.kubernetes.io/controller-uid={view.uid}").items
                keep(self._failures, view.uid, failure_of(pods, view.role), 4096)
            message, code = self._failures[view.uid]
            return dataclasses.replace(view, pod_message=message, exit_code=code)
        status = job.status
        taken_up = status.start_time
        settled = taken_up is not None and (
            datetime.datetime.now(datetime.UTC) - taken_up).total_seconds() > POD_GRACE_SECONDS
        if not (view.state == "active" and settled
                and (status.active or 0) + (status.succeeded or 0) < (job.spec.completions or 1)):
            return view
        asked, error = self._refusals.get(view.uid, (-math.inf, ""))
        if time.monotonic() - asked > REFUSAL_RECHECK_SECONDS:
            events = self.kube.core.list_namespaced_event(
                namespace, field_selector=f"involvedObject.uid={view.uid}").items
            error = create_error(events)
            keep(self._refusals, view.uid, (time.monotonic(), error), 4096)
        return dataclasses.replace(view, create_error=error)

    # -- the loop body -------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> bool:
        """Reconcile one run; True when something changed (the caller requeues soon)."""
        obj = self.cache.get("runs", namespace, name)
        if obj is None:
            return False  # deleted: owner references garbage-collect its Jobs and Services
        errors = api.semantic_errors(obj)
        run = api.parse(obj, self.images)
        if run.deleting:
            return False
        jobs = [v for j in self.cache.owned("jobs", namespace, run.uid)
                if (v := self._with_pod_facts(namespace, j)) is not None]
        services = frozenset(s.metadata.name for s in self.cache.owned("services", namespace, run.uid))
        prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
        store: lineage.Store | None = None
        read_at, known = self._lineage.get(run.uid, (-math.inf, lineage.Manifest({}, None)))
        # The lineage this process read and wrote is the lineage (writes are fenced: no other leader wrote
        # meanwhile); storage is read for the outputs of a Job that completed, and all of it again every
        # storage_check_seconds, to see an outage.
        fresh = time.monotonic() - read_at < self.storage_check_seconds
        steps = known.steps
        observed, invalid = planner.Observed(tuple(jobs), services), "; ".join(errors) or None
        carried = observed.carried()
        if fresh and not any(j.state == "complete" and (j.iteration, j.role) not in steps
                             and (j.iteration, j.role) not in carried for j in jobs):
            found = planner.Lineage(steps)
        else:
            if not fresh:
                self._lineage.pop(run.uid, None)
            try:
                store = self._store(run)
                started = time.monotonic()
                if not fresh:
                    known = lineage.read(store)
                    steps = known.steps
                found = planner.Lineage(steps, lineage.step_outputs(store, run, prefix, jobs, {**steps, **carried}))
                if not fresh:
                    self._remember(run.uid, started, known)
            except StorageRefused as e:
                store = None
                found = planner.Lineage(error=str(e), error_reason=e.reason)
            except Exception as e:  # storage down or credentials wrong: say why, retry with backoff
                store = None
                self._secrets.pop((run.namespace, run.spec.storage.credentials_secret or ""), None)  # rotated?
                found = planner.Lineage(error=f"{type(e).__name__}: {one_line(str(e), 300)}")
        plan = planner.plan(run, observed, found, _now(), invalid=invalid)
        if "runtime" not in run.status and plan.creates():
            # The run's first Job: its SpinRuntime is read now, once; the copy kept in status builds every Job.
            name = run.spec.runtime or api.DEFAULT_RUNTIME
            runtime = self._runtime(name)
            if runtime is None and run.spec.runtime:
                held = planner.runtime_missing(run, name, _now())
                self._write_status(obj, run, held)
                raise ActionFailed(held.events[0].message)  # the queue retries with backoff
            obj = {**obj, "status": {**(obj.get("status") or {}), "runtime": api.runtime_snapshot(runtime)}}
            run = api.parse(obj, self.images)
            plan = planner.plan(run, observed, found, _now(), invalid=invalid)
        records = [a for a in plan.actions if isinstance(a, planner.RecordStep)]
        for action in plan.actions:
            if isinstance(action, planner.RecordStep) and action is not records[0]:
                continue  # written with the first: a plan's records go to storage in one manifest write
            try:
                if isinstance(action, planner.RecordStep):
                    assert store is not None
                    self._record(run, obj, store, records)
                else:
                    self._apply(run, obj, action)
            except Exception as e:
                error = api_message(e)
                self._write_status(obj, run, planner.action_failed(run, action, error, _now()))
                raise ActionFailed(error) from e  # the queue retries with backoff
        status_changed = self._write_status(obj, run, plan)
        if found.error:
            raise RuntimeError(found.error)  # the queue retries with backoff
        return bool(plan.actions) or status_changed

    def _runtime(self, name: str) -> dict[str, Any] | None:
        """The SpinRuntime ``name`` as the watch last delivered it; None where it does not exist."""
        found: dict[str, Any] | None = self.cache.get("runtimes", "", name)
        return found

    def _remember(self, uid: str, read_at: float, manifest: lineage.Manifest) -> None:
        keep(self._lineage, uid, (read_at, manifest), 8192)

    def _write_status(self, obj: dict[str, Any], run: api.SpinRun, plan: planner.Plan) -> bool:
        """Write the plan's status if it differs from the run's, then the events it describes; False when
        nothing changed or the run is gone."""
        if plan.status == run.status:
            return False
        try:
            written = self.kube.objects.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, run.namespace, api.PLURAL, run.name, {"status": plan.status})
        except ApiException as e:
            if e.status == 404:
                return False  # deleted meanwhile
            raise
        self.cache.put("runs", written)
        for event in plan.events:
            self._emit(obj, event)
        return True

    def _record(self, run: api.SpinRun, obj: dict[str, Any], store: lineage.Store,
                records: list[planner.RecordStep]) -> None:
        """Add the records to the run's lineage manifest in one write, from the version this process holds."""
        if not self.may_write():
            raise RuntimeError(f"lineage of iteration {records[0].iteration} {records[0].role} not written: this "
                               "process is no longer a leader that renewed its Lease in time")
        read_at, known = self._lineage.get(run.uid, (time.monotonic(), None))
        stored = lineage.record_steps(store, {"name": run.name, "namespace": run.namespace, "uid": run.uid},
                                      obj["spec"], [(r.iteration, r.role, r.record) for r in records], known)
        self._remember(run.uid, read_at, stored)  # what storage now holds, without reading it back

    def _apply(self, run: api.SpinRun, obj: dict[str, Any], action: planner.Action) -> None:
        k, ns = self.kube, run.namespace
        if isinstance(action, planner.CreateJob | planner.CreateService):
            body = action.body
            try:
                if isinstance(action, planner.CreateJob):
                    self.cache.put("jobs", k.batch.create_namespaced_job(ns, body))
                else:
                    self.cache.put("services", k.core.create_namespaced_service(ns, body))
            except ApiException as e:
                if e.status != 409:
                    raise
                self._check_ours(action, ns, run.uid)
            log.info("created %s %s/%s", body["kind"], ns, body["metadata"]["name"])
        elif isinstance(action, planner.SuspendJob):
            patch: dict[str, Any] = {"metadata": {"annotations": {
                naming.ANNOTATION_STOPPED: "true" if action.suspend else None}}}
            if not (action.kueue_uid and self._set_workload_active(ns, action.name, action.kueue_uid,
                                                                  not action.suspend)):
                patch["spec"] = {"suspend": action.suspend}
            self.cache.put("jobs", k.batch.patch_namespaced_job(action.name, ns, patch))

    def _set_workload_active(self, ns: str, job: str, uid: str, active: bool) -> bool:
        """Deactivate or activate the Kueue Workload of Job ``uid`` (Kueue then stops or requeues the Job);
        False when this cluster serves no Kueue Workload API, and nobody would undo a plain suspend."""
        for version in KUEUE_VERSIONS:
            try:
                found = self.kube.objects.list_namespaced_custom_object(
                    KUEUE_GROUP, version, ns, "workloads", label_selector=f"{naming.LABEL_KUEUE_JOB_UID}={uid}")
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            if not found["items"]:  # Kueue has not made it yet: stopping the Job alone would not keep it stopped
                raise RuntimeError(f"Kueue has no Workload for Job {job} yet")
            for workload in found["items"]:
                self.kube.objects.patch_namespaced_custom_object(
                    KUEUE_GROUP, version, ns, "workloads", workload["metadata"]["name"], {"spec": {"active": active}})
            return True
        return False

    def _check_ours(self, action: planner.CreateJob | planner.CreateService, ns: str, uid: str) -> None:
        """A 409 is success only if the object that exists belongs to this run."""
        name = action.body["metadata"]["name"]
        existing = (self.kube.batch.read_namespaced_job(name, ns) if isinstance(action, planner.CreateJob)
                    else self.kube.core.read_namespaced_service(name, ns))
        if (existing.metadata.labels or {}).get(naming.LABEL_RUN_UID) != uid:
            raise RuntimeError(f"{name} already exists and does not belong to this SpinRun")
        self.cache.put("jobs" if isinstance(action, planner.CreateJob) else "services", existing)

    def _emit(self, obj: dict[str, Any], event: planner.Event) -> None:
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(api_version=api.API_VERSION, kind=api.KIND, name=meta["name"],
                                                     namespace=meta["namespace"], uid=meta["uid"]),
            type=event.type, reason=event.reason, message=event.message[:1024], count=1,
            first_timestamp=now, last_timestamp=now, source=client.V1EventSource(component=self.component))
        try:
            self.kube.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as e:  # an event is best effort; the status already says it
            log.warning("event %s: %s", event.reason, e.reason)
