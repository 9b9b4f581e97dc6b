"""The controller on the real control plane: SpinRuns run their iterations through real Jobs whose pods
(run by the node agent) are the real workers on a tiny local model, with lineage on the real S3 server.

The reference run (a session fixture in conftest) is the uninterrupted baseline: the leader-kill test and the
S3-outage test run the same spec and must end with the same lineage. Tests of orchestration only (takeover by a
standby, early stop) use simulated pods: the node agent ends them at once and the test writes what their
workers would have left in storage.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import psutil
import pytest
import yaml
from click.testing import CliRunner
from invalid_specs import cases, valid
from kubernetes import client
from kubernetes.client.rest import ApiException
from support import (
    SIMULATED,
    STEPS,
    Controllers,
    FinishedRun,
    assert_job_uids_are_the_jobs,
    completion_index,
    create_run,
    create_s3_secret,
    get_run,
    job_names,
    jobs_by_name,
    kill_pod_processes,
    kill_when_running,
    manifest,
    metric,
    pods,
    reference_spec,
    run_store,
    spin_run,
    steps_normalized,
    unsuspend,
    write_outputs,
)

from spin_k8s import api as spin_api
from spin_k8s import lineage, naming, planner
from spin_k8s.cli import main
from spin_k8s.controller.manager import LEASE_NAME
from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import Process, free_port
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL
JOBS = ["demo-i0-gen", "demo-i0-train", "demo-i1-gen", "demo-i1-train"]


def test_reference_run_succeeds_with_its_lineage(api: client.ApiClient, reference: FinishedRun,
                                                 s3_server: S3Server) -> None:
    assert reference.exit_code == 0, reference.output
    run, ns = reference.run, reference.namespace
    status = run["status"]
    assert (status["phase"], status["reason"], status["iteration"]) == ("Succeeded", "Completed", 1)
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    assert all("loss" in i["metrics"] and "rewards/accuracies" in i["metrics"] for i in status["iterations"])
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["observedGeneration"]) == ("True", run["metadata"]["generation"])

    assert sorted(reference.jobs) == JOBS
    images = {}
    for j in client.BatchV1Api(api).list_namespaced_job(ns).items:
        images[j.metadata.name] = j.spec.template.spec.containers[0].image
        assert j.metadata.owner_references[0].uid == run["metadata"]["uid"]
        assert j.metadata.labels[naming.LABEL_RUN_UID] == run["metadata"]["uid"]
        assert j.spec.template.metadata.labels[naming.LABEL_ROLE] in naming.ROLES
    gen_pods = client.CoreV1Api(api).list_namespaced_pod(
        ns, label_selector=f"{naming.LABEL_ROLE}=generate,{naming.LABEL_ITERATION}=0").items
    assert sorted(completion_index(p) for p in gen_pods) == ["0", "1"]

    prefix, steps = reference.prefix, reference.steps
    assert sorted(steps) == STEPS
    assert_job_uids_are_the_jobs(steps, reference.jobs)
    assert all(step["image"] == images[step["job"]] for step in steps.values())  # what each Job ran
    for t in (0, 1):
        assert [s["engine"] for s in steps[(t, "generate")]["shards"]] == ["transformers"] * 2  # as the spec says
        assert all(len(s["sha256"]) == 64 for s in steps[(t, "generate")]["shards"])
    assert steps[(1, "train")]["model"] == f"{prefix}/i0/model"
    # Iteration 1's opponent is the model iteration 0 trained: the digests that identify it agree.
    assert {s["modelDigest"] for s in steps[(1, "generate")]["shards"]} == {steps[(0, "train")]["checkpointDigest"]}
    assert all(len(steps[(t, "train")]["checkpointDigest"]) == 64 for t in (0, 1))
    assert steps[(0, "train")]["checkpointDigest"] != steps[(1, "train")]["checkpointDigest"]
    assert steps[(1, "train")]["dataMix"] == [f"{prefix}/i0/synthetic", f"{prefix}/i1/synthetic"]
    assert [steps[(t, "train")]["config"]["learningRate"] for t in (0, 1)] == [1e-3, 5e-4]
    assert status["manifest"] == f"{prefix}/manifest.json"
    key = f"{prefix.removeprefix(f's3://{reference.bucket}/')}/i1/model/model.safetensors"
    assert s3_server.client().head_object(Bucket=reference.bucket, Key=key)["ContentLength"]
    events = client.CoreV1Api(api).list_namespaced_event(ns, field_selector="involvedObject.name=demo").items
    # The start and the end; the routine Generating <-> Training steps are in status and the Jobs' events.
    assert sorted(e.reason for e in events) == ["Generating", "Succeeded"]


# -- chaos that hits the leader -------------------------------------------------------------------------------
def pod_processes(cluster: Cluster, namespace: str, job: str, api: client.ApiClient) -> list[psutil.Process]:
    """Every process of the running pods of ``job`` (found by their working directory)."""
    dirs = set()
    for p in pods(api, namespace, job):
        dirs |= {str(d.resolve()) for d in (cluster.node_root / "pods").glob(f"{namespace}_{p.metadata.name}_*")}
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.cwd() in dirs:
                found.append(proc)
    return found


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


class Chaos:
    """Kills the controller that holds the Lease at chosen points of a run, each found by observing the run
    (Jobs, pods, lineage, status), never by the clock. A kill counts only if the Lease names the killed
    process just before it. Every controller is started with a 2 s lease, so a successor takes over quickly."""

    def __init__(self, controllers: Controllers, api: client.ApiClient, store: lineage.Store) -> None:
        self.controllers, self.api, self.store = controllers, api, store
        self.ns = controllers.namespace
        self.metrics: dict[int, int] = {}  # controller pid -> its metrics port
        self.leader: Process = self.start()
        self.kills: list[str] = []
        self.missed: list[str] = []
        self.uids: dict[str, set[str]] = {}  # every uid seen under each Job name, over the whole run

    def start(self) -> Process:
        port = free_port()
        proc = self.controllers.start("--lease-seconds=2", f"--metrics-bind=127.0.0.1:{port}")
        self.metrics[proc.popen.pid] = port
        return proc

    def reconciles(self, proc: Process) -> int:
        """How many reconciles ``proc`` finished (its /metrics); 0 before it serves them."""
        try:
            return metric(self.metrics[proc.popen.pid], "spin_controller_reconciles_total")
        except OSError:
            return 0

    def holder(self) -> str | None:
        try:
            return str(client.CoordinationV1Api(self.api).read_namespaced_lease(
                LEASE_NAME, self.ns).spec.holder_identity)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def holds_lease(self) -> bool:
        """Whether the Lease names the newest controller (the manager's identity: hostname-pid)."""
        return self.holder() == f"{socket.gethostname()}-{self.leader.popen.pid}"

    def leading(self, reconciled: bool = True) -> Process:
        """Wait until the newest controller holds the Lease (its predecessor's has expired) and, with
        ``reconciled``, has reconciled the run at least once: it has seen the state it is about to be killed in."""
        self.controllers.wait(f"{self.leader.name} to hold the Lease", self.holds_lease, 60)
        if reconciled:
            self.controllers.wait(f"{self.leader.name} to reconcile", lambda: self.reconciles(self.leader) > 0, 60)
        return self.leader

    def freeze(self, reconciled: bool = True) -> Process:
        """Stop the leader where it stands (SIGSTOP): it can neither act nor renew its Lease. ``reconciled``:
        only once it has reconciled (else as soon as it holds the Lease)."""
        leader = self.leading(reconciled)
        self.controllers.unwatch(leader)
        leader.popen.send_signal(signal.SIGSTOP)
        return leader

    def kill(self, point: str) -> None:
        """SIGKILL the leader (frozen or not) at ``point`` and start its successor."""
        assert self.holds_lease(), f"{point}: the Lease names {self.holder()}, not the process to kill"
        self.controllers.kill(self.leader)
        self.kills.append(point)
        self.leader = self.start()

    def jobs(self) -> dict[str, client.V1Job]:
        found = {j.metadata.name: j for j in client.BatchV1Api(self.api).list_namespaced_job(
            self.ns, label_selector=f"{naming.LABEL_RUN}=demo").items}
        for name, job in found.items():
            self.uids.setdefault(name, set()).add(job.metadata.uid)
        return found

    def job_state(self, name: str) -> str | None:
        job = self.jobs().get(name)
        if job is None:
            return None
        done = [c.type for c in job.status.conditions or [] if c.type in ("Complete", "Failed") and c.status == "True"]
        return done[0] if done else "Active"

    def wait_job(self, name: str, state: str) -> None:
        self.controllers.wait(f"{name} {state}", lambda: self.job_state(name) == state, 600)

    def recorded(self, t: int, role: str) -> bool:
        try:
            return (t, role) in lineage.load(self.store)
        except botocore.exceptions.ClientError as e:
            # The stepped leader may be frozen in the middle of its manifest PUT, and SeaweedFS can answer a read
            # of that key with a 500 until the writer goes on: not recorded yet, step the leader further.
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                return False
            raise

    def status_reports(self, t: int) -> bool:
        """Whether status already reports iteration t's training as recorded (its checkpoint)."""
        items = (get_run(self.api, self.ns, "demo").get("status") or {}).get("iterations") or []
        return any(i["iteration"] == t and "checkpoint" in i for i in items)

    def running_pods(self, job: str) -> list[client.V1Pod]:
        return [p for p in pods(self.api, self.ns, job) if p.status.phase == "Running"]

    def step_until(self, leader: Process, done: Callable[[], bool]) -> None:
        """Let a frozen leader run in slices of a few milliseconds until ``done()``, frozen again after each."""
        for _ in range(5000):
            if done():
                return
            leader.popen.send_signal(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.popen.wait(0.005)
            leader.popen.send_signal(signal.SIGSTOP)
            assert leader.popen.poll() is None, "the stepped leader exited"
        raise AssertionError("the stepped leader never got there")


def run_with_leader_kills(chaos: Chaos, cluster: Cluster, api: client.ApiClient, s3b: S3Server) -> None:
    """One pass of the reference run with the leader killed at each point the issue lists, in run order."""
    c, ns = chaos, chaos.ns
    for t in (0, 1):
        gen, train = f"demo-i{t}-gen", f"demo-i{t}-train"
        # 1. The generation Job was just created.
        c.leading()
        c.controllers.wait(f"{gen} created", lambda g=gen: g in c.jobs(), 120)  # type: ignore[misc]
        c.kill(f"i{t}: generation Job created")
        # 2. Mid generation: its pods run (frozen now, so the step cannot end before the next point is set up).
        c.controllers.wait(f"{gen} pods running", lambda g=gen: len(c.running_pods(g)) == 2, 300)  # type: ignore[misc]
        frozen_pods = pod_processes(cluster, ns, gen, api)
        signal_all(frozen_pods, signal.SIGSTOP)
        c.leading()
        assert c.job_state(gen) == "Active"
        c.kill(f"i{t}: mid generation")
        # 3. Generation Complete, training not created: the leader is frozen before the pods may finish.
        leader = c.freeze()
        signal_all(frozen_pods, signal.SIGCONT)
        c.wait_job(gen, "Complete")
        assert train not in c.jobs() and not c.recorded(t, "generate")
        c.kill(f"i{t}: generation Complete, training not created")
        if t == 0:
            # 4. Mid training (its pod frozen as soon as it runs, before it reads anything from S3).
            c.controllers.wait(f"{train} running", lambda j=train: c.running_pods(j), 300)  # type: ignore[misc]
            frozen_pods = pod_processes(cluster, ns, train, api)
            signal_all(frozen_pods, signal.SIGSTOP)
            c.leading()
            c.kill(f"i{t}: mid training")
            final = train
        else:
            # 7. During a gang restart: the gang failed, its restart not created yet.
            c.controllers.wait(f"{train} running", lambda j=train: c.running_pods(j), 300)  # type: ignore[misc]
            leader = c.freeze()
            (pod,) = c.running_pods(train)
            assert kill_pod_processes(cluster, ns, pod.metadata.name)
            c.wait_job(train, "Failed")
            assert f"{train}-r1" not in c.jobs()
            c.kill(f"i{t}: gang failed, restart not created")
            # 5 then 8. The restarted gang Complete, its lineage not written, and S3 down: the leader sees the
            # outage (nothing runs in a pod meanwhile) and is killed during it.
            final = f"{train}-r1"
            c.wait_job(final, "Active")
            leader = c.freeze()
            c.wait_job(final, "Complete")
            assert not c.recorded(t, "train")
            c.controllers.unwatch(s3b.process)  # type: ignore[arg-type]
            s3b.stop()
            leader.popen.send_signal(signal.SIGCONT)
            c.controllers.watched.append(leader)
            c.controllers.wait("StorageAvailable=False", lambda: any(
                cond["type"] == "StorageAvailable" and cond["status"] == "False"
                for cond in get_run(api, ns, "demo")["status"]["conditions"]), 60)
            c.kill(f"i{t}: S3 outage")
            s3b.start()
            c.controllers.watched.append(s3b.process)  # type: ignore[arg-type]
        if t == 0:
            # 5. Training Complete, its lineage not written.
            leader = c.freeze()
            signal_all(frozen_pods, signal.SIGCONT)
            c.wait_job(final, "Complete")
            assert not c.recorded(t, "train")
            c.kill(f"i{t}: training Complete, lineage not written")
        # 6. Lineage written, status not patched: the new leader runs in slices until the record is in S3.
        leader = c.freeze(reconciled=False)
        c.step_until(leader, lambda t=t: c.recorded(t, "train"))  # type: ignore[misc]
        if c.status_reports(t):
            c.missed.append(f"i{t}: status patched within the same slice as the lineage write")
            leader.popen.send_signal(signal.SIGCONT)
            c.controllers.watched.append(leader)
        else:
            c.kill(f"i{t}: lineage written, status not patched")


def test_leader_killed_at_every_step_duplicates_nothing_and_changes_no_lineage(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        assets: tiny.TinyAssets, reference: FinishedRun, tmp_path: Path) -> None:
    with S3Server(tmp_path / "s3") as s3b:
        controllers.use_s3(s3b)
        s3b.client().create_bucket(Bucket="chaos")
        create_s3_secret(api, namespace, s3b)
        created = create_run(api, namespace, reference_spec("demo", assets, s3b, "chaos"))
        chaos = Chaos(controllers, api, run_store(s3b, "chaos", created))
        run_with_leader_kills(chaos, cluster, api, s3b)
        run = controllers.wait_phase(api, "demo", "Succeeded")
        steps = lineage.load(run_store(s3b, "chaos", run))

    print("leader kills:", *chaos.kills, sep="\n  ")
    assert len(chaos.kills) >= 10, chaos.kills
    assert {k.split(": ", 1)[1] for k in chaos.kills} >= {
        "generation Job created", "mid generation", "generation Complete, training not created", "mid training",
        "training Complete, lineage not written", "gang failed, restart not created", "S3 outage"}, chaos.kills
    assert any(k.endswith("lineage written, status not patched") for k in chaos.kills), chaos.missed
    # No Job was created twice: one Job per name, one uid per name whenever the run was looked at, and the uid
    # each step recorded is that Job's.
    jobs = jobs_by_name(api, namespace, "demo")
    assert sorted(jobs) == sorted([*JOBS, "demo-i1-train-r1"])
    chaos.jobs()
    assert {name: len(uids) for name, uids in chaos.uids.items()} == dict.fromkeys(jobs, 1), chaos.uids
    assert_job_uids_are_the_jobs(steps, jobs)
    # The same lineage as the uninterrupted reference run, field for field (times, uids and the storage prefix
    # aside: support.VOLATILE). Iteration 1's training gang was restarted here on purpose, so that step was
    # recorded from the restarted Job with one restart; it trained from scratch (no checkpoint yet) on the same
    # data with the same seeds, so its model, metrics and every later digest are still the reference's.
    ours = steps_normalized(steps, f"s3://chaos/spin/{namespace}/demo/{run['metadata']['uid']}")
    theirs = steps_normalized(reference.steps, reference.prefix)
    assert (ours["1/train"].pop("job"), ours["1/train"].pop("restarts")) == ("demo-i1-train-r1", 1)
    assert (theirs["1/train"].pop("job"), theirs["1/train"].pop("restarts")) == ("demo-i1-train", 0)
    assert ours == theirs
    assert run["status"]["iterations"][1]["restarts"] == 1


def test_s3_outage_is_reported_without_restarts_and_the_lineage_is_the_reference(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        assets: tiny.TinyAssets, reference: FinishedRun, tmp_path: Path) -> None:
    """S3 goes away while iteration 0's training gang computes (its processes are frozen meanwhile, as a
    long step between checkpoints would be: the outage is the controller's alone to handle)."""
    with S3Server(tmp_path / "s3") as s3b:
        controllers.use_s3(s3b)
        s3b.client().create_bucket(Bucket="outage")
        create_s3_secret(api, namespace, s3b)
        controllers.start()
        create_run(api, namespace, reference_spec("demo", assets, s3b, "outage"))
        controllers.wait("training pods", lambda: [p for p in pods(api, namespace, "demo-i0-train")
                                                   if p.status.phase == "Running"], 300)
        frozen = pod_processes(cluster, namespace, "demo-i0-train", api)
        signal_all(frozen, signal.SIGSTOP)
        controllers.unwatch(s3b.process)  # type: ignore[arg-type]
        s3b.stop()
        def storage_down() -> dict[str, Any] | None:
            cond = next((c for c in get_run(api, namespace, "demo")["status"]["conditions"]
                         if c["type"] == "StorageAvailable"), {})
            return cond if cond.get("status") == "False" else None

        down = controllers.wait("StorageAvailable=False", storage_down, 60)
        assert down["reason"] == "StorageUnavailable" and down["message"]
        during = []
        for _ in range(25):  # the outage goes on past a resync: every observation says the same
            run = get_run(api, namespace, "demo")
            during.append((run["status"]["phase"], run["status"]["reason"], job_names(api, namespace, "demo")))
            time.sleep(0.25)
        s3b.start()
        controllers.watched.append(s3b.process)  # type: ignore[arg-type]
        signal_all(frozen, signal.SIGCONT)
        names: list[list[str]] = []
        run = controllers.wait_phase(api, "demo", "Succeeded",
                                     while_waiting=lambda: names.append(job_names(api, namespace, "demo")))
        steps = lineage.load(run_store(s3b, "outage", run))
        store_manifest = manifest(run_store(s3b, "outage", run))

    # During the outage: phase Training, reason StorageUnavailable, the same Jobs; afterwards never a Job beyond
    # the reference's (a restarted gang would be demo-i0-train-r1).
    assert all(d == ("Training", "StorageUnavailable", JOBS[:2]) for d in during), during
    assert all(set(n) <= set(JOBS) for n in names), "a Job was restarted because of the outage"
    up = next(c for c in run["status"]["conditions"] if c["type"] == "StorageAvailable")
    assert up["status"] == "True"
    assert [i.get("restarts", 0) for i in run["status"]["iterations"]] == [0, 0]
    assert sorted(jobs_by_name(api, namespace, "demo")) == JOBS
    prefix = f"s3://outage/spin/{namespace}/demo/{run['metadata']['uid']}"
    assert steps_normalized(steps, prefix) == steps_normalized(reference.steps, reference.prefix)
    assert store_manifest["iterations"].keys() == {"0", "1"}
    assert s3b.secret_key not in yaml.safe_dump(run)  # no credential in status


def test_two_replicas_one_leads_and_a_standby_takes_over(api: client.ApiClient, crd: None, namespace: str,
                                                         controllers: Controllers, s3_secret: str,
                                                         assets: tiny.TinyAssets, s3_server: S3Server,
                                                         bucket: str) -> None:
    first, second = controllers.start("--lease-seconds=2"), controllers.start("--lease-seconds=2")
    created = create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, suspend=True,
                                                  **SIMULATED))
    leases = client.CoordinationV1Api(api)
    holder = controllers.wait("a leader", lambda: leases.read_namespaced_lease(LEASE_NAME, namespace)
                              .spec.holder_identity, 30)
    write_outputs(s3_server, bucket, created, iterations=1)
    unsuspend(api, namespace, "demo")
    controllers.wait("generation to start", lambda: job_names(api, namespace, "demo"), 60)
    leader = next(p for p in (first, second) if holder.endswith(f"-{p.popen.pid}"))
    standby = second if leader is first else first
    controllers.kill(leader)
    controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert leases.read_namespaced_lease(LEASE_NAME, namespace).spec.holder_identity.endswith(f"-{standby.popen.pid}")
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]


