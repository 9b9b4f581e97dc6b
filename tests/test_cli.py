"""spinctl against the real control plane and S3 server: the reference run (started with ``spinctl start -f
--wait``, conftest) is inspected with list, status, logs, lineage and wait, and cancel / resume refuse it;
cancel, resume and delete drive another; the preflight refuses inputs the pods could not read; unknown runs,
missing permissions and failed runs end in one line and a non-zero exit."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from kubernetes import client
from support import Controllers, FinishedRun, create_s3_secret, get_run, spinctl_until_exit

from spin_k8s.cli import main
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import free_port, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


@pytest.fixture(scope="module")
def ns(api: client.ApiClient) -> Iterator[str]:
    """One namespace for the module's own runs (cancel, resume, delete, a failed run)."""
    core = client.CoreV1Api(api)
    name = f"cli-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until("the default ServiceAccount", lambda: core.list_namespaced_service_account(
        name, field_selector="metadata.name=default").items, 30)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def cli_controllers(cluster: Cluster, ns: str, s3_server: S3Server,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controllers]:
    """The controller watching ``ns``; the module's waits fail at once if it (or a server) exits."""
    controllers = Controllers(cluster, ns, tmp_path_factory.mktemp("controller"), s3_server)
    controllers.start()
    yield controllers
    controllers.stop()


@pytest.fixture(scope="module")
def setup(api: client.ApiClient, crd: None, ns: str, s3_server: S3Server, cli_controllers: Controllers,
          assets: tiny.TinyAssets) -> dict[str, str]:
    """An S3 bucket and Secret in ``ns`` and the tiny model: what `start` needs."""
    bucket = f"cli-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=bucket)
    create_s3_secret(api, ns, s3_server)
    return {"bucket": bucket, "model": f"file://{assets.model_dir}", "dataset": f"file://{assets.data_path}",
            "endpoint": s3_server.endpoint}


def spinctl(cluster: Cluster, ns: str, *args: str, kubeconfig: Path | None = None) -> Result:
    return CliRunner().invoke(main, [*args, "--kubeconfig", str(kubeconfig or cluster.kubeconfig), "-n", ns],
                              catch_exceptions=False)


TINY = ("generation.shards=2", "generation.gpusPerShard=0", "generation.maxTokens=12",
        "generation.engine=transformers", "training.gpusPerNode=0",
        "training.zeroStage=0", "training.precision=fp32", "training.learningRate=1e-3", "training.epochs=1",
        "training.perDeviceBatchSize=4", "training.maxLength=96", "training.maxPromptLength=48",
        "training.gradientCheckpointing=false")


def start_args(setup: dict[str, str], name: str, iterations: int) -> list[str]:
    sets = [*TINY, f"training.port={free_port()}"]
    return ["start", "--name", name, "--model", setup["model"], "--dataset", setup["dataset"],
            "--iterations", str(iterations), "--storage", f"s3://{setup['bucket']}/spin", "--storage-secret", "s3",
            "--storage-endpoint", setup["endpoint"], *[arg for s in sets for arg in ("--set", s)]]


def test_start_wait_follows_the_run_to_success(reference: FinishedRun) -> None:
    assert reference.exit_code == 0, reference.output
    lines = reference.output.splitlines()
    assert lines[0] == "spinrun/demo created"
    # Iterations counted from 0, as in the Job names, status and lineage: the second is "iteration 1 of 2".
    assert any(line.endswith("] demo: iteration 0 of 2 Generating, shards done 0/2") for line in lines)
    assert any("] demo: iteration 1 of 2 Training" in line for line in lines)
    assert lines[-1].startswith("demo succeeded: Completed; lineage: s3://")


def test_list_and_status_show_iterations_jobs_and_metrics(cluster: Cluster, reference: FinishedRun) -> None:
    ns = reference.namespace
    table = spinctl(cluster, ns, "list").output.splitlines()
    assert table[0].split() == ["NAME", "ITERATION", "ITERATIONS", "PHASE", "REASON", "AGE"]
    assert table[1].split()[:5] == ["demo", "1", "2", "Succeeded", "Completed"]
    listed = json.loads(spinctl(cluster, ns, "list", "-o", "json").output)
    assert listed["kind"] == "List" and [r["metadata"]["name"] for r in listed["items"]] == ["demo"]
    assert "managedFields" not in listed["items"][0]["metadata"]
    assert spinctl(cluster, ns, "list", "-o", "name").output == "spinrun.selfplay.dev/demo\n"

    text = spinctl(cluster, ns, "status", "demo").output
    assert "Phase:       Succeeded (Completed)" in text
    for job in ("demo-i0-gen", "demo-i0-train", "demo-i1-gen", "demo-i1-train"):
        assert job in text
    status = yaml.safe_load(spinctl(cluster, ns, "status", "demo", "-o", "yaml").output)
    assert [(j["name"], j["state"], j["succeeded"]) for j in status["jobs"]] == [
        ("demo-i0-gen", "Complete", 2), ("demo-i0-train", "Complete", 1), ("demo-i1-gen", "Complete", 2),
        ("demo-i1-train", "Complete", 1)]
    assert all("loss" in i["metrics"] for i in status["run"]["status"]["iterations"])


