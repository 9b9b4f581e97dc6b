"""spinctl's commands against a fake cluster (the client calls they make, answered from memory): wait and
start --wait (exit codes 0, 1 and 130), cancel and resume of finished runs, logs (never vs not yet, the failed
pod of a failed run, the readable view), lineage --diff, list's kubectl output formats, the preflight's
refusal before anything is created, and one numbering of iterations in spinctl and kubectl's columns."""

from __future__ import annotations

import copy
import datetime
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from kubernetes.client.rest import ApiException

from spin_k8s import api, naming
from spin_k8s.cli import main, session

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def make_run(phase: str = "Training", iteration: int = 1, reason: str = "", message: str = "",
             storage: str = "s3://runs/spin") -> dict[str, Any]:
    """The reference's shape: 2 iterations, 2 generation shards, 1 training node."""
    conditions = [{"type": t, "status": "True" if t == {"Succeeded": "Succeeded", "Failed": "Failed"}.get(
        phase, "Progressing") else "False", "reason": reason, "message": message}
        for t in ("Progressing", "Succeeded", "Failed")]
    return api.load_defaulted({
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": [{"manager": "spinctl"}]},
        "spec": {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 2,
                 "storage": {"uri": storage}, "generation": {"shards": 2}},
        "status": {"observedGeneration": 1, "phase": phase, "iteration": iteration, "reason": reason,
                   "manifest": "s3://runs/spin/ns/demo/u1/manifest.json", "conditions": conditions}})


def job(name: str, iteration: int, role: str, state: str, attempt: int = 0) -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, creation_timestamp=T0, labels=naming.labels("demo", "u1", iteration,
                                                                                         role, attempt)),
        spec=SimpleNamespace(suspend=False, completions=2),
        status=SimpleNamespace(conditions=[SimpleNamespace(type=state, status="True")] if state else [],
                               succeeded=0, failed=1, active=0))


def pod(name: str, job_name: str, iteration: int, role: str, index: int, phase: str, minute: int = 0) -> Any:
    labels = {**naming.labels("demo", "u1", iteration, role), "batch.kubernetes.io/job-name": job_name}
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels=labels, creation_timestamp=T0 + datetime.timedelta(minutes=minute),
                                 annotations={"batch.kubernetes.io/job-completion-index": str(index)}),
        status=SimpleNamespace(phase=phase))


class FakeCluster:
    """Answers the client calls spinctl makes (objects, batch and core are all this object)."""

    def __init__(self, runs: list[dict[str, Any]], jobs: tuple[Any, ...] = (), pods: tuple[Any, ...] = (),
                 logs: dict[str, str] | None = None, secrets: dict[str, dict[str, str]] | None = None,
                 runtimes: dict[str, dict[str, Any]] | None = None) -> None:
        self.runs = runs  # successive answers to a get; the last one stays
        self.jobs, self.pods, self.logs, self.secrets = jobs, pods, logs or {}, secrets or {}
        self.runtimes = runtimes or {}  # SpinRuntimes by name
        self.namespace = self.namespace_flag = "ns"
        self.patches: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.objects = self.batch = self.core = self

    def get_namespaced_custom_object(self, *args: str) -> dict[str, Any]:
        if not self.runs:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.runs.pop(0) if len(self.runs) > 1 else self.runs[0])

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kwargs: Any) -> dict[str, Any]:
        assert plural == api.RUNTIME_PLURAL
        if name not in self.runtimes:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.runtimes[name])

    def list_namespaced_custom_object(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        return {"items": [copy.deepcopy(self.runs[-1])]}

    def patch_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str,
                                       body: dict[str, Any]) -> None:
        self.patches.append(body)

    def create_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, body: dict[str, Any],
                                        **kwargs: Any) -> dict[str, Any]:
        assert kwargs == {"field_validation": "Strict"}
        self.created.append(body)
        run = make_run("Pending", 0)
        self.runs.insert(0, run)
        return run

    def list_namespaced_job(self, ns: str, label_selector: str) -> Any:
        return SimpleNamespace(items=list(self.jobs))

    def list_namespaced_pod(self, ns: str, label_selector: str) -> Any:
        wanted = dict(term.split("=") for term in label_selector.split(","))
        return SimpleNamespace(items=[p for p in self.pods if wanted.items() <= p.metadata.labels.items()])

    def read_namespaced_pod_log(self, name: str, ns: str, container: str, tail_lines: int | None = None,
                                follow: bool = False, _preload_content: bool = True) -> Any:
        text = self.logs[name]
        if follow:  # chunks that cut lines in two, as a stream does
            return SimpleNamespace(stream=lambda size: iter([text[:7].encode(), text[7:].encode()]))
        return text

    def secret(self, name: str) -> dict[str, str]:
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        return self.secrets[name]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeCluster]]:
    """Make the fake cluster the one every spinctl command of the test talks to."""
    def install(*args: Any, **kwargs: Any) -> FakeCluster:
        fake = FakeCluster(*args, **kwargs)
        monkeypatch.setattr(session, "Session", lambda *_: fake)
        return fake

    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    yield install


