"""What an idle run costs the controller: a resync re-plans it from the caches without a request, to the
Kubernetes API or to S3; its lineage is read again only every --storage-check-seconds (to see an outage)."""

from __future__ import annotations

import time

import pytest
from kubernetes import client
from support import Controllers, create_run, job_names, metric, spin_run

from spin_k8s.testing.nodeagent import HANG_ANNOTATION
from spin_k8s.testing.processes import free_port
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


COUNTERS = ("spin_controller_reconciles_total", "spin_controller_s3_requests_total",
            "spin_controller_api_requests_total")


def counters(port: int) -> dict[str, int]:
    return {name: metric(port, name) for name in COUNTERS}


@pytest.mark.parametrize("check", [600, 2])
def test_an_idle_run_is_replanned_without_requests_and_its_storage_checked_as_configured(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, check: int) -> None:
    port = free_port()
    controllers.start("--no-leader-elect", "--resync-seconds=1", f"--storage-check-seconds={check}",
                      f"--metrics-bind=127.0.0.1:{port}")
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1,
                                        podAnnotations={HANG_ANNOTATION: "true"}))
    controllers.wait("generation to run", lambda: job_names(api, namespace, "demo") == ["demo-i0-gen"] or None, 60)
    time.sleep(3)  # the Job's own updates (pods started) settle
    before = counters(port)
    time.sleep(12)  # about 12 resyncs of an idle run
    after = counters(port)
    reconciles = after["spin_controller_reconciles_total"] - before["spin_controller_reconciles_total"]
    s3 = after["spin_controller_s3_requests_total"] - before["spin_controller_s3_requests_total"]
    kube = after["spin_controller_api_requests_total"] - before["spin_controller_api_requests_total"]
    assert reconciles >= 8, (reconciles, before, after)
    assert kube == 0, (before, after)  # reads come from the watch caches; nothing changed, nothing written
    if check == 600:
        assert s3 == 0, (before, after)
    else:  # every 2 s at most, on a reconcile: one manifest read each time
        assert 3 <= s3 <= reconciles, (s3, reconciles)
