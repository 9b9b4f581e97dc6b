"""The real-node tier: what only a kubelet shows. Images built from images/ run as real containers; the chart's
controller runs in one under its ServiceAccount's projected token with its securityContext and probes enforced;
a 2-iteration SpinRun's generation pods and a 2-node training gang run in the worker images, the gang finding
its master through the real headless Service and CoreDNS, every pod on the bridge's subnet, lineage written to
S3 from inside the pods."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from support import Controllers, create_s3_secret, get_run, spin_run

from spin_k8s import api, lineage, manifests, naming
from spin_k8s.testing import node, tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.kubelet, pytest.mark.cluster, pytest.mark.s3]
ROOT = Path(__file__).parent.parent.parent
POD_SUBNET = ipaddress.ip_network(node.POD_SUBNET)
RESTRICTED = "pod-security.kubernetes.io/enforce"


def kubectl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.kube_binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
                          capture_output=True, text=True, check=False, timeout=120)


def finished_pod(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 120) -> client.V1Pod:
    def done() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_until(f"pod {name} to finish", done, timeout)


def test_the_node_is_a_kubelet_on_containerd_with_its_ip_on_the_bridge(real_api: client.ApiClient) -> None:
    (n,) = client.CoreV1Api(real_api).list_node().items
    info = n.status.node_info
    assert info.kubelet_version == tools.KUBERNETES_VERSION
    assert info.container_runtime_version.startswith("containerd://1.")
    assert {a.type: a.address for a in n.status.addresses}["InternalIP"] == node.NODE_IP
    assert any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)


@pytest.mark.parametrize("name", ["controller", "generate", "train"])
def test_each_image_starts_its_entrypoint(real_api: client.ApiClient, real_namespace: str,
                                          image_refs: dict[str, str], name: str) -> None:
    """The image's own ENTRYPOINT (and CMD, `--help` for the workers) in a container as the image's user."""
    core = client.CoreV1Api(real_api)
    container: dict[str, Any] = {"name": name, "image": image_refs[name], "imagePullPolicy": "Never"}
    if name == "controller":
        container["args"] = ["--help"]  # its CMD would start reconciling
    core.create_namespaced_pod(real_namespace, {"metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "containers": [container], "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True}}})
    pod = finished_pod(core, real_namespace, name, timeout=180)
    log = core.read_namespaced_pod_log(name, real_namespace)
    assert pod.status.phase == "Succeeded", log
    assert "usage:" in log.lower(), log
    module = {"controller": "spin_k8s.controller", "generate": "spin_k8s.workers.generate",
              "train": "spin_k8s.workers.train"}[name]
    assert module.rsplit(".", 1)[-1] in log, log


def test_pods_resolve_a_headless_service_through_coredns_and_nothing_else(
        real_cluster: Cluster, real_api: client.ApiClient, real_namespace: str, image_refs: dict[str, str]) -> None:
    """What a training gang needs: `{job}-0.{service}` resolves to that pod's IP on the bridge, through the
    headless Service; a name no Service backs does not resolve."""
    core, batch = client.CoreV1Api(real_api), client.BatchV1Api(real_api)
    ns = real_namespace
    core.create_namespaced_service(ns, {"metadata": {"name": "peers"}, "spec": {
        "clusterIP": "None", "selector": {"job-name": "server"}, "publishNotReadyAddresses": True}})
    batch.create_namespaced_job(ns, {"metadata": {"name": "server"}, "spec": {
        "completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0,
        "template": {"spec": {"subdomain": "peers", "restartPolicy": "Never", "containers": [{
            "name": "sleep", "image": image_refs["controller"], "imagePullPolicy": "Never",
            "command": ["python", "-c", "import time; time.sleep(600)"]}]}}}})
    server = wait_until("the server pod's IP", lambda: next(
        (p for p in core.list_namespaced_pod(ns, label_selector="job-name=server").items if p.status.pod_ip), None),
        120)
    assert ipaddress.ip_address(server.status.pod_ip) in POD_SUBNET
    probe = f"""
