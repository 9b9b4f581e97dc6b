"""How a failure's reason travels: the worker writes one line to its termination log, the node agent reports it
(or the end of the log) as a kubelet does, and the controller picks the pod that failed first."""

from __future__ import annotations

import datetime
import types
from pathlib import Path

import pytest
from kubernetes import client

from spin_k8s.controller import reconcile
from spin_k8s.testing import nodeagent
from spin_k8s.workers import data, runtime


def runner(tmp_path: Path) -> nodeagent.PodRunner:
    agent = types.SimpleNamespace(root=tmp_path, tmp_root=tmp_path / "tmp", passed_env=(), apiserver_port=6443)
    pod = client.V1Pod(metadata=client.V1ObjectMeta(name="p", namespace="ns", uid="0123456789"), spec=client.V1PodSpec(
        containers=[]))
    r = nodeagent.PodRunner(agent, pod, "10.244.0.2")  # type: ignore[arg-type]
    r.dir.mkdir(parents=True)
    return r


def container(policy: str = "FallbackToLogsOnError") -> client.V1Container:
    return client.V1Container(name="generate", termination_message_policy=policy)


def test_the_node_agent_reports_termination_messages_as_a_kubelet(tmp_path: Path) -> None:
    r, c = runner(tmp_path), container()
    log = r.dir / "generate.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    # No termination log: the last 80 lines of the log, on failure only, and only under FallbackToLogsOnError.
    assert r._message(c, 1) == "".join(f"line {i}\n" for i in range(20, 100))
    assert r._message(c, 0) == ""
    assert r._message(container("File"), 1) == ""
    log.write_text("x" * 5000 + "\nthe end\n")
    assert r._message(c, 1) == ("x" * 5000 + "\nthe end\n")[-2048:]  # at most 2048 bytes
    # What the process wrote to its termination log wins, on success too; its last 4096 bytes.
    message_file = Path(r._env(c)[nodeagent.TERMINATION_MESSAGE_ENV])
    assert message_file == r.dir / "generate.termination-log"
    message_file.write_text("nothing under s3://b/model\n")
    assert r._message(c, 3) == r._message(c, 0) == "nothing under s3://b/model\n"
    message_file.write_text("y" * 5000)
    assert r._message(c, 1) == "y" * 4096


def test_a_worker_input_error_exits_3_and_writes_its_termination_log(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "termination-log"
    path.write_text("")  # the kubelet creates it before the container starts
    monkeypatch.setenv(runtime.TERMINATION_LOG_ENV, str(path))

    def missing() -> int:
        raise data.DataError("s3://b/d.jsonl: no usable rows in 3 records\n(3 bad rows skipped)")

    assert runtime.run_cli(missing) == runtime.INPUT_EXIT == 3
    assert path.read_text() == "s3://b/d.jsonl: no usable rows in 3 records (3 bad rows skipped)\n"

    def crash() -> int:
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        runtime.run_cli(crash)
    assert path.read_text() == "RuntimeError: engine died\n"
    # Outside a container there is no termination log, and none is created.
    monkeypatch.setenv(runtime.TERMINATION_LOG_ENV, str(tmp_path / "absent"))
    assert runtime.run_cli(missing) == 3 and not (tmp_path / "absent").exists()


def failed_pod(name: str, minute: int, message: str | None, code: int = 1,
               phase: str = "Failed") -> client.V1Pod:
    at = datetime.datetime(2026, 1, 1, 0, minute, tzinfo=datetime.UTC)
    term = client.V1ContainerStateTerminated(exit_code=code, finished_at=at, message=message)
    status = client.V1ContainerStatus(name="train", image="i", image_id="", ready=False, restart_count=0,
                                      state=client.V1ContainerState(terminated=term))
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name, creation_timestamp=at),
                        status=client.V1PodStatus(phase=phase, container_statuses=[status]))


def test_the_controller_takes_the_pod_that_failed_first_and_the_last_line_of_its_message() -> None:
    pods = [failed_pod("rank0", 5, "Traceback (most recent call last):\n  ...\nRuntimeError: peer 1 gone\n"),
            failed_pod("rank1", 3, "...\ntorch.OutOfMemoryError: CUDA out of memory\n\n", code=137),
            failed_pod("rank2", 1, "still running?", phase="Running")]
    assert reconcile.failure_of(pods, "train") == ("torch.OutOfMemoryError: CUDA out of memory", 137)
    assert reconcile.failure_of(pods, "generate") == ("", None)  # no such container: no words of its own
    assert reconcile.failure_of([], "train") == ("", None)


def event(reason: str, message: str, minute: int) -> client.CoreV1Event:
    at = datetime.datetime(2026, 11, 30, 12, minute, tzinfo=datetime.UTC)
    return client.CoreV1Event(metadata=client.V1ObjectMeta(name=f"e{minute}"), reason=reason, message=message,
                              involved_object=client.V1ObjectReference(), last_timestamp=at)


def test_a_jobs_pod_creation_error_is_its_newest_word_on_creating_pods() -> None:
    refused = 'Error creating: pods "demo-i0-gen-0-abcde" is forbidden: exceeded quota: q'
    assert reconcile.create_error([event("SuccessfulCreate", "Created pod: a", 1), event("FailedCreate", refused, 2),
                                   event("Completed", "Job completed", 3)]) == refused
    # A pod created after the refusal: whatever caused it passed.
    passed = [event("FailedCreate", refused, 2), event("SuccessfulCreate", "Created pod: b", 3)]
    assert reconcile.create_error(passed) == ""
    assert reconcile.create_error([]) == ""


def test_an_api_error_reads_as_the_api_servers_message_without_headers() -> None:
    e = client.ApiException(status=403, reason="Forbidden")
    e.body = '{"kind":"Status","message":"jobs.batch \\"x\\" is forbidden: exceeded quota: q","code":403}'
    e.headers = {"Audit-Id": "123"}
    assert reconcile.api_message(e) == 'jobs.batch "x" is forbidden: exceeded quota: q'
    e.body = "not json"
    assert reconcile.api_message(e) == "403 Forbidden"
    assert reconcile.api_message(RuntimeError("demo-i0-gen already exists")) == "demo-i0-gen already exists"