def test_invalid_spinruns_are_rejected_naming_the_field_and_create_nothing(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """Every case of tests/data/invalid-spinruns.yaml is refused with 422 naming its field path, while a
    controller watches the namespace; afterwards nothing exists: no SpinRun, no Job, no Service, no event."""
    controllers.start()
    objects = client.CustomObjectsApi(api)
    table = cases()
    for why, obj, field in table:
        with pytest.raises(ApiException) as refused:
            objects.create_namespaced_custom_object(G, V, namespace, P, obj)
        assert refused.value.status == 422, why
        assert f"{field}:" in refused.value.body or f"{field}[" in refused.value.body, (why, refused.value.body)
    long_name = valid("x" * 41)
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(G, V, namespace, P, long_name)
    assert refused.value.status == 422 and "at most 40 characters" in refused.value.body
    for name in ("run.v2", "7run"):  # legal object names, but no Service or pod hostname can derive from them
        with pytest.raises(ApiException) as refused:
            objects.create_namespaced_custom_object(G, V, namespace, P, valid(name))
        assert refused.value.status == 422 and "must be a DNS-1035 label" in refused.value.body, name
    # A valid run created afterwards is reconciled by that controller (so it was watching), and then deleted.
    create_run(api, namespace, spin_run("witness", assets, s3_server, bucket, suspend=True))
    controllers.wait_phase(api, "witness", "Suspended", 60)
    objects.delete_namespaced_custom_object(G, V, namespace, P, "witness")
    controllers.wait("the witness to go", lambda: not objects.list_namespaced_custom_object(
        G, V, namespace, P)["items"], 30)
    assert client.BatchV1Api(api).list_namespaced_job(namespace).items == []
    assert client.CoreV1Api(api).list_namespaced_service(namespace).items == []
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert {e.involved_object.name for e in events} <= {"witness"}


def test_the_examples_are_accepted_by_the_api_server(api: client.ApiClient, crd: None, namespace: str) -> None:
    """Every SpinRun under manifests/examples/, as a user applies it: a server-side dry run with strict field
    validation (an unknown field is refused, not dropped) passes the schema and the CEL rules, and the server's
    defaults are the ones offline validation (spinctl, the local executor) applies."""
    objects = client.CustomObjectsApi(api)
    examples = sorted((Path(__file__).parent.parent / "manifests" / "examples").glob("*.yaml"))
    assert [p.name for p in examples] == ["tiny-cpu.yaml", "zephyr-7b-gpu.yaml", "zephyr-7b-paper.yaml"]
    for path in examples:
        body = yaml.safe_load(path.read_text())
        served = objects.create_namespaced_custom_object(G, V, namespace, P, body, dry_run="All",
                                                         field_validation="Strict")
        assert served["spec"] == spin_api.load_defaulted(body)["spec"], path.name
    assert objects.list_namespaced_custom_object(G, V, namespace, P)["items"] == []  # a dry run creates nothing


def test_failed_generation_shard_reruns_alone(cluster: Cluster, api: client.ApiClient, crd: None, namespace: str,
                                              controllers: Controllers, s3_secret: str, assets: tiny.TinyAssets,
                                              s3_server: S3Server, bucket: str) -> None:
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, restartLimit=2))
    kill_when_running(controllers, api, "demo-i0-gen", "1")
    controllers.wait_phase(api, "demo", "Succeeded")
    by_index: dict[str, list[str]] = {}
    for p in pods(api, namespace, "demo-i0-gen"):
        by_index.setdefault(completion_index(p), []).append(p.status.phase)
    assert {k: sorted(v) for k, v in by_index.items()} == {"0": ["Succeeded"], "1": ["Failed", "Succeeded"]}
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]  # the Job retried the shard


