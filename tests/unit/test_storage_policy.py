"""Which storage a tenant's SpinRun may make the controller reach (chart values storage.*), and when it may
write there at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from spin_k8s import api, lineage, planner
from spin_k8s.controller.reconcile import LOCKED_DOWN, Cache, Kube, Reconciler, StoragePolicy


def storage(uri: str, secret: str | None = "s3", endpoint: str | None = None) -> api.Storage:
    return api.Storage(uri=uri, credentials_secret=secret, endpoint=endpoint, region="us-east-1")


def reason(policy: StoragePolicy, spec: api.Storage) -> str | None:
    refused = policy.refusal(spec)
    return refused.reason if refused else None


def test_locked_down_by_default_and_opened_only_as_listed() -> None:
    assert reason(LOCKED_DOWN, storage("s3://team-a/spin")) is None  # AWS, the run's own Secret
    assert reason(LOCKED_DOWN, storage("s3://team-a/spin", endpoint="http://minio:9000")) == "EndpointNotAllowed"
    assert reason(LOCKED_DOWN, storage("s3://team-a/spin", secret=None)) == "CredentialsRequired"
    assert reason(LOCKED_DOWN, storage("file:///shared/spin", secret=None)) is None  # no S3, no identity

    policy = StoragePolicy(endpoints=("http://minio:9000/",), own_identity_prefixes=("s3://team-a/spin/",))
    assert reason(policy, storage("s3://team-a/spin", endpoint="http://minio:9000")) is None  # trailing / alike
    assert reason(policy, storage("s3://team-a/spin/run1", secret=None)) is None
    assert reason(policy, storage("s3://team-a", secret=None)) == "CredentialsRequired"
    assert reason(policy, storage("s3://team-a/spin-other", secret=None)) == "CredentialsRequired"  # not a prefix
    assert reason(policy, storage("s3://team-a-evil/spin", secret=None)) == "CredentialsRequired"


def test_a_process_that_may_no_longer_write_records_no_lineage(tmp_path: Path) -> None:
    """Lineage goes to S3, past the API client's write fence: a leader past its renew deadline asks first."""
    obj = api.load_defaulted({
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"model": "s3://b/base", "dataset": "s3://b/sft.jsonl", "iterations": 1,
                 "storage": {"uri": f"file://{tmp_path}"}}})
    run, step = api.parse(obj), planner.RecordStep(0, "generate", {"iteration": 0, "role": "generate"})
    store = lineage.FileStore(tmp_path / "store")
    leading = [False]
    reconciler = Reconciler(Kube(client.ApiClient()), Cache(), may_write=lambda: leading[0])
    with pytest.raises(RuntimeError, match="no longer a leader"):
        reconciler._record(run, obj, store, [step])
    assert not (tmp_path / "store").exists()
    leading[0] = True
    reconciler._record(run, obj, store, [step])
    assert lineage.load(store)[(0, "generate")]["role"] == "generate"
