"""What the cluster tests share: the tiny SpinRun they run, controller processes, waits that fail at once when a
server they depend on exits, lineage read back from S3 and compared field by field, and simulated pods.

Every wait here watches the processes it depends on (the control plane, the node agent, the S3 server, the
controllers a test started and did not kill on purpose): when one exits, the wait fails at once with the last
lines of its log instead of running into its timeout.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from spin_k8s import api as spin_api
from spin_k8s import lineage, naming
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import Process, free_port, start_process, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import data, tiny

T = TypeVar("T")
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL
CRDS = [Path(__file__).parent.parent / "manifests" / "crd" / f"{name}.selfplay.dev.yaml"
        for name in (spin_api.PLURAL, spin_api.RUNTIME_PLURAL)]
STEPS = [(0, naming.GENERATE), (0, naming.TRAIN), (1, naming.GENERATE), (1, naming.TRAIN)]


def spin_run(name: str, assets: tiny.TinyAssets, s3_server: S3Server | None, bucket: str,
             **spec: Any) -> dict[str, Any]:
    """The tiny 2-iteration SpinRun every cluster test runs (``spec`` keys replace the defaults). The
    transformers engine: vLLM is under test in the worker tests and in the chart's run, not here."""
    body: dict[str, Any] = {
        "apiVersion": spin_api.API_VERSION, "kind": spin_api.KIND, "metadata": {"name": name},
        "spec": {
            "model": f"file://{assets.model_dir}", "dataset": f"file://{assets.data_path}", "iterations": 2,
            "generation": {"shards": 2, "gpusPerShard": 0, "maxTokens": 12, "engine": "transformers"},
            "training": {"nodes": 1, "gpusPerNode": 0, "zeroStage": 0, "precision": "fp32", "optimizer": "adamw",
                         "learningRate": 1e-3, "epochs": 1, "perDeviceBatchSize": 4, "maxLength": 96,
                         "maxPromptLength": 48, "gradientCheckpointing": False, "port": free_port()},
            **spec,
        },
    }
    if s3_server is not None:
        body["spec"].setdefault("storage", {"uri": f"s3://{bucket}/spin", "credentialsSecret": "s3",
                                            "endpoint": s3_server.endpoint})
    return body


def create_s3_secret(api: client.ApiClient, namespace: str, s3_server: S3Server, name: str = "s3") -> str:
    client.CoreV1Api(api).create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    return name