def test_suspend_stops_the_jobs_resume_finishes_and_delete_collects_everything(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        s3_secret: str, assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    objects, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1))
    controllers.wait("generation pods", lambda: [p for p in pods(api, namespace, "demo-i0-gen")
                                                 if p.status.phase == "Running"], 120)
    objects.patch_namespaced_custom_object(G, V, namespace, P, "demo", {"spec": {"suspend": True}})
    controllers.wait_phase(api, "demo", "Suspended", 60)
    assert batch.read_namespaced_job("demo-i0-gen", namespace).spec.suspend is True
    controllers.wait("the suspended Job's pods to go", lambda: not [
        p for p in pods(api, namespace, "demo-i0-gen") if p.status.phase in ("Pending", "Running")], 60)

    objects.patch_namespaced_custom_object(G, V, namespace, P, "demo", {"spec": {"suspend": False}})
    controllers.wait_phase(api, "demo", "Succeeded")
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]

    objects.delete_namespaced_custom_object(G, V, namespace, P, "demo")
    controllers.wait("owner references to collect the Jobs and the Service", lambda: not job_names(
        api, namespace, "demo") and not client.CoreV1Api(api).list_namespaced_service(namespace).items, 60)


def test_early_stop_when_the_model_can_no_longer_tell_real_from_synthetic(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """Simulated pods: iteration 0's trainer reports a held-out reward accuracy below the threshold."""
    controllers.start()
    body = spin_run("demo", assets, s3_server, bucket, iterations=3, suspend=True,
                    earlyStop={"minRewardAccuracy": 0.9, "heldOutFraction": 0.5}, **SIMULATED)
    created = create_run(api, namespace, body)
    write_outputs(s3_server, bucket, created, iterations=1, held_out_accuracy=0.625)
    unsuspend(api, namespace, "demo")
    run = controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert (run["status"]["reason"], run["status"]["iteration"]) == ("Converged", 0)
    succeeded = next(c for c in run["status"]["conditions"] if c["type"] == "Succeeded")
    assert "0.625 < 0.9" in succeeded["message"]
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]
    steps = lineage.load(run_store(s3_server, bucket, run))
    assert steps[(0, "train")]["metrics"]["eval"]["eval/rewards/accuracies"] == 0.625


