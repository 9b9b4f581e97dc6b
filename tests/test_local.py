"""The local executor on real processes: the real workers on the tiny model, real DeepSpeed ranks, lineage in a
local store; interrupted and resumed; and step for step the same run as the controller's on the real cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import psutil
import pytest
from kubernetes import client
from test_controller import (  # fixtures are found by name in this module
    Controllers,
    assets,
    controllers,
    crd,
    get_run,
    normalized,
    run_lineage,
    s3_secret,
    spin_run,
    wait_phase,
)

from spin_k8s import lineage, local, naming, storage
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

__all__ = ["assets", "controllers", "crd", "s3_secret"]  # imported for pytest, which finds fixtures by name

STEPS = [(0, naming.GENERATE), (0, naming.TRAIN), (1, naming.GENERATE), (1, naming.TRAIN)]


def local_spin_run(assets: tiny.TinyAssets, **spec: Any) -> dict[str, Any]:
    """test_controller's SpinRun, unchanged but for storage: left out, so the executor's default applies."""
    obj = spin_run("demo", assets, cast(S3Server, types.SimpleNamespace(endpoint=None)), "unused", **spec)
    del obj["spec"]["storage"]
    return obj


@dataclass(frozen=True)
class LocalRun:
    result: local.Result
    workdir: Path
    events: list[str]


@pytest.fixture(scope="module")
def two_iterations(assets: tiny.TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    """One uninterrupted 2-iteration local run, shared by the test of its lineage and the equivalence test."""
    workdir = tmp_path_factory.mktemp("local")
    events: list[str] = []
    began = time.monotonic()
    result = local.run(local_spin_run(assets), workdir, on_event=events.append)
    print(f"2-iteration local run: {time.monotonic() - began:.0f} s")
    return LocalRun(result, workdir, events)


def local_path(uri: str) -> Path:
    return Path(storage.parse(uri).key)


def test_two_iterations_run_locally_with_lineage(two_iterations: LocalRun, assets: tiny.TinyAssets) -> None:
    result, workdir, events = two_iterations.result, two_iterations.workdir, two_iterations.events
    assert (result.phase, result.reason) == ("Succeeded", "Completed"), result
    assert result.prefix.startswith(f"file://{workdir.resolve()}/store/default/demo/")
    assert result.manifest == naming.manifest_uri(result.prefix) and local_path(result.manifest).is_file()

    steps = lineage.load(lineage.open_store(result.prefix))
    assert sorted(steps) == STEPS
    for t in (0, 1):
        shards = steps[(t, naming.GENERATE)]["shards"]
        assert len(shards) == 2
        for shard in shards:  # the recorded digest is the digest of the stored shard
            assert shard["sha256"] == storage.sha256_file(local_path(shard["uri"]))
        train = steps[(t, naming.TRAIN)]
        assert len(train["checkpointDigest"]) == 64 and train["job"] == f"demo-i{t}-train"
        assert train["metrics"]["world_size"] == 2  # nproc=2 real DeepSpeed ranks on one local node
    assert steps[(0, naming.TRAIN)]["checkpointDigest"] != steps[(1, naming.TRAIN)]["checkpointDigest"]
    assert steps[(1, naming.GENERATE)]["model"] == steps[(0, naming.TRAIN)]["checkpoint"] == f"{result.prefix}/i0/model"
    assert steps[(1, naming.TRAIN)]["dataMix"] == [f"{result.prefix}/i0/synthetic", f"{result.prefix}/i1/synthetic"]
    assert (local_path(result.prefix) / "i1" / "model" / "model.safetensors").is_file()

    # The status the controller writes, from the same planner: phase, conditions, per-iteration summary.
    status = result.status
    assert set(status) == {"observedGeneration", "phase", "iteration", "reason", "manifest", "conditions",
                           "iterations"}
    assert (status["iteration"], status["manifest"]) == (1, result.manifest)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Progressing": "False", "Succeeded": "True", "Failed": "False", "Suspended": "False",
        "StorageAvailable": "True"}
    assert [(i["generateJob"], i["trainJob"], i["restarts"]) for i in status["iterations"]] == [
        ("demo-i0-gen", "demo-i0-train", 0), ("demo-i1-gen", "demo-i1-train", 0)]
    assert all("loss" in i["metrics"] and i["checkpoint"].endswith("/model") for i in status["iterations"])
    assert local.status(workdir, "demo") == result and local.status(workdir, "other") is None

    # Live progress: one line per state change, worker steps included, logs per process.
    assert any(e.startswith("demo-i0-train[0] step 1: loss") for e in events)
    assert sum(e.startswith("recorded iteration") for e in events) == 4
    assert events[-1] == "Succeeded: 2 iteration(s) trained"
    logs = sorted(p.name for p in (workdir / "logs").iterdir())
    assert logs == ["demo-i0-gen-0.log", "demo-i0-gen-1.log", "demo-i0-train-0.log",
                    "demo-i1-gen-0.log", "demo-i1-gen-1.log", "demo-i1-train-0.log"]

    # A finished run run again: nothing is started, nothing recorded twice.
    again: list[str] = []
    assert local.run(local_spin_run(assets), workdir, on_event=again.append).phase == "Succeeded"
    assert not [e for e in again if "created" in e or "recorded" in e], again


# -- interrupted and resumed -------------------------------------------------------------------------------------
CHILD = """
import json, sys
from pathlib import Path
from spin_k8s import local
try:
    local.run(json.loads(sys.argv[1]), Path(sys.argv[2]), on_event=lambda line: print(line, flush=True),
              nproc=int(sys.argv[3]))
