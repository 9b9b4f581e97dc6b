"""Session fixtures: the real test control plane and S3 server, started once, stopped at the end;
a fresh namespace and a fresh bucket per test."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [n for n in tools.KUBE_COMMANDS if not tools.kube_binary(n).is_file()]
    if missing:  # a failure, not a skip: a run without the control plane must not look green
        pytest.fail(f"control-plane binaries missing ({', '.join(missing)}): run scripts/install")
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new namespace per test, with its default ServiceAccount in place (pods are refused before)."""
    core = client.CoreV1Api(api)
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        assert time.monotonic() < deadline, "the default ServiceAccount never appeared"
        time.sleep(0.1)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A new, empty bucket per test."""
    name = f"t-{secrets.token_hex(6)}"
    s3_server.client().create_bucket(Bucket=name)
    return name