def test_an_iteration_is_one_lineage_write_and_its_generation_record_rides_on_the_training_job(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        s3_secret: str, assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """Simulated pods. The generation record goes to S3 with its iteration's training record, in one write;
    meanwhile the training Job carries it, and `spinctl lineage` shows it from there."""
    port = free_port()
    controllers.start(f"--metrics-bind=127.0.0.1:{port}")
    created = create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=2, suspend=True,
                                                  **SIMULATED))
    write_outputs(s3_server, bucket, created, iterations=2)
    unsuspend(api, namespace, "demo")
    run = controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert metric(port, "spin_controller_s3_requests_total", operation="PutObject") == 2  # one per iteration
    store = run_store(s3_server, bucket, run)
    steps = lineage.load(store)
    assert sorted(steps) == [(t, role) for t in (0, 1) for role in ("generate", "train")]
    for t in (0, 1):
        train = client.BatchV1Api(api).read_namespaced_job(f"demo-i{t}-train", namespace)
        carried = planner.carried_generation(train.metadata.annotations)
        assert carried == {k: v for k, v in steps[(t, "generate")].items() if k != "recorded"}
        assert carried["job"] == f"demo-i{t}-gen" and len(carried["shards"]) == 2
    # As the manifest was while iteration 1 trained: spinctl shows iteration 1's generation from its Job.
    body = manifest(store)
    del body["iterations"]["1"]
    assert store.put(lineage.MANIFEST_KEY, json.dumps(body).encode(), etag=lineage.read(store).etag)
    shown = CliRunner().invoke(main, ["lineage", "demo", "-o", "json", "--kubeconfig", str(cluster.kubeconfig),
                                      "-n", namespace], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    iterations = json.loads(shown.output)["iterations"]
    assert sorted(iterations["1"]) == ["generate"] and iterations["1"]["generate"]["job"] == "demo-i1-gen"
    assert iterations["0"] == body["iterations"]["0"]


def test_kubectl_shows_iteration_phase_and_age(cluster: Cluster, reference: FinishedRun) -> None:
    out = subprocess.run([str(tools.kube_binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "-n",
                          reference.namespace, "get", "spin"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ITERATION", "ITERATIONS", "PHASE", "AGE"]
    assert lines[1].split()[:4] == ["demo", "1", "2", "Succeeded"]


@pytest.mark.parametrize("broken", ["model", "dataset"])
def test_an_input_error_fails_at_once_with_the_workers_own_words(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, tmp_path: Path, broken: str) -> None:
    """A model URI with nothing under it, or a dataset without a usable row: the worker exits with the reserved
    code, the Job's podFailurePolicy fails it without a retry (restartLimit would allow two), and the run's
    Failed condition carries the worker's reason instead of the Job controller's."""
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text("not json\n{}\n[1, 2]\n")
    spec: dict[str, Any] = ({"model": f"s3://{bucket}/nowhere/model"} if broken == "model"
                            else {"dataset": f"file://{bad_rows}"})
    expected = (f"nothing under s3://{bucket}/nowhere/model" if broken == "model"
                else f"file://{bad_rows}: no usable rows in 3 records")
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, restartLimit=2,
                                        generation={"shards": 1, "gpusPerShard": 0, "maxTokens": 12,
                                                    "engine": "transformers"}, **spec))

    def ended() -> dict[str, Any] | None:  # wait_phase would fail at once on the Failed phase this test expects
        run = get_run(api, namespace, "demo")
        return run if (run.get("status") or {}).get("phase") == "Failed" else None

    run = controllers.wait("the run to fail", ended, 300)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "GenerationFailed"
    assert failed["message"].startswith(f"demo-i0-gen failed after 1 attempt(s): {expected}"), failed["message"]
    assert "(exit code 3, an input error: not retried)" in failed["message"]
    assert "MaxFailedIndexesExceeded" not in failed["message"]
    (pod,) = pods(api, namespace, "demo-i0-gen")  # one pod: the Job did not retry it
    (status,) = pod.status.container_statuses
    assert (pod.status.phase, status.state.terminated.exit_code) == ("Failed", 3)
    assert status.state.terminated.message.startswith(expected)  # the worker's termination-log line
    job = client.BatchV1Api(api).read_namespaced_job("demo-i0-gen", namespace)
    assert [c.reason for c in job.status.conditions if c.type == "Failed"] == ["PodFailurePolicy"]
    assert job_names(api, namespace, "demo") == ["demo-i0-gen"]


def test_a_missing_credentials_secret_is_named_in_the_status(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, assets: tiny.TinyAssets,
        s3_server: S3Server, bucket: str) -> None:
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, storage={
        "uri": f"s3://{bucket}/spin", "credentialsSecret": "no-such-secret", "endpoint": s3_server.endpoint}))
    expected = f'Secret "no-such-secret" not found in namespace "{namespace}" (spec.storage.credentialsSecret)'

    def progressing() -> dict[str, Any] | None:
        status = get_run(api, namespace, "demo").get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == "Progressing"
                     and c["reason"] == "CredentialsUnavailable"), None)

    condition = controllers.wait("the run to say which Secret is missing", progressing, 60)
    assert condition["message"] == expected
    run = get_run(api, namespace, "demo")
    assert run["status"]["phase"] == "Pending"
    storage = next(c for c in run["status"]["conditions"] if c["type"] == "StorageAvailable")
    assert (storage["status"], storage["message"]) == ("False", expected)
    assert job_names(api, namespace, "demo") == []
