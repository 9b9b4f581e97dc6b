"""The real-node tier's fixtures: one control plane with a real node (kubelet, containerd, pod network,
CoreDNS; spin_k8s/testing/node.py) and an S3 server on the node IP, and the images built from images/
(spin_k8s/testing/images.py). Per module, not per session: test_realnode.py is their only user, and the node's
servers then stop before the rest of the session runs instead of competing with it for the CPUs. Everything
here is what a kubelet enforces; orchestration is tested on the node agent's fast tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client, config
from support import install_crd, new_namespace

from spin_k8s.testing import node, tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [n for n in tools.KUBE_COMMANDS if not tools.kube_binary(n).is_file()]
    missing += [str(p) for p in (tools.coredns_binary(),) if not p.is_file()]
    if missing:  # a failure, not a skip: the tier must not look green without its node
        pytest.fail(f"real-node binaries missing ({', '.join(missing)}): run scripts/install")
    with Cluster(tmp_path_factory.mktemp("realnode"), real_node=True) as c:
        yield c


@pytest.fixture(scope="module")
def real_api(real_cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(real_cluster.kubeconfig))


@pytest.fixture(scope="module")
def real_crd(real_api: client.ApiClient) -> None:
    install_crd(real_api)


@pytest.fixture(scope="module")
def node_s3(real_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The S3 server on the node IP: pods reach it over the bridge, as they would a cluster's object store."""
    with S3Server(tmp_path_factory.mktemp("node-s3"), host=node.NODE_IP) as server:
        yield server


@pytest.fixture(scope="module")
def image_refs(real_cluster: Cluster) -> dict[str, str]:
    """name -> the reference the node's containerd knows each built image by."""
    assert real_cluster.node is not None
    return real_cluster.node.images


@pytest.fixture
def real_namespace(real_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    name = new_namespace(real_api, request.node.name)
    yield name
    client.CoreV1Api(real_api).delete_namespace(name)
