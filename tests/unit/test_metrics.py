"""The request counter's resource label (leases, a fixed cost per controller, apart from the runs' own
requests), and the histograms as Prometheus reads them."""

import pytest

from spin_k8s.controller import metrics
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


def _series(name: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.render().splitlines()
            if line.startswith(name + "_")}


def test_a_histogram_counts_each_value_in_every_bucket_at_or_above_it() -> None:
    name = "spin_controller_queue_wait_seconds"
    before = _series(name)
    for seconds in (0.003, 0.2, 0.25, 100.0):
        metrics.observe(name, seconds)
    grown = {k: v - before.get(k, 0.0) for k, v in _series(name).items()}
    assert [grown[f'{name}_bucket{{le="{b}"}}'] for b in ("0.001", "0.005", "0.1", "0.25", "60.0", "+Inf")] == [
        0, 1, 1, 3, 3, 4]
    assert grown[f"{name}_count"] == 4
    assert grown[f"{name}_sum"] == pytest.approx(100.453)
    assert f"# TYPE {name} histogram" in metrics.render()