def test_kubectl_finds_each_iterations_jobs_and_run_names_complete(cluster: Cluster, reference: FinishedRun) -> None:
    ns = reference.namespace
    from spin_k8s.testing import tools

    out = subprocess.run([str(tools.kube_binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "-n", ns, "get",
                          "jobs", "-l", "selfplay.dev/run=demo,selfplay.dev/iteration=1", "-o", "name"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["job.batch/demo-i1-gen", "job.batch/demo-i1-train"]
    words = f"spinctl status --kubeconfig {cluster.kubeconfig} -n {ns} de"
    completed = CliRunner().invoke(main, [], prog_name="spinctl", env={
        "_SPINCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)})
    assert completed.output.splitlines() == ["plain,demo"]


def test_logs_of_a_shard_and_of_the_trainer(cluster: Cluster, reference: FinishedRun) -> None:
    ns = reference.namespace
    shard = spinctl(cluster, ns, "logs", "demo", "--iteration", "0", "--role", "gen", "--index", "1", "--raw").output
    events = [json.loads(line) for line in shard.splitlines() if line.startswith("{")]
    assert {"event": "start", "shard": 1}.items() <= events[0].items()
    assert events[-1]["event"] == "done"
    last = spinctl(cluster, ns, "logs", "demo", "--tail", "1").output  # the run ended training iteration 1
    assert len(last.splitlines()) == 1 and last == spinctl(cluster, ns, "logs", "demo", "--iteration", "1",
                                                          "--role", "train", "--tail", "1").output
    steps = [line for line in spinctl(cluster, ns, "logs", "demo", "--role", "train").output.splitlines()
             if line.startswith("step ")]
    assert steps and re.fullmatch(r"step \d+: loss \d\.\d{4}, reward accuracy \d\.\d\d, margin [-+]\d\.\d{3}, "
                                  r"\d+ tokens/s", steps[-1]), steps
    missing = spinctl(cluster, ns, "logs", "demo", "--index", "7")  # the run trains on one node: never
    assert missing.exit_code == 1
    assert missing.output.strip() == "Error: demo has 1 training node(s), --index 0 to 0: there is no training node 7"


def test_lineage_table_json_and_diff(cluster: Cluster, reference: FinishedRun) -> None:
    ns = reference.namespace
    table = spinctl(cluster, ns, "lineage", "demo").output
    assert "Code:     spin-k8s" in table
    assert sum(1 for line in table.splitlines() if line.startswith(("0 ", "1 "))) == 4
    manifest = json.loads(spinctl(cluster, ns, "lineage", "demo", "-o", "json").output)
    assert sorted(manifest["iterations"]) == ["0", "1"]
    assert all(len(s["sha256"]) == 64 for s in manifest["iterations"]["1"]["generate"]["shards"])
    diff = json.loads(spinctl(cluster, ns, "lineage", "demo", "--diff", "0", "1", "-o", "json").output)
    changed = {d["key"]: (d["0"], d["1"]) for d in diff}
    assert changed["train.config.learningRate"] == (1e-3, 5e-4)
    assert changed["train.model"][1].endswith("/i0/model") and "generate.config.temperature" not in changed
    too_far = spinctl(cluster, ns, "lineage", "demo", "--diff", "0", "2")
    assert too_far.output.strip() == "Error: demo has 2 iteration(s), counted from 0: there is no iteration 2"


def test_wait_cancel_and_resume_of_a_finished_run(cluster: Cluster, api: client.ApiClient,
                                                   reference: FinishedRun) -> None:
    ns = reference.namespace
    waited = spinctl(cluster, ns, "wait", "demo")
    assert waited.exit_code == 0
    assert waited.output.splitlines()[-1] == f"demo succeeded: Completed; lineage: {reference.prefix}/manifest.json"
    assert spinctl(cluster, ns, "cancel", "demo").output.strip() == \
        "Error: demo has already succeeded (Completed): there is nothing to cancel"
    assert spinctl(cluster, ns, "resume", "demo").output.strip() == (
        "Error: demo has already succeeded (Completed): there is nothing to resume; start a new run to train further")
    run = get_run(api, ns, "demo")
    assert run["spec"]["suspend"] is False and run["metadata"]["generation"] == reference.run["metadata"]["generation"]


def test_preflight_refuses_what_the_pods_could_not_read(cluster: Cluster, api: client.ApiClient, ns: str,
                                                         setup: dict[str, str], s3_server: S3Server,
                                                         assets: tiny.TinyAssets) -> None:
    s3_server.client().upload_file(str(assets.data_path), setup["bucket"], "data/sft.jsonl")
    args = start_args(setup, "checked", 1)
    args[args.index("--model") + 1] = f"s3://{setup['bucket']}/models/nope"
    args[args.index("--dataset") + 1] = f"s3://{setup['bucket']}/data/sft.jsonl"  # there, readable with the Secret
    refused = spinctl(cluster, ns, *args)
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        "Error: preflight refused checked (nothing created; --no-preflight skips these checks): model "
        f"s3://{setup['bucket']}/models/nope: no config.json under this prefix (a Hugging Face checkpoint directory "
        "is expected)")
    args[args.index("--storage-secret") + 1] = "nosuch"
    assert spinctl(cluster, ns, *args).output.strip().endswith(
        f'Secret "nosuch" not found in namespace "{ns}" (--storage-secret, spec.storage.credentialsSecret)')
    client.CoreV1Api(api).create_namespaced_secret(ns, {"metadata": {"name": "wrong"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"}})
    args[args.index("--storage-secret") + 1] = "wrong"
    assert 'S3 refused the credentials of Secret "wrong"' in spinctl(cluster, ns, *args).output
    assert spinctl(cluster, ns, "status", "checked").output.strip() == \
        f'Error: spinrun "checked" not found in namespace "{ns}"'  # nothing was created


def test_cancel_resume_and_delete(cluster: Cluster, api: client.ApiClient, ns: str, setup: dict[str, str],
                                  cli_controllers: Controllers) -> None:
    batch = client.BatchV1Api(api)
    assert spinctl(cluster, ns, *start_args(setup, "again", 1)).output.startswith("spinrun/again created")
    cli_controllers.wait("the generation Job", lambda: batch.list_namespaced_job(
        ns, label_selector="selfplay.dev/run=again").items, 60)
    assert "cancelled" in spinctl(cluster, ns, "cancel", "again").output
    cli_controllers.wait("the run to be suspended", lambda: "Phase:       Suspended" in spinctl(
        cluster, ns, "status", "again").output, 60)
    assert batch.read_namespaced_job("again-i0-gen", ns).spec.suspend is True
    # Ctrl-C while waiting stops the waiting only (exit 130), and says so. (Cancelled first: the run cannot end
    # before the signal.)
    waiting = subprocess.Popen([str(Path(sys.executable).parent / "spinctl"), "wait", "again", "--kubeconfig",
                                str(cluster.kubeconfig), "-n", ns], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert waiting.stdout is not None and "again: iteration 0 of 1" in waiting.stdout.readline()
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(30) == 130
    assert waiting.stdout.read().splitlines()[-1] == (
        f"interrupted: again keeps running on the cluster; `spinctl wait again -n {ns}` follows it again, "
        f"`spinctl cancel again -n {ns}` stops it")
    assert spinctl(cluster, ns, "resume", "again").output.startswith("spinrun/again resumed")
    cli_controllers.wait("the resumed run to finish", lambda: "Phase:       Succeeded" in spinctl(
        cluster, ns, "status", "again").output, 600)
    deleted = spinctl(cluster, ns, "delete", "again", "--wait")
    assert deleted.exit_code == 0 and "its lineage stays at s3://" in deleted.output
    assert not batch.list_namespaced_job(ns, label_selector="selfplay.dev/run=again").items  # foreground delete
    gone = spinctl(cluster, ns, "status", "again")
    assert gone.exit_code == 1 and gone.output.strip() == f'Error: spinrun "again" not found in namespace "{ns}"'


def test_a_failed_run_exits_non_zero_with_its_reason(setup: dict[str, str], cli_controllers: Controllers) -> None:
    args = start_args(setup, "broken", 1)
    args[args.index("--dataset") + 1] = "file:///nonexistent/sft.jsonl"
    code, output = spinctl_until_exit(cli_controllers, *args, "--set", "restartLimit=0", "--wait", "--timeout", "300")
    assert code == 1
    assert output.splitlines()[-1].startswith("Error: broken failed: GenerationFailed: broken-i0-gen failed")
    # The dataset is a file:// path: the preflight only warns that this machine lacks it (the pods might not).
    assert output.splitlines()[0].startswith("warning: dataset file:///nonexistent/sft.jsonl does not exist")
    code, again = spinctl_until_exit(cli_controllers, "wait", "broken")
    assert code == 1 and again.splitlines()[-1] == output.splitlines()[-1]
    # Its log: the generation pod that failed, not a training pod that never ran.
    log = spinctl_until_exit(cli_controllers, "logs", "broken")[1]
    assert log.splitlines()[0].startswith("# broken-i0-gen-") and "/nonexistent/sft.jsonl" in log, log


def test_missing_permission_is_one_line(cluster: Cluster, api: client.ApiClient, ns: str, tmp_path: Path) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token("nobody", ns, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600))).status.token
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    kubeconfig = tmp_path / "nobody.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c", "clusters": admin["clusters"],
        "users": [{"name": "nobody", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": admin["clusters"][0]["name"], "user": "nobody"}}]}))
    denied = spinctl(cluster, ns, "list", kubeconfig=kubeconfig)
    assert denied.exit_code == 1
    assert denied.output.strip() == (f'Error: spinruns.selfplay.dev is forbidden: User "system:serviceaccount:{ns}:'
                                     f'nobody" cannot list resource "spinruns" in API group "selfplay.dev" in the '
                                     f'namespace "{ns}"')
