"""The local executor: one SpinRun on this machine, without a cluster, as local processes instead of Jobs.

It stands where the controller stands and runs the same loop: observe the run's Jobs, read lineage and the
workers' outputs from storage, call the pure :func:`planner.plan`, apply its actions, write status once, then
report the events it describes. What differs is only the Kubernetes side underneath:

- a ``CreateJob`` runs the Job body from :mod:`spin_k8s.manifests` as processes: the container's command and
  args, one process (group) per completion index, with the container's env, ``JOB_COMPLETION_INDEX`` and the
  ``$(VAR)`` references expanded as the kubelet expands them. Pods become processes, so the worker command
  lines, the storage layout and the lineage records are the controller's;
- :func:`job_outcome` plays the Job controller: a failed generation index is rerun up to
  ``backoffLimitPerIndex`` times, one failed training node fails the gang (``backoffLimit: 0``), and the
  planner then creates the next attempt, which resumes from the DeepSpeed checkpoint;
- :func:`localize` is the one translation of a pod's command line to this machine (interpreter, the
  rendezvous address, the port, ranks per node);
- the SpinRun object, its status and its Jobs persist in ``{workdir}/runs/{name}.json`` (the API server's
  part), so calling :func:`run` again with the same workdir resumes.

Training on this machine: every node of the gang runs here (``spec.training.nodes`` torchrun processes, all
rendezvousing at 127.0.0.1), so a multi-node spec runs unchanged, node ranks and gang failure included. With
``gpusPerNode: 0`` each node runs ``nproc`` CPU ranks (on a cluster a CPU pod runs one), so a local gang is
``nodes * nproc`` real DeepSpeed ranks; with GPUs each node runs one rank per GPU, as on the cluster.

Storage: ``spec.storage`` defaults to ``file://{workdir}/store``. With ``s3://`` the workers and the executor
take credentials from this process's ``AWS_*`` environment; ``credentialsSecret`` names a Kubernetes Secret
and is not read here. Worker output goes to ``{workdir}/logs/{job}-{index}.log``; retries append.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_k8s import api, lineage, naming, planner

POLL_SECONDS = 0.25  # between two passes of the loop: exits and log lines are noticed this fast
STOP_GRACE_SECONDS = 10.0  # SIGTERM to SIGKILL when stopping a process group (a pod's grace period)
LOCAL_HOST = "127.0.0.1"
POD_ENV = "SPIN_LOCAL_POD"  # marks every process of one local pod, descendants included: "{job uid}/{index}"


@dataclass(frozen=True)
class Result:
    """Where a local run stands: the status the planner produced, in the controller's shape."""

    phase: str
    reason: str
    message: str
    status: dict[str, Any]
    prefix: str  # naming.run_prefix: everything the run writes lives below it
    manifest: str  # URI of the lineage manifest


# -- pure parts: what the kubelet and the Job controller would do --------------------------------------------
def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion, read left to right: ``$$`` is one ``$`` (so ``$$(VAR)`` stays literal),
    a defined variable is replaced, anything else stays."""

    def repl(m: re.Match[str]) -> str:
        return "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([^)]*)\)", repl, value)


def container_env(container: Mapping[str, Any], index: int) -> dict[str, str]:
    """The variables a pod's container gets from its spec: ``env`` in order (each may refer to the ones before)
    and ``JOB_COMPLETION_INDEX``, which the Job controller adds to every pod of an Indexed Job."""
    env = {"JOB_COMPLETION_INDEX": str(index)}
    for var in container.get("env") or []:
        if "value" in var:  # valueFrom (Secrets, the downward API) has no local source
            env[var["name"]] = expand(str(var["value"]), env)
    return env


def localize(argv: Sequence[str], *, port: int, cpu_ranks: int | None) -> list[str]:
    """A pod's command line as it runs on this machine; the only place where local execution differs from a pod.

    - ``python`` is the images' interpreter: here, the one running this executor;
    - the training master ``{job}-0.{service}`` is a headless-Service name: here every node is on loopback;
    - ``--master-port`` becomes ``port``, a free one, so two local runs (or a test cluster) never collide;
    - ``--nproc-per-node`` becomes ``cpu_ranks`` when given (a CPU gang, see the module docstring).
    """
    out = list(argv)
    if out[0] == "python":
        out[0] = sys.executable
    for i, arg in enumerate(out):
        flag, eq, _ = arg.partition("=")
        if not eq:
            continue
        if flag == "--master-addr":
            out[i] = f"--master-addr={LOCAL_HOST}"
        elif flag == "--master-port":
            out[i] = f"--master-port={port}"
        elif flag == "--nproc-per-node" and cpu_ranks is not None:
            out[i] = f"--nproc-per-node={cpu_ranks}"
    return out


@dataclass(frozen=True)
class IndexState:
    """One completion index of a local Job: whether a process runs it, whether it succeeded, failures so far."""

    running: bool = False
    succeeded: bool = False
    failures: int = 0


@dataclass(frozen=True)
class Outcome:
    """The Job controller's verdict on an Indexed Job, and the indexes it would start pods for now."""

    state: planner.JobState
    reason: str = ""
    message: str = ""
    start: tuple[int, ...] = ()


