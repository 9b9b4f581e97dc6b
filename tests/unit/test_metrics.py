"""The request counter's resource label: leases (a fixed cost per controller) apart from the runs' own requests."""

import pytest

from spin_k8s.controller.metrics import resource_of


@pytest.mark.parametrize(("url", "resource"), [
    ("https://127.0.0.1:6443/apis/batch/v1/namespaces/team/jobs/demo-i0-gen/status", "jobs"),
    ("https://127.0.0.1:6443/api/v1/namespaces/team/events", "events"),
    ("https://127.0.0.1:6443/api/v1/namespaces/team/secrets/s3", "secrets"),
    ("https://127.0.0.1:6443/api/v1/namespaces/team", "namespaces"),
    ("https://127.0.0.1:6443/apis/coordination.k8s.io/v1/namespaces/spin/leases/spin-controller", "leases"),
    ("https://127.0.0.1:6443/apis/selfplay.dev/v1alpha1/spinruntimes/default", "spinruntimes"),
    ("https://127.0.0.1:6443/apis/selfplay.dev/v1alpha1/spinruns?watch=true&resourceVersion=5", "spinruns"),
])
def test_the_resource_of_an_api_url(url: str, resource: str) -> None:
    assert resource_of(url) == resource