def spinctl(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# -- wait -------------------------------------------------------------------------------------------------------
def test_wait_follows_to_success_counting_iterations_from_zero(cluster: Callable[..., FakeCluster]) -> None:
    cluster([make_run("Generating", 0), make_run("Training", 1), make_run("Succeeded", 1, "Completed")])
    result = spinctl("wait", "demo")
    assert result.exit_code == 0, result.output
    assert [line.split("] ", 1)[1] for line in result.output.splitlines()[:-1]] == [
        "demo: iteration 0 of 2 Generating", "demo: iteration 1 of 2 Training",
        "demo: iteration 1 of 2 Succeeded (Completed)"]
    assert result.output.splitlines()[-1] == "demo succeeded: Completed; lineage: s3://runs/spin/ns/demo/u1/manifest.json"


def test_wait_on_a_failed_run_exits_1_with_its_reason(cluster: Callable[..., FakeCluster]) -> None:
    cluster([make_run("Failed", 0, "GenerationFailed", "demo-i0-gen failed after 1 attempt(s)")])
    result = spinctl("wait", "demo")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == \
        "Error: demo failed: GenerationFailed: demo-i0-gen failed after 1 attempt(s)"


def test_ctrl_c_exits_130_and_says_the_run_keeps_running(cluster: Callable[..., FakeCluster],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    expected = ("interrupted: demo keeps running on the cluster; `spinctl wait demo -n ns` follows it again, "
                "`spinctl cancel demo -n ns` stops it")
    fake = cluster([make_run("Generating", 0)])
    waited = spinctl("wait", "demo")
    assert waited.exit_code == 130 and waited.output.splitlines()[-1] == expected
    # start --wait follows on the same code path.
    started = spinctl("start", "--name", "demo", "--model", "s3://models/sft", "--dataset", "s3://data/sft.jsonl",
                      "--iterations", "2", "--storage", "s3://runs/spin", "--no-preflight", "--wait")
    assert started.exit_code == 130 and started.output.splitlines()[0] == "spinrun/demo created"
    assert started.output.splitlines()[-1] == expected
    assert fake.patches == []  # nothing cancelled


def test_wait_gives_up_after_its_timeout(cluster: Callable[..., FakeCluster], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    cluster([make_run("Training", 1)])
    result = spinctl("wait", "demo", "--timeout", "25")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: gave up waiting for demo after 25s; it keeps running " \
                                             "(spinctl status demo)"


# -- cancel / resume ---------------------------------------------------------------------------------------------
def test_cancel_and_resume_refuse_finished_runs(cluster: Callable[..., FakeCluster]) -> None:
    fake = cluster([make_run("Succeeded", 1, "Completed")])
    assert spinctl("cancel", "demo").output.strip() == \
        "Error: demo has already succeeded (Completed): there is nothing to cancel"
    assert spinctl("resume", "demo").output.strip() == ("Error: demo has already succeeded (Completed): there is "
                                                        "nothing to resume; start a new run to train further")
    failed = cluster([make_run("Failed", 0, "GenerationFailed")])
    cancelled = spinctl("cancel", "demo")
    assert cancelled.exit_code == 1 and cancelled.output.strip() == (
        "Error: demo has already failed (GenerationFailed): nothing runs to cancel; `spinctl resume demo` retries it")
    assert fake.patches == failed.patches == []
    assert spinctl("resume", "demo").exit_code == 0  # a failed run may be retried
    assert failed.patches[0]["spec"] == {"suspend": False}
    running = cluster([make_run("Training", 1)])
    assert spinctl("cancel", "demo").exit_code == 0 and running.patches == [{"spec": {"suspend": True}}]


# -- logs -------------------------------------------------------------------------------------------------------
STEP = {"event": "step", "step": 4, "loss": 0.54641, "rewards/real": 0.3, "rewards/generated": 0.1,
        "rewards/margins": 0.2123, "rewards/accuracies": 1.0, "lr": 1e-3, "tokens": 512.0, "seconds": 0.03,
        "tokens/s": 14574.2}
TRAIN_LOG = "\n".join([json.dumps({"event": "start", "pairs": 16, "steps": 4}), json.dumps(STEP),
                       "[rank0] a library's own line"]) + "\n"


def test_logs_tell_never_from_not_yet(cluster: Callable[..., FakeCluster]) -> None:
    cluster([make_run("Generating", 0)])
    assert spinctl("logs", "demo", "--index", "5").output.strip() == (
        "Error: demo has 2 generation shard(s), --index 0 to 1: there is no generation shard 5")
    assert spinctl("logs", "demo", "--role", "train", "--index", "1").output.strip() == (
        "Error: demo has 1 training node(s), --index 0 to 0: there is no training node 1")
    assert spinctl("logs", "demo", "--iteration", "2").output.strip() == (
        "Error: demo has 2 iteration(s), counted from 0: there is no iteration 2")
    assert spinctl("logs", "demo", "--iteration", "1", "--index", "1").output.strip() == (
        "Error: no generate pod with index 1 in iteration 1 of demo (not started yet, or its Job was removed)")


def test_logs_of_a_failed_run_default_to_the_pod_that_failed(cluster: Callable[..., FakeCluster]) -> None:
    pods = (pod("demo-i0-gen-0-a", "demo-i0-gen", 0, naming.GENERATE, 0, "Succeeded"),
            pod("demo-i0-gen-1-a", "demo-i0-gen", 0, naming.GENERATE, 1, "Failed", minute=1),
            pod("demo-i0-gen-1-b", "demo-i0-gen", 0, naming.GENERATE, 1, "Failed", minute=2))
    cluster([make_run("Failed", 0, "GenerationFailed")], jobs=(job("demo-i0-gen", 0, naming.GENERATE, "Failed"),),
            pods=pods, logs={"demo-i0-gen-1-b": "error: no such file: /nonexistent/sft.jsonl\n"})
    result = spinctl("logs", "demo")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["# demo-i0-gen-1-b: the generate pod that failed",
                                          "error: no such file: /nonexistent/sft.jsonl"]


def test_training_logs_read_as_lines_and_raw_as_written(cluster: Callable[..., FakeCluster]) -> None:
    pods = (pod("demo-i1-train-0-a", "demo-i1-train", 1, naming.TRAIN, 0, "Running"),)
    cluster([make_run("Training", 1)], pods=pods, logs={"demo-i1-train-0-a": TRAIN_LOG})
    readable = ["start: pairs=16, steps=4",
                "step 4: loss 0.5464, reward accuracy 1.00, margin +0.212, 14574 tokens/s",
                "[rank0] a library's own line"]
    assert spinctl("logs", "demo").output.splitlines() == readable
    assert spinctl("logs", "demo", "-f").output.splitlines() == readable  # lines cut across chunks
    assert spinctl("logs", "demo", "--raw").output == TRAIN_LOG
    assert spinctl("logs", "demo", "--raw", "-f").output == TRAIN_LOG


# -- lineage --diff ---------------------------------------------------------------------------------------------
def test_lineage_diff_tells_never_from_not_yet(cluster: Callable[..., FakeCluster], tmp_path: Path) -> None:
    storage = f"file://{tmp_path}/store"
    prefix = Path(naming.run_prefix(storage, "ns", "demo", "u1").removeprefix("file://"))
    prefix.mkdir(parents=True)
    (prefix / "manifest.json").write_text(json.dumps({"iterations": {"0": {"generate": {"config": {}}}}}))
    cluster([make_run("Generating", 1, storage=storage)])
    assert spinctl("lineage", "demo", "--diff", "0", "2").output.strip() == (
        "Error: demo has 2 iteration(s), counted from 0: there is no iteration 2")
    assert spinctl("lineage", "demo", "--diff", "0", "1").output.strip() == (
        "Error: iteration 1 of demo is not in its lineage yet")
    cluster([make_run("Failed", 0, "GenerationFailed", storage=storage)])
    assert spinctl("lineage", "demo", "--diff", "0", "1").output.strip() == (
        "Error: iteration 1 of demo did not run: the run ended (Failed, GenerationFailed) in iteration 0")


# -- list -------------------------------------------------------------------------------------------------------
def test_list_prints_as_kubectl_get_does(cluster: Callable[..., FakeCluster]) -> None:
    cluster([make_run("Failed", 0, "GenerationFailed", "demo-i0-gen failed")])
    listed = json.loads(spinctl("list", "-o", "json").output)
    assert (listed["apiVersion"], listed["kind"]) == ("v1", "List")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["demo"]
    assert "managedFields" not in listed["items"][0]["metadata"]
    assert yaml.safe_load(spinctl("list", "-o", "yaml").output)["kind"] == "List"
    assert spinctl("list", "-o", "name").output == "spinrun.selfplay.dev/demo\n"
    wide = spinctl("list", "-o", "wide").output.splitlines()
    assert wide[0].split() == ["NAME", "ITERATION", "ITERATIONS", "PHASE", "REASON", "AGE", "MODEL", "MESSAGE"]
    assert wide[1].split()[:4] == ["demo", "0", "2", "Failed"] and wide[1].endswith("demo-i0-gen failed")
    assert "managedFields" not in json.loads(spinctl("status", "demo", "-o", "json").output)["run"]["metadata"]


def test_iterations_are_counted_from_zero_in_spinctl_and_kubectl_alike(cluster: Callable[..., FakeCluster]) -> None:
    """spinctl list's columns are kubectl get spinruns' columns, and their descriptions say how they count."""
    cluster([make_run("Succeeded", 1, "Completed")])
    (version,) = api.crd()["spec"]["versions"]
    columns = [c for c in version["additionalPrinterColumns"] if not c.get("priority")]
    headers = spinctl("list").output.splitlines()[0].split()
    # kubectl: NAME, then the columns; spinctl adds the reason kubectl shows with -o wide.
    assert ["NAME", *(c["name"].upper() for c in columns)] == [h for h in headers if h != "REASON"]
    described = {c["name"]: c["description"] for c in columns}
    assert "counted from 0" in described["Iteration"] and "in total" in described["Iterations"]
    for command in ("logs", "lineage", "wait", "start"):
        assert "from 0" in " ".join(spinctl(command, "--help").output.split()), command


# -- preflight at start -----------------------------------------------------------------------------------------
def test_start_refuses_a_missing_secret_before_creating_anything(cluster: Callable[..., FakeCluster]) -> None:
    fake = cluster([])
    args = ["start", "--name", "demo", "--model", "s3://models/sft", "--dataset", "s3://data/sft.jsonl",
            "--iterations", "2", "--storage", "s3://runs/spin", "--storage-secret", "s3"]
    refused = spinctl(*args)
    assert refused.exit_code == 1 and fake.created == []
    assert refused.output.strip() == ('Error: preflight refused demo (nothing created; --no-preflight skips these '
                                      'checks): Secret "s3" not found in namespace "ns" (--storage-secret, '
                                      'spec.storage.credentialsSecret)')
    assert spinctl(*args, "--no-preflight").exit_code == 0 and len(fake.created) == 1


def runtime(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.RUNTIME_KIND,
            "metadata": {"name": name, "resourceVersion": "42"}, "spec": spec}


START = ["start", "--name", "demo", "--model", "s3://models/sft", "--dataset", "s3://data/sft.jsonl", "--iterations",
         "2", "--no-preflight"]


def test_start_takes_its_storage_from_the_runtime_and_writes_it_into_the_run(
        cluster: Callable[..., FakeCluster]) -> None:
    storage = {"uri": "s3://platform/spin", "credentialsSecret": "s3", "endpoint": "http://minio:9000"}
    fake = cluster([], runtimes={"default": runtime("default", storage=storage), "gpu": runtime("gpu")})
    assert spinctl(*START).exit_code == 0
    assert fake.created[-1]["spec"]["storage"] == storage and "runtime" not in fake.created[-1]["spec"]
    # The run's own storage fields win over the runtime's; the runtime fills the rest.
    assert spinctl(*START, "--storage-secret", "mine").exit_code == 0
    assert fake.created[-1]["spec"]["storage"] == {**storage, "credentialsSecret": "mine"}
    # A runtime named: written into the run for the controller; it has no storage, so none is taken.
    refused = spinctl(*START, "--runtime", "gpu")
    assert refused.exit_code == 1 and refused.output.strip() == (
        'Error: --storage is required (spec.storage.uri): SpinRuntime "gpu" sets no storage.uri')
    assert spinctl(*START, "--runtime", "gpu", "--storage", "s3://mine/spin").exit_code == 0
    assert fake.created[-1]["spec"]["runtime"] == "gpu"
    missing = spinctl(*START, "--runtime", "cpu")
    assert missing.output.strip() == 'Error: spinruntime "cpu" not found (kubectl get spinruntimes)'
    assert len(fake.created) == 3


def test_start_without_a_runtime_or_storage_is_one_line(cluster: Callable[..., FakeCluster]) -> None:
    fake = cluster([])
    refused = spinctl(*START)
    assert refused.exit_code == 1 and fake.created == []
    assert refused.output.strip() == ('Error: --storage is required (spec.storage.uri): no SpinRuntime "default" '
                                      "gives one")


def test_dry_run_shows_the_runtime_copy_and_jobs_built_from_the_merge(cluster: Callable[..., FakeCluster]) -> None:
    fake = cluster([], runtimes={"default": runtime("default", nodeSelector={"pool": "gpu", "zone": "a"},
                                                    shmSize={"train": "32Gi"}, storage={"uri": "s3://platform/spin"})})
    out = spinctl(*START, "--set", "nodeSelector.zone=b", "--dry-run", "-o", "yaml")
    assert out.exit_code == 0, out.output
    run, gen, _, train = yaml.safe_load_all(out.output)
    assert run["spec"]["storage"] == {"uri": "s3://platform/spin"} and run["spec"]["nodeSelector"] == {"zone": "b"}
    assert run["status"]["runtime"] == {"name": "default", "resourceVersion": "42",
                                        "spec": fake.runtimes["default"]["spec"]}
    for job in (gen, train):
        assert job["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    (shm,) = [v for v in train["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["sizeLimit"] == "32Gi"
    assert fake.created == []
    names = spinctl(*START, "--dry-run").output.splitlines()
    assert names[-1] == "with spinruntime/default under the run's spec (-o yaml shows both)"