import json, socket
out = {{}}
for name in ["server-0.peers.{ns}.svc.cluster.local", "server-0.nosuch.{ns}.svc.cluster.local",
             "kubernetes.default.svc.cluster.local"]:
    try:
        out[name] = socket.gethostbyname(name)
    except OSError as e:
        out[name] = None
print(json.dumps(out))
"""
    core.create_namespaced_pod(ns, {"metadata": {"name": "client"}, "spec": {"restartPolicy": "Never",
        "containers": [{"name": "client", "image": image_refs["controller"], "imagePullPolicy": "Never",
                        "command": ["python", "-c", probe]}]}})
    pod = finished_pod(core, ns, "client")
    log = core.read_namespaced_pod_log("client", ns)
    assert pod.status.phase == "Succeeded", log
    answers = json.loads(log.strip().splitlines()[-1])
    assert answers == {f"server-0.peers.{ns}.svc.cluster.local": server.status.pod_ip,
                       f"server-0.nosuch.{ns}.svc.cluster.local": None,
                       "kubernetes.default.svc.cluster.local": node.KUBERNETES_SERVICE_IP}
    pod_resolv = kubectl(real_cluster, "exec", "-n", ns, server.metadata.name, "--", "cat", "/etc/resolv.conf")
    assert f"nameserver {node.DNS_SERVICE_IP}" in pod_resolv.stdout, pod_resolv.stderr


def upload(s3: S3Server, bucket: str, local: Path, prefix: str) -> str:
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        key = f"{prefix}/{path.relative_to(local).as_posix()}" if local.is_dir() else prefix
        s3.client().upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{prefix}"


def host_pid(cluster: Cluster, container_id: str) -> int:
    """The host PID of a container's process, as the node's containerd reports it."""
    assert cluster.node is not None
    tasks = subprocess.run(["ctr", f"--address={cluster.node.containerd_socket}", "--namespace=k8s.io", "tasks",
                            "ls"], capture_output=True, text=True, check=True).stdout
    cid = container_id.split("://", 1)[-1]
    (pid,) = [int(line.split()[1]) for line in tasks.splitlines() if line.split()[:1] == [cid]]
    return pid


def ready(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    pod = core.read_namespaced_pod(name, namespace)
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_chart_controller_in_a_container_runs_two_iterations_with_a_two_node_gang_in_a_restricted_namespace(
        real_cluster: Cluster, real_api: client.ApiClient, real_namespace: str, node_s3: S3Server,
        image_refs: dict[str, str], tmp_path: Path) -> None:
    core = client.CoreV1Api(real_api)
    ns = real_namespace
    # The restricted Pod Security Standard, enforced by the API server's admission: every pod of the run (the
    # controller's and the workers') must meet it, or its Job never gets a pod.
    core.patch_namespace(ns, {"metadata": {"labels": {RESTRICTED: "restricted"}}})
    repository, tag = image_refs["controller"].rsplit(":", 1)
    installed = subprocess.run([
        str(tools.helm_binary()), "--kubeconfig", str(real_cluster.kubeconfig), "--namespace", ns, "install", "spin",
        str(ROOT / "charts" / "spin"), "--wait", "--timeout", "180s", "--set", f"watchNamespace={ns}",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
        "--set", f"workerImages.generate={image_refs['generate']}",
        "--set", f"workerImages.train={image_refs['train']}",
        "--set", f"storage.allowedEndpoints={{{node_s3.endpoint}}}",
    ], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    (pod,) = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=controller").items
    name = pod.metadata.name
    assert pod.status.phase == "Running" and ready(core, ns, name)
    assert pod.spec.containers[0].image == image_refs["controller"]
    # In-cluster config: no kubeconfig, the ServiceAccount's projected token.
    assert not any("kubeconfig" in a for a in pod.spec.containers[0].args or [])
    assert any(v.projected for v in pod.spec.volumes if v.name.startswith("kube-api-access"))
    # The securityContext is enforced: a non-root uid and a read-only root filesystem.
    check = kubectl(real_cluster, "exec", "-n", ns, name, "--", "python", "-c",
                    "import os; print(os.getuid()); open('/written', 'w')")
    assert check.stdout.split()[0] == "65532", check.stderr
    assert "Read-only file system" in check.stderr
    # The readiness probe gates Ready: a frozen controller stops answering /healthz and leaves the Service.
    pid = host_pid(real_cluster, pod.status.container_statuses[0].container_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until("the frozen controller to turn unready", lambda: not ready(core, ns, name), 60)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until("the controller to be ready again", lambda: ready(core, ns, name), 60)

    bucket = "realnode"
    node_s3.client().create_bucket(Bucket=bucket)
    assets = tiny.create(tmp_path / "tiny", rows=16, seed=0)
    model = upload(node_s3, bucket, assets.model_dir, "inputs/model")
    dataset = upload(node_s3, bucket, assets.data_path, "inputs/sft.jsonl")
    create_s3_secret(real_api, ns, node_s3)
    body = spin_run("demo", assets, node_s3, bucket, model=model, dataset=dataset,
                    images={"pullPolicy": "Never"})
    body["spec"]["training"]["nodes"] = 2
    spec_file = tmp_path / "demo.yaml"
    spec_file.write_text(yaml.safe_dump(body))
    assert kubectl(real_cluster, "apply", "-n", ns, "-f", str(spec_file)).returncode == 0
    watch = Controllers(real_cluster, ns, tmp_path, node_s3)  # starts no controller: the chart's runs
    run = watch.wait_phase(real_api, "demo", "Succeeded", timeout=1200)
    assert [i["iteration"] for i in run["status"]["iterations"]] == [0, 1]

    pods = core.list_namespaced_pod(ns, label_selector=f"{naming.LABEL_RUN}=demo").items
    roles = sorted(p.metadata.labels.get(naming.LABEL_ROLE, "") for p in pods if p.status.phase == "Succeeded")
    assert roles.count(naming.TRAIN) == 4 and roles.count(naming.GENERATE) == 4, roles  # 2 iterations x 2 pods
    for p in pods:
        assert ipaddress.ip_address(p.status.pod_ip) in POD_SUBNET, (p.metadata.name, p.status.pod_ip)
        assert p.spec.containers[0].image in (image_refs["generate"], image_refs["train"])
    # The gang found its master by name through CoreDNS (its query log), at the index-0 pod's IP.
    coredns = core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items[0]
    dns_log = core.read_namespaced_pod_log(coredns.metadata.name, "kube-system")
    for item in run["status"]["iterations"]:
        master = f"{item['trainJob']}-0.{naming.service_name('demo')}.{ns}.svc.cluster.local."
        assert re.search(rf'"A IN {re.escape(master)} udp \d+ false \d+" NOERROR', dns_log), (master, dns_log[-2000:])
    # Lineage went to S3 from inside the pods: both iterations' records and the manifest.
    records = lineage.load(lineage.S3Store(node_s3.client(), bucket,
                                           f"spin/{ns}/demo/{run['metadata']['uid']}"))
    assert {(0, "generate"), (0, "train"), (1, "generate"), (1, "train")} <= set(records)
    assert get_run(real_api, ns, "demo")["status"]["phase"] == "Succeeded"


def probe_job(core: client.CoreV1Api, batch: client.BatchV1Api, ns: str, image: str,
              **spec: Any) -> dict[str, Any]:
    """The generation Job's own pod template (spin_k8s/manifests.py) for a one-shard CPU spec with ``spec`` added,
    its command replaced by PROBE, run to completion in ``ns``: PROBE's answers."""
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "probe", "namespace": ns},
            "spec": {"model": "s3://bk/m", "dataset": "s3://bk/d.jsonl", "iterations": 1, "storage": {"uri": "s3://bk/s"},
                     "generation": {"shards": 1, "gpusPerShard": 0},
                     "images": {"generate": image, "pullPolicy": "Never"}, **spec}}
    assert api.schema_errors(body) == [] and api.semantic_errors(api.load_defaulted(body)) == []
    job = manifests.generate_job(api.parse(api.load_defaulted(body)), "s3://bk/p", 0)
    job["metadata"].pop("ownerReferences")  # no SpinRun here to own it
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["command"], container["args"] = ["python", "-c", PROBE], []
    batch.create_namespaced_job(ns, job)
    pod = wait_until("the probe pod", lambda: next(iter(core.list_namespaced_pod(
        ns, label_selector=f"job-name={job['metadata']['name']}").items), None), 60)
    pod = finished_pod(core, ns, pod.metadata.name)
    log = core.read_namespaced_pod_log(pod.metadata.name, ns)
    assert pod.status.phase == "Succeeded", log
    answers: dict[str, Any] = json.loads(log)
    return answers


