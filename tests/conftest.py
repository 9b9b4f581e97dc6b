"""Session fixtures: the real test control plane and S3 server, started once, stopped at the end; the SpinRun
CRD and the tiny model; one finished 2-iteration reference run shared by every test that only inspects a
finished run or compares its own lineage with it; a fresh namespace and a fresh bucket per test."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from support import (
    Controllers,
    FinishedRun,
    create_s3_secret,
    get_run,
    install_crd,
    jobs_by_name,
    manifest,
    new_namespace,
    reference_spec,
    run_store,
    spinctl_until_exit,
)

from spin_k8s import lineage
from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

# Tests interrupt children with SIGINT (Ctrl-C) and expect what a terminal user sees. A shell without job control
# starts background commands with SIGINT ignored, and an ignored signal stays ignored across exec: the children
# would never see it. A handler does not survive exec, so with Python's own handler here they get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    name = new_namespace(api, request.node.name)
    yield name
    client.CoreV1Api(api).delete_namespace(name)


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


@pytest.fixture(scope="session")
def crd(api: client.ApiClient) -> None:
    install_crd(api)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyAssets:
    return tiny.create(tmp_path_factory.mktemp("tiny"), rows=16, seed=0)


@pytest.fixture
def controllers(cluster: Cluster, namespace: str, s3_server: S3Server, tmp_path: Path) -> Iterator[Controllers]:
    c = Controllers(cluster, namespace, tmp_path, s3_server)
    yield c
    c.stop()


@pytest.fixture
def s3_secret(api: client.ApiClient, namespace: str, s3_server: S3Server) -> str:
    return create_s3_secret(api, namespace, s3_server)


@pytest.fixture(scope="session")
def reference(cluster: Cluster, api: client.ApiClient, crd: None, s3_server: S3Server, assets: tiny.TinyAssets,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    """The reference run: `spinctl start -f --wait` of the tiny 2-iteration run, reconciled by one
    uninterrupted controller, to the end. Its namespace stays for the whole session."""
    workdir = tmp_path_factory.mktemp("reference")
    ns = new_namespace(api, "reference")
    bucket = f"ref-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=bucket)
    create_s3_secret(api, ns, s3_server)
    spec_file = workdir / "demo.yaml"
    spec_file.write_text(yaml.safe_dump(reference_spec("demo", assets, s3_server, bucket)))
    controllers = Controllers(cluster, ns, workdir, s3_server)
    controllers.start()
    try:
        code, output = spinctl_until_exit(controllers, "start", "-f", str(spec_file), "--wait", "--timeout", "900")
    finally:
        controllers.stop()
    run = get_run(api, ns, "demo")
    store = run_store(s3_server, bucket, run)
    yield FinishedRun(namespace=ns, name="demo", bucket=bucket, run=run, output=output, exit_code=code,
                      steps=lineage.load(store), manifest=manifest(store), jobs=jobs_by_name(api, ns, "demo"))
    client.CoreV1Api(api).delete_namespace(ns)
