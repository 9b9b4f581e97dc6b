"""A multi-node training gang on the real control plane: one pod of a 2-node gang dies after a checkpoint
reached S3; the controller fails the gang and recreates it, and the new pods, which start on empty disks as
on a real cluster, fetch the checkpoint from S3 and resume from it.

The node agent gives every pod its own TMPDIR, and the workers' default cache (where the training worker
stages checkpoints) lives there: a pod of the new gang can only resume from S3, never from files a killed pod
left behind. Each node's local rank 0 logs a ``fetched`` event saying whether it downloaded the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes import client
from support import (
    Controllers,
    completion_index,
    create_run,
    get_run,
    job_names,
    kill_when_running,
    pod_log,
    pods,
    run_store,
    spin_run,
)

from spin_k8s import api as spin_api
from spin_k8s import lineage
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL
NODES = 2


def events(log: str, event: str) -> list[dict[str, Any]]:
    """The worker log's JSON events named ``event`` (torchrun's own lines are not JSON)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                fields = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(fields, dict) and fields.get("event") == event:
                found.append(fields)
    return found


def pod_dir(cluster: Cluster, namespace: str, pod: str) -> Path:
    """The pod's working directory on the node (``pod`` may be a glob pattern matching one pod's name)."""
    (found,) = (cluster.node_root / "pods").glob(f"{namespace}_{pod}_*")
    return found.resolve()


def resumed_gang(cluster: Cluster, api: client.ApiClient, namespace: str, job: str) -> dict[str, Any] | None:
    """Once every pod of ``job`` fetched the checkpoint and rank 0 resumed from it: the pods by completion
    index (name, fetched events) and the resume event; None before."""
    gang = {completion_index(p): p.metadata.name for p in pods(api, namespace, job)}
    if sorted(gang) != [str(i) for i in range(NODES)]:
        return None
    logs = {i: pod_log(cluster, namespace, name, "train") for i, name in gang.items()}
    fetched = {i: events(text, "fetched") for i, text in logs.items()}
    resumed = events(logs["0"], "resume")
    if not all(fetched.values()) or not resumed:
        return None
    return {"pods": gang, "fetched": fetched, "resume": resumed}


def assert_fetched_from_s3(cluster: Cluster, namespace: str, gang: dict[str, Any], old_dirs: list[Path]) -> int:
    """Every node of the gang downloaded the checkpoint it resumed from into its pod's own, new temporary
    directory, though the same path held that checkpoint on the disks of the gang before (``old_dirs``, its
    pods' directories: they staged every checkpoint they uploaded); the step it resumed from."""
    (resume,) = gang["resume"]
    step, tag = resume["step"], resume["tag"]
    assert step > 0 and tag == f"step-{step:08d}", resume
    assert sorted(e["node"] for f in gang["fetched"].values() for e in f) == list(range(NODES)), gang["fetched"]
    for index, (fetched,) in sorted(gang["fetched"].items()):
        assert fetched["node"] == int(index) and fetched["tag"] == tag, fetched
        assert fetched["downloaded"] is True, f"pod {index} found the checkpoint on its disk: {fetched}"
        home = pod_dir(cluster, namespace, gang["pods"][index])
        assert home not in old_dirs
        path = Path(fetched["path"]).resolve()
        tmp = (home / "tmp").resolve()
        assert path.is_relative_to(tmp), (path, home)  # its TMPDIR: the pod's own, new directory
        # What a shared /tmp would have offered: the killed pods staged this very checkpoint at the same place.
        assert all(((old / "tmp").resolve() / path.relative_to(tmp)).is_dir() for old in old_dirs), (path, old_dirs)
    return int(step)


def test_a_restarted_gang_resumes_from_s3_on_empty_disks_then_exhausts_and_resumes(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        s3_secret: str, assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    controllers.start()
    body = spin_run("demo", assets, s3_server, bucket, iterations=1, restartLimit=1)
    body["spec"]["training"].update(nodes=NODES, gpusPerNode=0, epochs=12, checkpointEverySteps=2)
    created = create_run(api, namespace, body)
    s3 = s3_server.client()
    latest = f"spin/{namespace}/demo/{created['metadata']['uid']}/i0/checkpoints/latest"

    def checkpointed(_: client.V1Pod) -> bool:
        try:
            s3.head_object(Bucket=bucket, Key=latest)
        except ClientError:
            return False
        return True

    # One pod of the gang dies once a complete checkpoint is in S3; the whole gang fails and is recreated.
    kill_when_running(controllers, api, "demo-i0-train", "1", checkpointed)
    first = controllers.wait("demo-i0-train-r1 to resume",
                             lambda: resumed_gang(cluster, api, namespace, "demo-i0-train-r1"))
    failed = client.BatchV1Api(api).read_namespaced_job("demo-i0-train", namespace).status.conditions or []
    assert any(c.type == "Failed" and c.status == "True" for c in failed), failed
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train", "demo-i0-train-r1"]
    killed = [pod_dir(cluster, namespace, f"demo-i0-train-{i}-*") for i in range(NODES)]
    first_step = assert_fetched_from_s3(cluster, namespace, first, killed)

    # Killed again, the gang has used its whole restart budget.
    kill_when_running(controllers, api, "demo-i0-train-r1", "1")
    run = controllers.wait_phase(api, "demo", "Failed")
    assert run["status"]["reason"] == "TrainingRestartsExhausted"
    condition = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert "demo-i0-train-r1 failed after 2 attempt(s)" in condition["message"]
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train", "demo-i0-train-r1"]

    # A resume grants one more round: a third gang, again on empty disks, resumes from S3 and finishes.
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        G, V, namespace, P, "demo", {"metadata": {"annotations": {spin_api.RESUME_ANNOTATION: "1"}}})
    controllers.wait("the resume to be seen", lambda: get_run(api, namespace, "demo")["status"]["phase"] != "Failed",
                     60)
    run = controllers.wait_phase(api, "demo", "Succeeded")
    assert run["status"]["iterations"][0]["restarts"] == 2
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train", "demo-i0-train-r1",
                                                 "demo-i0-train-r2"]
    last = resumed_gang(cluster, api, namespace, "demo-i0-train-r2")
    assert last is not None
    second = [pod_dir(cluster, namespace, name) for name in first["pods"].values()]
    assert not {pod_dir(cluster, namespace, name) for name in last["pods"].values()} & {*killed, *second}
    assert assert_fetched_from_s3(cluster, namespace, last, second) >= first_step
    steps = lineage.load(run_store(s3_server, bucket, run))
    assert steps[(0, "train")]["restarts"] == 2 and steps[(0, "train")]["job"] == "demo-i0-train-r2"