def job_outcome(spec: Mapping[str, Any], indexes: Sequence[IndexState]) -> Outcome:
    """What the Job controller makes of an Indexed Job's pods (``spec`` is the Job's spec).

    With ``backoffLimitPerIndex`` an index fails after that many retries and the Job fails once more than
    ``maxFailedIndexes`` indexes failed; without it the Job fails once its pods failed more than
    ``backoffLimit`` times. A failed index is retried while its budget lasts; ``parallelism`` caps the pods.
    """
    if spec.get("suspend"):
        return Outcome("suspended")
    per_index = spec.get("backoffLimitPerIndex")

    def exhausted(i: IndexState) -> bool:
        return per_index is not None and i.failures > per_index

    if per_index is not None:
        if sum(map(exhausted, indexes)) > spec.get("maxFailedIndexes", len(indexes)):
            return Outcome("failed", "MaxFailedIndexesExceeded",
                           "Job has exceeded the specified maximal number of failed indexes")
    elif sum(i.failures for i in indexes) > spec.get("backoffLimit", 6):
        return Outcome("failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    if all(i.succeeded for i in indexes):
        return Outcome("complete", "CompletionsReached", "Reached expected number of succeeded pods")
    if all(i.succeeded or exhausted(i) for i in indexes):
        return Outcome("failed", "FailedIndexes", "Job has failed indexes")
    room = spec.get("parallelism", len(indexes)) - sum(i.running for i in indexes)
    waiting = [k for k, i in enumerate(indexes) if not (i.running or i.succeeded or exhausted(i))]
    return Outcome("active", start=tuple(waiting[:max(0, room)]))


def progress_line(job: str, index: int, fields: Mapping[str, Any]) -> str | None:
    """One human line for a worker's JSON log event worth showing live (None for the others)."""
    event = fields.get("event")
    where = f"{job}[{index}]"
    try:
        if event == "start" and "shard" in fields:
            return f"{where} generating shard {fields['shard'] + 1}/{fields['num_shards']}: {fields['rows']} prompts"
        if event == "done" and "sha256" in fields:
            return f"{where} shard written: {fields['rows']} rows, sha256 {str(fields['sha256'])[:12]}"
        if event == "start" and "steps" in fields:
            return (f"{where} training {fields['steps']} steps on {fields['pairs']} pairs, world size "
                    f"{fields['world_size']}, from step {fields['first_step']}")
        if event == "step":
            return (f"{where} step {fields['step']}: loss {fields['loss']:.4f}, reward accuracy "
                    f"{fields['rewards/accuracies']:.2f}, {fields['tokens/s']:.0f} tokens/s")
        if event == "resume":
            return f"{where} resumed from checkpoint {fields['tag']} after step {fields['step']}"
        if event == "checkpoint":
            return f"{where} checkpoint after step {fields['step']}"
        if event == "eval":
            return f"{where} held-out reward accuracy {fields.get('eval/rewards/accuracies')}"
        if event == "skip":
            return f"{where} nothing to do: {fields['reason']}"
        if event == "saved":
            return f"{where} model saved to {fields['uri']}"
    except (KeyError, TypeError, ValueError):  # a worker of another version: show nothing rather than fail
        return None
    return None


# -- local Jobs ------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOCAL_HOST, 0))
        port: int = s.getsockname()[1]
    return port


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``POD_ENV=marker`` (empty where there is no /proc to look in)."""
    needle = f"{POD_ENV}={marker}".encode()
    pids = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/environ", "rb") as f:
                        if needle in f.read().split(b"\0"):
                            pids.append(int(entry.name))
                except OSError:  # gone meanwhile, or not ours to read
                    continue
    return pids


@dataclass(frozen=True)
class Pod:
    """One completion index running: the container's main process, which leads a process group of its own, and
    everything started below it. Descendants are found by a marker in their environment, not by group: torchrun
    starts each rank in a session of its own, and a rank must not outlive its pod any more than on a node."""

    proc: subprocess.Popen[bytes]
    marker: str

    def running(self) -> bool:
        return self.proc.poll() is None or bool(_marked(self.marker))

    def terminate(self) -> None:
        """What the kubelet does first: SIGTERM to the main process (here its group), which passes it on."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """The end of a pod: SIGKILL to whatever of it is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        kill_marked(self.marker)


def kill_marked(marker: str) -> None:
    """SIGKILL every process carrying ``marker``, and wait until they are gone."""
    for pid in _marked(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_SECONDS  # SIGKILL is delivered asynchronously
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_pods(pods: Sequence[Pod], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop pods as a pod deletion does: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    for pod in pods:
        pod.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pod.running() for pod in pods):
        time.sleep(0.1)
    for pod in pods:
        pod.kill()


@dataclass
class LocalJob:
    """A Job body run as processes: the persisted part (body, uid, per-index progress, verdict) and the live
    one (processes of this session)."""

    body: dict[str, Any]
    uid: str
    started: str | None = None
    finished: str | None = None
    succeeded: list[bool] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    suspended: bool = False
    state: planner.JobState = "active"
    reason: str = ""
    message: str = ""
    pods: dict[int, Pod] = field(default_factory=dict)
    port: int = 0

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.body["spec"]["template"]["spec"]["containers"][0]
        return container

    def saved(self) -> dict[str, Any]:
        return {"body": self.body, "uid": self.uid, "started": self.started, "finished": self.finished,
                "succeeded": self.succeeded, "failures": self.failures, "suspended": self.suspended,
                "state": self.state, "reason": self.reason, "message": self.message}

    @classmethod
    def restored(cls, saved: Mapping[str, Any]) -> LocalJob:
        return cls(**saved)

    def marker(self, index: int) -> str:
        return f"{self.uid}/{index}"

    def view(self) -> planner.JobView:
        labels = self.body["metadata"]["labels"]
        return planner.JobView(
            name=self.name, uid=self.uid, iteration=int(labels[naming.LABEL_ITERATION]),
            role=labels[naming.LABEL_ROLE], attempt=int(labels.get(naming.LABEL_ATTEMPT, "0")),
            state="suspended" if self.suspended and self.state == "active" else self.state,
            succeeded=sum(self.succeeded), failed=sum(self.failures), reason=self.reason, message=self.message,
            started=self.started, finished=self.finished, stopped=self.suspended,  # only the planner suspends here
            image=self.body["spec"]["template"]["spec"]["containers"][0]["image"],
            generation=planner.carried_generation(self.body["metadata"].get("annotations")))

    def indexes(self) -> list[IndexState]:
        return [IndexState(k in self.pods, self.succeeded[k], self.failures[k])
                for k in range(len(self.succeeded))]


class Executor:
    """The Kubernetes side of one local run: its Jobs as local pods, the persisted object and status."""

    def __init__(self, workdir: Path, obj: dict[str, Any], emit: Callable[[str], None], nproc: int) -> None:
        self.workdir, self.obj, self.emit, self.nproc = workdir, obj, emit, nproc
        self.path = run_file(workdir, obj["metadata"]["name"])
        self.logs = workdir / "logs"
        self.jobs: dict[str, LocalJob] = {}
        self.services: set[str] = set()
        self.status: dict[str, Any] = {}
        self._offsets: dict[Path, int] = {}

    # -- the API server's part: the object, its status and its Jobs, persisted in one file --------------------
    def load(self) -> None:
        """Takes the uid, generation, status and Jobs of an earlier session; the spec is the caller's."""
        meta = self.obj["metadata"]
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            meta.update(uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.path.resolve()}")), generation=1)
            return
        before = saved["object"]
        changed = before["spec"] != self.obj["spec"]  # the API server bumps generation on a spec change
        meta.update(uid=before["metadata"]["uid"], generation=before["metadata"]["generation"] + changed)
        self.status = saved.get("status") or {}
        self.jobs = {j["body"]["metadata"]["name"]: LocalJob.restored(j) for j in saved.get("jobs") or []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"object": self.obj, "status": self.status,
                           "jobs": [j.saved() for j in self.jobs.values()]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    # -- the Job controller's and the kubelet's part -------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> None:
        if body["metadata"]["name"] in self.jobs:  # created in an earlier pass or session: ours (same uid label)
            return
        completions = int(body["spec"]["completions"])
        job = LocalJob(copy.deepcopy(body), str(uuid.uuid4()), started=_now(), succeeded=[False] * completions,
                       failures=[0] * completions, suspended=bool(body["spec"].get("suspend")))
        self.jobs[job.name] = job
        self.emit(f"created {job.name}: {completions} process(es), logs in {self.logs}/{job.name}-<index>.log")

    def suspend(self, name: str, suspend: bool) -> None:
        job = self.jobs[name]
        if suspend and job.pods:
            stop_pods(list(job.pods.values()))  # not failures: a suspended Job's pods are deleted
            job.pods.clear()
        job.suspended = suspend

    def _start(self, job: LocalJob, index: int) -> None:
        if not job.pods:  # the gang's first process: one rendezvous port for all of its nodes
            job.port = free_port()
        gpus = int(self.obj["spec"]["training"].get("gpusPerNode", 0))
        cpu_ranks = self.nproc if gpus == 0 else None
        env = container_env(job.container, index)
        argv = localize([expand(a, env) for a in [*job.container["command"], *job.container.get("args", [])]],
                        port=job.port, cpu_ranks=cpu_ranks)
        log = self.logs / f"{job.name}-{index}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cache = {"SPIN_CACHE_DIR": str(self.workdir / "cache")}  # models and checkpoint staging stay in workdir
        with log.open("ab") as out:
            out.write(f"--- {_now()} local executor: {' '.join(argv)}\n".encode())
            out.flush()
            self._offsets[log] = out.tell()  # progress from this start on, not an earlier session's lines
            try:
                marker = job.marker(index)
                proc = subprocess.Popen(
                    argv, env={**os.environ, **cache, **env, POD_ENV: marker}, cwd=self.workdir, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:  # like a container that cannot start: the index fails
                out.write(f"local executor: cannot start {argv[0]!r}: {e}\n".encode())
                job.failures[index] += 1
                return
        job.pods[index] = Pod(proc, marker)
        retry = f" (retry {job.failures[index]})" if job.failures[index] else ""
        self.emit(f"{job.name}[{index}] started{retry}, log {log}")

    def observe(self) -> bool:
        """Reap exited processes, let the Job controller decide, start what it starts; True if anything changed."""
        changed = False
        for job in self.jobs.values():
            if job.state != "active":
                continue
            for index, pod in list(job.pods.items()):
                code = pod.proc.poll()
                if code is None:
                    continue
                self._progress(job, index)  # the last lines before the exit
                pod.kill()  # the main process is gone: so is the rest of its pod
                del job.pods[index]
                code = 128 - code if code < 0 else code  # a signal, as the kubelet reports it
                changed = True
                if code == 0:
                    job.succeeded[index] = True
                    self.emit(f"{job.name}[{index}] finished")
                else:
                    job.failures[index] += 1
                    self.emit(f"{job.name}[{index}] failed with exit code {code}, "
                              f"see {self.logs}/{job.name}-{index}.log")
            outcome = job_outcome({**job.body["spec"], "suspend": job.suspended}, job.indexes())
            if outcome.state in ("complete", "failed"):
                stop_pods(list(job.pods.values()))  # a failed gang's other nodes are deleted with their Job
                job.pods.clear()
                job.state, job.reason, job.message = outcome.state, outcome.reason, outcome.message
                job.finished = _now() if outcome.state == "complete" else None
                self.emit(f"{job.name} {outcome.state}: {outcome.reason}")
                changed = True
            for index in outcome.start:
                self._start(job, index)
                changed = True
        return changed

    def progress(self) -> None:
        """New lines of the running workers' logs, as events."""
        for job in self.jobs.values():
            for index in job.pods:
                self._progress(job, index)

    def _progress(self, job: LocalJob, index: int) -> None:
        for fields in self._new_events(self.logs / f"{job.name}-{index}.log"):
            if (line := progress_line(job.name, index, fields)) is not None:
                self.emit(line)

    def _new_events(self, log: Path) -> Iterator[dict[str, Any]]:
        try:
            with log.open("rb") as f:
                f.seek(self._offsets.get(log, 0))
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next pass
        self._offsets[log] = self._offsets.get(log, 0) + len(complete)
        for line in complete.splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    fields = json.loads(line)
                    if isinstance(fields, dict):
                        yield fields

    def stop_all(self) -> None:
        pods = [p for j in self.jobs.values() for p in j.pods.values()]
        if pods:
            self.emit(f"stopping {len(pods)} local pod(s)")
            stop_pods(pods)
        for job in self.jobs.values():
            job.pods.clear()  # interrupted, not failed: a later session starts these indexes again
            if job.state == "active":  # an interrupt between a start and its bookkeeping leaves a pod untracked
                for index in range(len(job.succeeded)):
                    kill_marked(job.marker(index))


# -- the loop ----------------------------------------------------------------------------------------------------
def run_file(workdir: Path, name: str) -> Path:
    """Where a local run's object, status and Jobs persist."""
    return workdir / "runs" / f"{name}.json"


def prepare(obj: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """The SpinRun as the API server would store it: storage defaulted to ``file://{workdir}/store``, the CRD's
    defaults applied, validated offline. ValueError with one line per bad field."""
    filled: dict[str, Any] = copy.deepcopy(dict(obj))
    spec = filled.setdefault("spec", {})
    if isinstance(spec, dict):
        spec.setdefault("storage", {"uri": f"file://{workdir.resolve()}/store"})
    filled.setdefault("metadata", {}).setdefault("namespace", "default")
    defaulted = api.load_defaulted(filled)
    errors = api.schema_errors(defaulted) + api.semantic_errors(defaulted)
    if not defaulted["metadata"].get("name"):
        errors.insert(0, "metadata.name: required")
    if not errors and defaulted["spec"].get("queueName"):
        errors = ["spec.queueName: Kueue admits Jobs on a cluster; the local executor runs without one"]
    if errors:
        raise ValueError("\n".join(errors))
    return defaulted


def _result(run: api.SpinRun, status: Mapping[str, Any]) -> Result:
    prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
    return Result(phase=status.get("phase", planner.PENDING), reason=status.get("reason", ""),
                  message=next((c.get("message", "") for c in status.get("conditions", [])
                                if c.get("type") == "Progressing"), ""),
                  status=dict(status), prefix=prefix, manifest=naming.manifest_uri(prefix))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a local run as Ctrl-C does (signal handlers can only be set from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(obj: dict[str, Any], workdir: Path, *, on_event: Callable[[str], None] | None = None,
        nproc: int = 2) -> Result:
    """Run a SpinRun to its end (Succeeded, Failed or Suspended) on this machine; see the module docstring.

    ``obj``: a SpinRun object (apiVersion, kind, metadata.name, spec). ``workdir``: the run's home (state,
    logs, cache, default store); the same workdir resumes. ``on_event``: receives one line per state change.
    ``nproc``: CPU ranks per training node. Ctrl-C or SIGTERM stops every process of the run, then raises
    KeyboardInterrupt.
    """
    if nproc < 1:
        raise ValueError(f"nproc: must be at least 1 (got {nproc})")
    emit = on_event or (lambda line: None)
    defaulted = prepare(obj, workdir)
    ex = Executor(workdir, defaulted, emit, nproc)
    ex.load()
    spinrun = api.parse({**defaulted, "status": ex.status})
    prefix = naming.run_prefix(spinrun.spec.storage.uri, spinrun.namespace, spinrun.name, spinrun.uid)
    # S3 credentials: this process's AWS_* environment (boto3's default chain), as the local workers get them.
    store = lineage.open_store(prefix, endpoint=spinrun.spec.storage.endpoint, region=spinrun.spec.storage.region)
    identity = {"name": spinrun.name, "namespace": spinrun.namespace, "uid": spinrun.uid}  # as the controller's
    emit(f"{spinrun.name}: uid {spinrun.uid}, lineage {naming.manifest_uri(prefix)}, state {ex.path}")
    storage_error: str | None = None
    with sigterm_interrupts():
        try:
            while True:
                if ex.observe():
                    ex.save()  # restart counts and verdicts outlive this process, as Job status does
                ex.progress()
                jobs = tuple(j.view() for j in ex.jobs.values())
                try:
                    manifest = lineage.read(store)
                    steps = manifest.steps
                    # A training Job carries its generation record (the controller saves a write with it); here
                    # no request is saved, and an interrupted run's lineage should show what it finished.
                    carried = [(t, role, r) for (t, role), r in planner.Observed(jobs).carried().items()
                               if (t, role) not in steps]
                    if carried:
                        steps = lineage.record_steps(store, identity, defaulted["spec"], carried, manifest).steps
                        for t, role, _ in carried:
                            emit(f"recorded iteration {t} {role} in {naming.manifest_uri(prefix)}")
                    found = planner.Lineage(steps, lineage.step_outputs(store, spinrun, prefix, jobs, steps))
                except Exception as e:  # storage down: the status says why; the next pass retries
                    found = planner.Lineage(error=f"{type(e).__name__}: {str(e)[:300]}")
                if found.error != storage_error:  # say so once when storage goes away and once when it is back
                    emit(f"storage unavailable, retrying: {found.error}" if found.error else "storage reachable again")
                    storage_error = found.error
                plan = planner.plan(spinrun, planner.Observed(jobs, frozenset(ex.services)), found, _now())
                for action in plan.actions:
                    if isinstance(action, planner.RecordStep):
                        lineage.record_steps(store, identity, defaulted["spec"],
                                             [(action.iteration, action.role, action.record)])
                        emit(f"recorded iteration {action.iteration} {action.role} in {naming.manifest_uri(prefix)}")
                    elif isinstance(action, planner.CreateJob):
                        ex.create(action.body)
                    elif isinstance(action, planner.CreateService):
                        ex.services.add(action.body["metadata"]["name"])  # its one use, the master's name: localize
                    elif isinstance(action, planner.SuspendJob):
                        ex.suspend(action.name, action.suspend)
                if plan.status != ex.status or plan.actions:
                    ex.status = plan.status
                    ex.save()
                    for event in plan.events:
                        emit(f"{event.reason}: {event.message}")
                spinrun = api.parse({**defaulted, "status": ex.status})
                busy = any(j.pods for j in ex.jobs.values())
                if plan.status["phase"] in (planner.SUCCEEDED, planner.FAILED, planner.SUSPENDED) and not busy:
                    return _result(spinrun, ex.status)
                if not plan.actions:
                    time.sleep(POLL_SECONDS * (8 if found.error else 1))
        except BaseException:
            ex.stop_all()
            ex.save()
            emit(f"stopped; run again with workdir {workdir} to resume")
            raise


def saved_run(workdir: Path, name: str) -> dict[str, Any] | None:
    """A local run's SpinRun object with the status it last wrote in ``workdir``; None when it never ran there."""
    try:
        saved = json.loads(run_file(workdir, name).read_text())
    except FileNotFoundError:
        return None
    obj: dict[str, Any] = {**saved["object"], "status": saved["status"]}
    return obj


def status(workdir: Path, name: str) -> Result | None:
    """The last status a local run wrote in ``workdir``; None when it never ran there."""
    obj = saved_run(workdir, name)
    return None if obj is None else _result(api.parse(obj), obj["status"])