def get_run(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    run: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(G, V, namespace, P, name)
    return run


def create_run(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(G, V, namespace, P, body)
    return created


def jobs_by_name(api: client.ApiClient, namespace: str, run: str) -> dict[str, str]:
    """The run's Jobs: name -> uid."""
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=f"{naming.LABEL_RUN}={run}").items
    return {j.metadata.name: j.metadata.uid for j in jobs}


def job_names(api: client.ApiClient, namespace: str, run: str) -> list[str]:
    return sorted(jobs_by_name(api, namespace, run))


def pods(api: client.ApiClient, namespace: str, job: str) -> list[client.V1Pod]:
    return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def run_store(s3_server: S3Server, bucket: str, run: dict[str, Any]) -> lineage.S3Store:
    meta = run["metadata"]
    return lineage.S3Store(s3_server.client(), bucket, f"spin/{meta['namespace']}/{meta['name']}/{meta['uid']}")


def manifest(store: lineage.Store) -> dict[str, Any]:
    got = store.get(lineage.MANIFEST_KEY)
    assert got is not None, "no lineage manifest"
    value: dict[str, Any] = json.loads(got[0])
    return value


def metric(port: int, name: str, **labels: str) -> int:
    """A controller's counter from its /metrics (``--metrics-bind=127.0.0.1:PORT``), summed over every label
    set that has ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0
    for found, value in re.findall(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in found for k, v in labels.items()):
            total += int(float(value))
    return total


def quota(api: client.ApiClient, controllers: Controllers, name: str, hard: dict[str, str]) -> None:
    """A ResourceQuota, once the quota controller has counted its usage (until then admission refuses with
    "status unknown" instead of "exceeded quota")."""
    core = client.CoreV1Api(api)
    core.create_namespaced_resource_quota(controllers.namespace, {"metadata": {"name": name}, "spec": {"hard": hard}})
    controllers.wait(f"quota {name} to be counted", lambda: (
        core.read_namespaced_resource_quota(name, controllers.namespace).status.used or None), 60)


def progressing(api: client.ApiClient, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    """The run's Progressing condition if its reason is ``reason``."""
    status = get_run(api, namespace, name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Progressing" and c["reason"] == reason),
                None)


def warnings(api: client.ApiClient, namespace: str, reason: str) -> list[client.CoreV1Event]:
    """The events of ``reason`` on SpinRuns in the namespace."""
    return [e for e in client.CoreV1Api(api).list_namespaced_event(namespace).items
            if e.involved_object.kind == spin_api.KIND and e.reason == reason]


def unsuspend(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(G, V, namespace, P, name, {"spec": {"suspend": False}})


def install_crd(api: client.ApiClient) -> None:
    """Create the SpinRun and SpinRuntime CRDs (or find them) and wait until they are Established."""
    ext = client.ApiextensionsV1Api(api)
    for path in CRDS:
        body = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as e:
            if e.status != 409:
                raise
        name = body["metadata"]["name"]
        wait_until(name, functools.partial(_established, ext, name), 30)


def _established(ext: client.ApiextensionsV1Api, name: str) -> bool:
    return any(c.type == "Established" and c.status == "True"
               for c in ext.read_custom_resource_definition(name).status.conditions or [])


def new_namespace(api: client.ApiClient, base: str) -> str:
    """A new namespace with its default ServiceAccount in place (pods are refused before)."""
    core = client.CoreV1Api(api)
    name = f"{re.sub(r'[^a-z0-9-]', '-', base.lower())[:40].strip('-')}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        assert time.monotonic() < deadline, "the default ServiceAccount never appeared"
        time.sleep(0.1)
    return name


@dataclass
class Controllers:
    """Controller processes a test starts (and kills), all stopped at its end. ``watched`` is what every wait
    of this test depends on: the cluster's servers, the S3 server and each controller not killed on purpose."""

    cluster: Cluster
    namespace: str
    logdir: Path
    s3_server: S3Server | None = None
    procs: list[Process] = field(default_factory=list)
    watched: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.watched[:] = list(self.cluster.processes)
        if self.s3_server is not None and self.s3_server.process is not None:
            self.watched.append(self.s3_server.process)

    def start(self, *extra: str) -> Process:
        """A controller watching the test's namespace; it may reach the S3 server (its endpoint is allowed)."""
        allowed = [f"--allowed-endpoint={self.s3_server.endpoint}"] if self.s3_server is not None else []
        proc = start_process(f"controller-{len(self.procs)}", [
            sys.executable, "-m", "spin_k8s.controller", f"--kubeconfig={self.cluster.kubeconfig}",
            f"--namespace={self.namespace}", f"--lease-namespace={self.namespace}", "--resync-seconds=5",
            "--storage-check-seconds=5", *allowed,
            *extra,
        ], self.logdir)
        self.procs.append(proc)
        self.watched.append(proc)
        return proc

    def use_s3(self, server: S3Server) -> None:
        """The test's own S3 server instead of the session's: controllers started from now on may reach it
        (and only it), and every wait fails fast if it dies."""
        assert server.process is not None
        self.s3_server = server
        self.watched.append(server.process)

    def unwatch(self, proc: Process) -> None:
        """``proc`` is about to exit on purpose (a kill, a stopped S3 server): waits no longer fail on it."""
        if proc in self.watched:
            self.watched.remove(proc)

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> None:
        self.unwatch(proc)
        proc.popen.send_signal(sig)
        proc.popen.wait(30)

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait(10)

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = 600) -> T:
        return wait_until(what, check, timeout, self.watched)

    def wait_phase(self, api: client.ApiClient, name: str, phase: str, timeout: float = 600,
                   while_waiting: Callable[[], None] | None = None) -> dict[str, Any]:
        """Wait for the run to reach ``phase``; a run that fails instead fails the wait at once."""
        def reached() -> dict[str, Any] | None:
            if while_waiting:
                while_waiting()
            run = get_run(api, self.namespace, name)
            now = (run.get("status") or {}).get("phase")
            assert now == phase or now != "Failed", run["status"]
            return run if now == phase else None

        return self.wait(f"{name} to reach {phase}", reached, timeout)


def pod_log(cluster: Cluster, namespace: str, pod: str, container: str) -> str:
    try:
        return cluster.pod_log(namespace, pod, container)
    except ValueError:  # not started yet: no log file
        return ""


def kill_pod_processes(cluster: Cluster, namespace: str, pod: str) -> bool:
    """Kill -9 every process of a pod, as a crashed node or OOM kill would; True if there were any."""
    (pod_dir,) = (cluster.node_root / "pods").glob(f"{namespace}_{pod}_*")
    killed = False
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == str(pod_dir.resolve()):
                proc.kill()
                killed = True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return killed


def completion_index(pod: client.V1Pod) -> str:
    return str(pod.metadata.annotations.get("batch.kubernetes.io/job-completion-index"))


def kill_when_running(controllers: Controllers, api: client.ApiClient, job: str, index: str,
                      ready: Callable[[client.V1Pod], bool] = lambda _: True, timeout: float = 300) -> str:
    """Wait for the pod of ``job`` at completion ``index`` to be running (and ``ready``), then kill it."""
    ns = controllers.namespace

    def target() -> str | None:
        for p in pods(api, ns, job):
            if (completion_index(p) == index and p.status.phase == "Running" and ready(p)
                    and kill_pod_processes(controllers.cluster, ns, p.metadata.name)):
                return str(p.metadata.name)
        return None

    return controllers.wait(f"a running pod {index} of {job} to kill", target, timeout)


# -- lineage compared field by field -------------------------------------------------------------------------
# What differs between two runs of one spec by design: wall-clock times and throughput (when, and how fast,
# a step ran on a shared machine), the Jobs' uids (each run creates its own Jobs), the storage prefix (it holds
# the run's namespace and uid) and where a worker kept its local cache (a pod's own temporary directory).
VOLATILE = frozenset({"started", "finished", "recorded", "startTime", "completionTime", "jobUid", "tokens/s",
                      "seconds", "created", "updated", "cache_dir"})


def normalized(value: Any, prefix: str) -> Any:
    """A lineage value without what legitimately differs between two runs of one spec (VOLATILE), with the
    run's storage prefix replaced by ``<prefix>``."""
    if isinstance(value, dict):
        return {k: normalized(v, prefix) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalized(v, prefix) for v in value]
    return value.replace(prefix, "<prefix>") if isinstance(value, str) else value


def steps_normalized(steps: dict[tuple[int, str], dict[str, Any]], prefix: str) -> dict[str, Any]:
    return {f"{t}/{r}": normalized(v, prefix) for (t, r), v in sorted(steps.items())}


def assert_job_uids_are_the_jobs(steps: dict[tuple[int, str], dict[str, Any]], jobs: dict[str, str]) -> None:
    """Each recorded step names the Job that ran it, and that Job was never recreated: the uid in lineage is
    the uid of the one Job of that name that exists now."""
    for key, record in steps.items():
        assert record["job"] in jobs, (key, record["job"], jobs)
        assert record["jobUid"] == jobs[record["job"]], (key, "recorded uid is not the Job's: it was recreated")


# -- simulated pods --------------------------------------------------------------------------------------------
# Spec fields for pods that run nothing: the node agent ends each at once with exit code 0. For tests of
# orchestration only; with :func:`write_outputs` a Complete Job finds what its workers would have left.
SIMULATED = {"podAnnotations": {"nodeagent.selfplay.dev/exit-code": "0"}}


def write_outputs(s3_server: S3Server, bucket: str, run: dict[str, Any], iterations: int,
                  held_out_accuracy: float | None = None) -> None:
    """What the real workers of every step would leave in storage: shard done records and training metrics."""
    store = run_store(s3_server, bucket, run)
    s3 = s3_server.client()
    shards = run["spec"]["generation"]["shards"]
    for t in range(iterations):
        for s in range(shards):
            record = data.ShardRecord(shard=s, num_shards=shards, rows=1, sha256=f"{t}{s}".ljust(64, "0"),
                                      engine="simulated", engine_version="0", sampling={}, model="simulated",
                                      model_digest="0" * 64, scored=False, max_prompt_length=0, max_length=0,
                                      data="simulated")
            s3.put_object(Bucket=bucket, Key=f"{store.prefix}/i{t}/synthetic/{data.done_name(s, shards)}",
                          Body=record.to_json())
        metrics: dict[str, Any] = {"loss": 0.69, "rewards/accuracies": 0.5, "checkpoint_sha256": f"{t}".ljust(64, "0")}
        if held_out_accuracy is not None:
            metrics["eval"] = {"eval/rewards/accuracies": held_out_accuracy, "eval/pairs": 8.0}
        s3.put_object(Bucket=bucket, Key=f"{store.prefix}/i{t}/model/metrics.json", Body=json.dumps(metrics))


def reference_spec(name: str, assets: tiny.TinyAssets, s3_server: S3Server | None, bucket: str) -> dict[str, Any]:
    """The reference run's SpinRun: the tiny run, its second iteration at a lower learning rate (so lineage
    has a setting that differs between iterations). Tests that compare their lineage with the reference's
    run exactly this."""
    return spin_run(name, assets, s3_server, bucket, iterationOverrides=[{"iteration": 1, "learningRate": 5e-4}])


@dataclass(frozen=True)
class FinishedRun:
    """A run that finished on the cluster, and everything a test inspects of it."""

    namespace: str
    name: str
    bucket: str
    run: dict[str, Any]  # the SpinRun as it ended
    output: str  # what `spinctl start --wait` printed
    exit_code: int
    steps: dict[tuple[int, str], dict[str, Any]]  # its lineage
    manifest: dict[str, Any]  # its lineage manifest
    jobs: dict[str, str]  # its Jobs, name -> uid

    @property
    def prefix(self) -> str:
        meta = self.run["metadata"]
        return f"s3://{self.bucket}/spin/{meta['namespace']}/{meta['name']}/{meta['uid']}"


def spinctl_until_exit(controllers: Controllers, *args: str, timeout: float = 900) -> tuple[int, str]:
    """Run ``spinctl ARGS --kubeconfig ... -n NS`` (a command that waits, such as ``start --wait``) as a
    process, watched like any other wait: its exit code and output."""
    out = controllers.logdir / f"spinctl-{len(list(controllers.logdir.glob('spinctl-*')))}.out"
    with out.open("w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "spinctl"), *args, "--kubeconfig",
                                 str(controllers.cluster.kubeconfig), "-n", controllers.namespace],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            controllers.wait(f"spinctl {' '.join(args[:2])}", lambda: proc.poll() is not None, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, out.read_text()
