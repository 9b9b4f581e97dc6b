"""The local executor's pure parts: $(VAR) expansion, the translation of a pod's command line to this machine,
and the Job controller's verdict on local processes, against the Job bodies manifests.py really builds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spin_k8s import api, local, manifests, naming

OBJ: dict[str, Any] = {
    "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo"},
    "spec": {"model": "file:///m", "dataset": "file:///d.jsonl", "iterations": 1,
             "generation": {"shards": 2}, "training": {"nodes": 2, "gpusPerNode": 0, "port": 29500},
             "restartLimit": 2},
}


def test_expand_follows_kubernetes_rules() -> None:
    env = {"JOB_COMPLETION_INDEX": "3", "A": "x"}
    assert local.expand("--node-rank=$(JOB_COMPLETION_INDEX)", env) == "--node-rank=3"
    assert local.expand("$(A)-$(A)", env) == "x-x"
    assert local.expand("$$(A)", env) == "$(A)"  # escaped: stays literal
    assert local.expand("$(UNDEFINED) $A ${A}", env) == "$(UNDEFINED) $A ${A}"  # only $(NAME) of defined names
    assert local.expand("$$5 $$$(A) $$$$(A) $(", env) == "$5 $x $$(A) $("  # $$ is one $, read left to right


def test_container_env_adds_the_completion_index_and_expands_in_order() -> None:
    container = {"env": [{"name": "B", "value": "rank-$(JOB_COMPLETION_INDEX)"}, {"name": "C", "value": "$(B)/$(D)"},
                         {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    assert local.container_env(container, 1) == {"JOB_COMPLETION_INDEX": "1", "B": "rank-1", "C": "rank-1/$(D)"}


def test_localize_rewrites_only_what_cannot_run_here(tmp_path: Path) -> None:
    run = api.parse({**local.prepare(OBJ, tmp_path), "metadata": {"name": "demo", "uid": "u"}})
    prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
    body = manifests.train_job(run, prefix, 0, 1)
    container = body["spec"]["template"]["spec"]["containers"][0]
    env = local.container_env(container, 1)
    argv = [local.expand(a, env) for a in [*container["command"], *container["args"]]]
    assert "--master-addr=demo-i0-train-r1-0.demo-train" in argv and "--node-rank=1" in argv

    out = local.localize(argv, port=4242, cpu_ranks=3)
    assert out[:3] == [sys.executable, "-m", "spin_k8s.workers.gang"]
    assert "--master-addr=127.0.0.1" in out and "--master-port=4242" in out and "--nproc-per-node=3" in out
    changed = {a for a in argv if a.startswith(("--master-addr", "--master-port", "--nproc-per-node"))}
    assert [a for a in argv[1:] if a not in changed] == [a for a in out[1:] if not a.startswith(
        ("--master-addr", "--master-port", "--nproc-per-node"))]  # every worker flag passes through as built
    assert "--nproc-per-node=8" in local.localize(["python", "--nproc-per-node=8"], port=1, cpu_ranks=None)

    gen = manifests.generate_job(run, prefix, 0)["spec"]["template"]["spec"]["containers"][0]
    gen_argv = [*gen["command"], *gen["args"]]
    assert local.localize(gen_argv, port=1, cpu_ranks=2) == [sys.executable, *gen_argv[1:]]


def _states(*spec: tuple[bool, bool, int]) -> list[local.IndexState]:
    return [local.IndexState(running, succeeded, failures) for running, succeeded, failures in spec]


def test_generation_retries_a_failed_index_within_its_own_budget(tmp_path: Path) -> None:
    run = api.parse({**local.prepare(OBJ, tmp_path), "metadata": {"name": "demo", "uid": "u"}})
    spec = manifests.generate_job(run, "file:///p", 0)["spec"]  # backoffLimitPerIndex 2, maxFailedIndexes 0
    assert local.job_outcome(spec, _states((False, False, 0), (False, False, 0))) == local.Outcome("active",
                                                                                                    start=(0, 1))
    # index 0 failed twice: rerun alone; index 1 still running
    assert local.job_outcome(spec, _states((False, False, 2), (True, False, 0))).start == (0,)
    failed = local.job_outcome(spec, _states((False, False, 3), (True, False, 0)))
    assert (failed.state, failed.reason) == ("failed", "MaxFailedIndexesExceeded")
    done = local.job_outcome(spec, _states((False, True, 2), (False, True, 0)))
    assert (done.state, done.start) == ("complete", ())


def test_one_failed_node_fails_the_training_gang(tmp_path: Path) -> None:
    run = api.parse({**local.prepare(OBJ, tmp_path), "metadata": {"name": "demo", "uid": "u"}})
    spec = manifests.train_job(run, "file:///p", 0, 0)["spec"]  # backoffLimit 0
    assert local.job_outcome(spec, _states((True, False, 0), (True, False, 0))) == local.Outcome("active")
    failed = local.job_outcome(spec, _states((True, False, 0), (False, False, 1)))
    assert (failed.state, failed.reason, failed.start) == ("failed", "BackoffLimitExceeded", ())
    assert local.job_outcome({**spec, "suspend": True}, _states((False, False, 0), (False, False, 0))).state == \
        "suspended"
    # parallelism caps the processes, as it caps pods
    assert local.job_outcome({**spec, "parallelism": 1}, _states((False, False, 0), (False, False, 0))).start == (0,)


def test_job_view_carries_what_the_planner_reads(tmp_path: Path) -> None:
    run = api.parse({**local.prepare(OBJ, tmp_path), "metadata": {"name": "demo", "uid": "u"}})
    job = local.LocalJob(manifests.train_job(run, "file:///p", 1, 2), "uid-1", started="t0",
                         succeeded=[True, False], failures=[0, 1], state="failed", reason="BackoffLimitExceeded")
    view = job.view()
    assert (view.name, view.iteration, view.role, view.attempt) == ("demo-i1-train-r2", 1, naming.TRAIN, 2)
    assert (view.state, view.succeeded, view.failed, view.reason) == ("failed", 1, 1, "BackoffLimitExceeded")
    assert local.LocalJob.restored(job.saved()).view() == view


def test_prepare_defaults_storage_and_reports_every_bad_field(tmp_path: Path) -> None:
    spec = local.prepare(OBJ, tmp_path)["spec"]
    assert spec["storage"]["uri"] == f"file://{tmp_path.resolve()}/store" and spec["generation"]["shards"] >= 1
    bad = {**OBJ, "spec": {**OBJ["spec"], "iterations": 0, "training": {"maxLength": 8, "maxPromptLength": 16}}}
    with pytest.raises(ValueError) as err:
        local.prepare(bad, tmp_path)
    assert str(err.value).splitlines() == ["spec.iterations: 0 is less than the minimum of 1",
                                           "spec.training.maxPromptLength: must be below spec.training.maxLength"]
    with pytest.raises(ValueError, match=r"^metadata.name: required$"):
        local.prepare({**OBJ, "metadata": {}}, tmp_path)
    with pytest.raises(ValueError, match="queueName"):
        local.prepare({**OBJ, "spec": {**OBJ["spec"], "queueName": "q"}}, tmp_path)


def test_progress_lines_from_worker_events() -> None:
    line = local.progress_line("demo-i0-train", 0, {"event": "step", "step": 3, "loss": 0.69314, "lr": 1e-3,
                                                    "rewards/accuracies": 0.5, "tokens/s": 812.4})
    assert line == "demo-i0-train[0] step 3: loss 0.6931, reward accuracy 0.50, 812 tokens/s"
    assert local.progress_line("j", 0, {"event": "resume", "step": 2, "tag": "step2"}) == \
        "j[0] resumed from checkpoint step2 after step 2"
    assert local.progress_line("j", 0, {"event": "step"}) is None  # a worker of another version
    assert local.progress_line("j", 0, {"event": "generated", "rows": 3}) is None


def test_stopping_a_pod_leaves_none_of_its_processes(tmp_path: Path) -> None:
    # The shape of torchrun: a main process whose children run in sessions of their own, out of its group.
    script = "setsid sleep 300 & setsid sh -c 'trap \"\" TERM; sleep 300' & sleep 300 & wait"
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, local.POD_ENV: "uid/0"},
                            start_new_session=True)
    pod = local.Pod(proc, "uid/0")
    deadline = time.monotonic() + 10
    while len(local._marked("uid/0")) < 5 and time.monotonic() < deadline:  # sh, 2 setsid'd, a nested sh's sleep
        time.sleep(0.05)
    started = local._marked("uid/0")
    assert len(started) >= 4 and pod.running()
    local.stop_pods([pod], grace=0.5)
    assert not pod.running() and local._marked("uid/0") == []
    assert proc.returncode == -signal.SIGTERM  # the main process got the kubelet's SIGTERM first


def test_sigterm_interrupts_like_ctrl_c() -> None:
    with pytest.raises(KeyboardInterrupt), local.sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