except KeyboardInterrupt:
    sys.exit(130)
"""


class Child:
    """local.run() in a child process; its events read line by line."""

    def __init__(self, obj: dict[str, Any], workdir: Path, nproc: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(obj), str(workdir), str(nproc)],
                                     stdout=subprocess.PIPE, stderr=(workdir / "child.err").open("w"), text=True)
        self.seen: list[str] = []

    def wait_for(self, wanted: Callable[[str], bool]) -> str:
        stdout = cast(IO[str], self.proc.stdout)
        for line in stdout:
            self.seen.append(line.rstrip("\n"))
            if wanted(self.seen[-1]):
                return self.seen[-1]
        raise AssertionError(f"the run ended (exit {self.proc.wait()}) without the expected event: {self.seen}")

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def child_runs() -> Iterator[list[Child]]:
    children: list[Child] = []
    yield children
    for c in children:  # a failed test must not leave a run behind
        if c.proc.poll() is None:
            for p in [*c.processes(), psutil.Process(c.proc.pid)]:
                p.kill()


def test_node_crash_restarts_the_gang_and_ctrl_c_resumes_without_redoing_steps(
        tmp_path: Path, child_runs: list[Child]) -> None:
    assets = tiny.create(tmp_path / "tiny", rows=16, seed=0)
    obj = local_spin_run(assets, iterations=1, restartLimit=1)
    # Two nodes of one rank each: a real two-node gang on loopback. 24 steps: room to act mid-training.
    obj["spec"]["training"].update(nodes=2, epochs=12, checkpointEverySteps=2)
    workdir = tmp_path / "work"
    workdir.mkdir()
    child = Child(obj, workdir, nproc=1)
    child_runs.append(child)

    # Node 1 of the gang dies after a checkpoint: the Job fails, node 0 is stopped, the planner starts r1.
    child.wait_for(lambda e: e.startswith("demo-i0-train[0] checkpoint after step"))
    (node1,) = [p for p in child.processes() if "torch.distributed.run" in p.cmdline() and "--node-rank=1" in
                p.cmdline()]
    node1.send_signal(signal.SIGKILL)
    child.wait_for(lambda e: e.startswith("demo-i0-train[1] failed with exit code 137"))
    assert child.wait_for(lambda e: e.startswith("demo-i0-train ")) == "demo-i0-train failed: BackoffLimitExceeded"

    # Ctrl-C while the restarted gang starts: every process of the run stops, none survives.
    child.wait_for(lambda e: e.startswith("demo-i0-train-r1[0] started"))
    running = child.processes()
    assert any("spin_k8s.workers.train" in " ".join(p.cmdline()) for p in running), running
    child.proc.send_signal(signal.SIGINT)
    assert child.proc.wait(60) == 130
    assert not [p for p in running if alive(p)]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or [])]

    saved = json.loads(local.run_file(workdir, "demo").read_text())
    prefix = naming.run_prefix(saved["object"]["spec"]["storage"]["uri"], "default", "demo",
                               saved["object"]["metadata"]["uid"])
    shards = sorted((local_path(prefix) / "i0" / "synthetic").iterdir())
    before = {p: (p.stat().st_mtime_ns, storage.sha256_file(p)) for p in shards}
    assert len(before) == 4  # two shards and their done records
    assert sorted(lineage.load(lineage.open_store(prefix))) == [(0, naming.GENERATE)]

    # The same call again resumes: generation is not rerun, r1 goes on from the checkpoint, as r1.
    events: list[str] = []
    result = local.run(obj, workdir, on_event=events.append, nproc=1)
    assert result.phase == "Succeeded", (result, events)
    assert result.prefix == prefix
    assert {p: (p.stat().st_mtime_ns, storage.sha256_file(p)) for p in shards} == before
    assert not [e for e in events if "-gen" in e], events
    assert [j["body"]["metadata"]["name"] for j in json.loads(local.run_file(workdir, "demo").read_text())["jobs"]] \
        == ["demo-i0-gen", "demo-i0-train", "demo-i0-train-r1"]
    steps = lineage.load(lineage.open_store(prefix))
    assert sorted(steps) == [(0, naming.GENERATE), (0, naming.TRAIN)]
    assert sorted(p.name for p in (local_path(prefix) / "steps").iterdir()) == ["i0-generate.json", "i0-train.json"]
    assert (steps[(0, naming.TRAIN)]["job"], steps[(0, naming.TRAIN)]["restarts"]) == ("demo-i0-train-r1", 1)
    assert result.status["iterations"][0]["restarts"] == 1
    assert steps[(0, naming.TRAIN)]["metrics"]["world_size"] == 2  # nodes x nproc
    resumed = (workdir / "logs" / "demo-i0-train-r1-0.log").read_text().split("--- ")[-1]  # the last start
    assert '"event":"resume"' in resumed and '"event":"saved"' in resumed
    assert any(e.startswith("demo-i0-train-r1[0] resumed from checkpoint") for e in events)


# -- the same spec, run by the controller and by the local executor ------------------------------------------------
def _recorded_order(steps: dict[tuple[int, str], dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted(steps, key=lambda k: (steps[k]["recorded"], k[0], naming.ROLES.index(k[1])))


@pytest.mark.cluster
@pytest.mark.s3
def test_local_executor_and_controller_run_the_same_steps(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, two_iterations: LocalRun) -> None:
    controllers.start()
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "selfplay.dev", "v1alpha1", namespace, "spinruns", spin_run("demo", assets, s3_server, bucket))
    cluster_run = wait_phase(api, namespace, "demo", "Succeeded")
    cluster_prefix = f"s3://{bucket}/spin/{namespace}/demo/{created['metadata']['uid']}"
    cluster_store = run_lineage(s3_server, bucket, namespace, cluster_run)
    cluster_steps = lineage.load(cluster_store)
    ours = two_iterations.result
    local_steps = lineage.load(lineage.open_store(ours.prefix))

    # The same steps, in the same order, by Jobs of the same names.
    assert _recorded_order(cluster_steps) == _recorded_order(local_steps) == STEPS
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace).items
    cluster_jobs = [j.metadata.name for j in sorted(jobs, key=lambda j: j.metadata.creation_timestamp)]
    saved = json.loads(local.run_file(two_iterations.workdir, "demo").read_text())
    assert cluster_jobs == [j["body"]["metadata"]["name"] for j in saved["jobs"]]

    # The same records, field for field, but for what legitimately differs:
    # - times, uids and the storage prefix (normalized away);
    # - the training world size: a CPU pod runs one rank, a local node `nproc` (2) ranks. So the global batch,
    #   the number of steps and the trained weights differ, and with them everything downstream of iteration 0's
    #   training: its checkpointDigest, iteration 1's opponent (modelDigest) and samples (shard sha256), and all
    #   metric values. Iteration 0's generation depends on nothing of that: same model files, same seeds (run
    #   name, iteration, shard), same engine, hence the same shard digests.
    # - metrics.settings.cache_dir: a pod's default cache versus the executor's {workdir}/cache.
    theirs_n = {k: normalized(v, cluster_prefix) for k, v in cluster_steps.items()}
    ours_n = {k: normalized(v, ours.prefix) for k, v in local_steps.items()}
    for key in STEPS:
        theirs, mine = theirs_n[key], ours_n[key]
        assert theirs.keys() == mine.keys(), key
        same = {"iteration", "role", "job", "attempt", "restarts", "model", "dataset", "output", "checkpoint",
                "dataMix", "config"}
        assert {k: theirs[k] for k in same & theirs.keys()} == {k: mine[k] for k in same & mine.keys()}, key
        if key[1] == naming.GENERATE:
            stable = ["uri", "rows", "engine"] + (["sha256", "modelDigest"] if key[0] == 0 else [])
            assert [{f: s[f] for f in stable} for s in theirs["shards"]] == \
                [{f: s[f] for f in stable} for s in mine["shards"]]
        else:
            assert theirs["metrics"].keys() == mine["metrics"].keys()
            assert (theirs["metrics"]["world_size"], mine["metrics"]["world_size"]) == (1, 2)
            theirs_settings = {k: v for k, v in theirs["metrics"]["settings"].items() if k != "cache_dir"}
            assert theirs_settings == {k: v for k, v in mine["metrics"]["settings"].items() if k != "cache_dir"}
    assert ours_n[(0, naming.GENERATE)]["shards"] == theirs_n[(0, naming.GENERATE)]["shards"]

    # The same manifest and status shapes.
    manifests = [json.loads(cluster_store.get(lineage.MANIFEST_KEY)[0]),  # type: ignore[index]
                 json.loads(local_path(ours.manifest).read_text())]
    assert manifests[0].keys() == manifests[1].keys()
    for m in manifests:  # storage and the (free) rendezvous port are the only spec fields the two runs set apart
        del m["spec"]["storage"], m["spec"]["training"]["port"]
    assert manifests[0]["spec"] == manifests[1]["spec"]
    status = get_run(api, namespace, "demo")["status"]
    assert status.keys() == ours.status.keys() and status["phase"] == ours.phase
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == \
        [(c["type"], c["status"], c["reason"]) for c in ours.status["conditions"]]
    assert [(i.keys(), i["generateJob"], i["trainJob"], i["metrics"].keys()) for i in status["iterations"]] == \
        [(i.keys(), i["generateJob"], i["trainJob"], i["metrics"].keys()) for i in ours.status["iterations"]]
