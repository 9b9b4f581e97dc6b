"""The local executor on real processes: the real workers on the tiny model, real DeepSpeed ranks, lineage in a
local store; interrupted and resumed; and step for step the same run as the controller's on the real cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import psutil
import pytest
from kubernetes import client
from support import STEPS, FinishedRun, get_run, normalized, reference_spec, steps_normalized

from spin_k8s import lineage, local, naming, storage
from spin_k8s.workers import tiny


def local_spin_run(assets: tiny.TinyAssets, **spec: Any) -> dict[str, Any]:
    """The reference run's SpinRun, unchanged but for storage: left out, so the executor's default applies."""
    obj = reference_spec("demo", assets, None, "")
    obj["spec"].update(spec)
    return obj


@dataclass(frozen=True)
class LocalRun:
    result: local.Result
    workdir: Path
    events: list[str]


@pytest.fixture(scope="module")
def two_iterations(assets: tiny.TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    """One uninterrupted 2-iteration local run of the reference spec, one rank per node as a CPU pod runs,
    shared by the test of its lineage and the comparison with the controller's reference run."""
    workdir = tmp_path_factory.mktemp("local")
    events: list[str] = []
    began = time.monotonic()
    result = local.run(local_spin_run(assets), workdir, on_event=events.append, nproc=1)
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
        assert train["metrics"]["world_size"] == 1  # nproc=1: one DeepSpeed rank, as in a CPU pod
    assert steps[(0, naming.TRAIN)]["checkpointDigest"] != steps[(1, naming.TRAIN)]["checkpointDigest"]
    assert steps[(1, naming.GENERATE)]["model"] == steps[(0, naming.TRAIN)]["checkpoint"] == f"{result.prefix}/i0/model"
    assert steps[(1, naming.TRAIN)]["dataMix"] == [f"{result.prefix}/i0/synthetic", f"{result.prefix}/i1/synthetic"]
    assert (local_path(result.prefix) / "i1" / "model" / "model.safetensors").is_file()

    # The status the controller writes, from the same planner: phase, conditions, per-iteration summary.
    status = result.status
    assert set(status) == {"observedGeneration", "phase", "iteration", "reason", "manifest", "conditions",
                           "iterations", "restarts"}
    assert (status["iteration"], status["manifest"]) == (1, result.manifest)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Progressing": "False", "Succeeded": "True", "Failed": "False", "Suspended": "False", "Queued": "False",
        "StorageAvailable": "True"}
    assert [(i["generateJob"], i["trainJob"], i["restarts"], i["generateAttempts"], i["trainAttempts"])
            for i in status["iterations"]] == [("demo-i0-gen", "demo-i0-train", 0, 1, 1),
                                               ("demo-i1-gen", "demo-i1-train", 0, 1, 1)]
    assert status["restarts"] == 0
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
    assert local.run(local_spin_run(assets), workdir, on_event=again.append, nproc=1).phase == "Succeeded"
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
    obj = local_spin_run(assets, iterations=1, restartLimit=1, iterationOverrides=[])
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
def test_local_executor_and_controller_give_the_same_lineage_bit_for_bit(
        api: client.ApiClient, reference: FinishedRun, two_iterations: LocalRun) -> None:
    """The reference run (controller, real Jobs, S3) and the local run of the same spec with the same rank count
    record the same steps in the same order, by Jobs of the same names, with equal digests of every shard,
    model and checkpoint and equal metrics: only times, uids, the storage prefix and cache dirs differ."""
    ours = two_iterations.result
    local_steps = lineage.load(lineage.open_store(ours.prefix))
    assert _recorded_order(reference.steps) == _recorded_order(local_steps) == STEPS
    created = sorted(reference.jobs, key=lambda name: STEPS.index(
        (int(name.split("-i")[1][0]), naming.GENERATE if name.endswith("-gen") else naming.TRAIN)))
    saved = json.loads(local.run_file(two_iterations.workdir, "demo").read_text())
    assert created == [j["body"]["metadata"]["name"] for j in saved["jobs"]]

    assert steps_normalized(local_steps, ours.prefix) == steps_normalized(reference.steps, reference.prefix)

    # The same manifest and status. The spec differs in storage and the (free) rendezvous port only.
    local_manifest = json.loads(lineage.open_store(ours.prefix).get(lineage.MANIFEST_KEY)[0])  # type: ignore[index]
    manifests = [local_manifest, json.loads(json.dumps(reference.manifest))]
    assert manifests[0].keys() == manifests[1].keys() == {"run", "spec", "codeVersion", "created", "updated",
                                                          "iterations"}
    for m in manifests:
        del m["spec"]["storage"], m["spec"]["training"]["port"]
    assert manifests[0]["spec"] == manifests[1]["spec"]
    status = get_run(api, reference.namespace, "demo")["status"]
    assert normalized(status["iterations"], reference.prefix) == normalized(ours.status["iterations"], ours.prefix)
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == \
        [(c["type"], c["status"], c["reason"]) for c in ours.status["conditions"]]
