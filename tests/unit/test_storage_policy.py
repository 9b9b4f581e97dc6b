"""Which storage a tenant's SpinRun may make the controller reach (chart values storage.*)."""

from __future__ import annotations

from spin_k8s import api
from spin_k8s.controller.reconcile import LOCKED_DOWN, StoragePolicy


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