def test_a_worker_pod_gets_its_shm_size_a_scratch_volume_at_tmp_the_spec_s_env_and_volumes_and_no_token(
        real_api: client.ApiClient, real_namespace: str, image_refs: dict[str, str]) -> None:
    """In a namespace enforcing the restricted standard, what the kubelet made of the Job's volumes and
    securityContext, and of an env var and a ConfigMap volume the spec adds."""
    core, batch = client.CoreV1Api(real_api), client.BatchV1Api(real_api)
    ns = real_namespace
    core.patch_namespace(ns, {"metadata": {"labels": {RESTRICTED: "restricted"}}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "fabric"}, "data": {"topology.xml": "<system/>"}})
    answers = probe_job(core, batch, ns, image_refs["generate"], shmSize={"generate": "96Mi"},
                        env={"generate": [{"name": "NCCL_TOPO_FILE", "value": "/etc/nccl/topology.xml"}]},
                        volumes={"generate": [{"name": "nccl", "configMap": {"name": "fabric"}}]},
                        volumeMounts={"generate": [{"name": "nccl", "mountPath": "/etc/nccl", "readOnly": True}]})
    assert answers == {"uid": 65532, "shm_bytes": 96 << 20, "tmp_on_its_own_volume": True, "tmp_writable": True,
                       "token": False, "topology": "<system/>"}


def test_a_scratch_claim_gives_each_completion_index_its_own_directory(
        real_api: client.ApiClient, real_namespace: str, image_refs: dict[str, str], tmp_path: Path) -> None:
    """spec.scratchVolume.generate.persistentVolumeClaim: /tmp is the claim's subdirectory named by the pod's
    completion index. A hostPath PersistentVolume stands in for a cluster's storage; hostPath volumes get no
    fsGroup, so its directory is made writable for everyone here, as a storage driver's fsGroup would make it."""
    core, batch = client.CoreV1Api(real_api), client.BatchV1Api(real_api)
    ns = real_namespace
    core.patch_namespace(ns, {"metadata": {"labels": {RESTRICTED: "restricted"}}})
    disk = tmp_path / "disk"
    disk.mkdir()
    disk.chmod(0o777)
    pv = f"scratch-{secrets.token_hex(4)}"
    core.create_persistent_volume({"metadata": {"name": pv}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
        "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(disk), "type": "Directory"}}})
    try:
        core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "gen-scratch"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
            "resources": {"requests": {"storage": "1Gi"}}}})
        answers = probe_job(core, batch, ns, image_refs["generate"],
                            scratchVolume={"generate": {"persistentVolumeClaim": {"claimName": "gen-scratch"}}})
    finally:
        core.delete_persistent_volume(pv)
    assert answers["tmp_writable"] and answers["uid"] == 65532
    assert [p.relative_to(disk).as_posix() for p in sorted(disk.rglob("*"))] == ["0", "0/probe"]
    assert (disk / "0" / "probe").read_text() == "written"


# Runs in a worker's container: its uid, /dev/shm's size, whether /tmp is a volume (another device than the
# container's root filesystem) it can write, whether a service-account token was mounted, and the file that
# $NCCL_TOPO_FILE names, where there is one.
PROBE = """
import json, os
shm = os.statvfs("/dev/shm")
with open("/tmp/probe", "w") as f:
    f.write("written")
print(json.dumps({"uid": os.getuid(), "shm_bytes": shm.f_blocks * shm.f_frsize,
                  "tmp_on_its_own_volume": os.stat("/tmp").st_dev != os.stat("/").st_dev,
                  "tmp_writable": open("/tmp/probe").read() == "written",
                  "token": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
                  **({"topology": open(os.environ["NCCL_TOPO_FILE"]).read()} if "NCCL_TOPO_FILE" in os.environ
                     else {})}))
"""
