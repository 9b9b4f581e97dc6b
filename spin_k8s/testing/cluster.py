"""Starts and stops the real test control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node agent, all on 127.0.0.1 with a throwaway PKI and RBAC on.

Everything lives in one directory (certificates, kubeconfigs, etcd data, logs in ``logs/``, pod working
dirs in ``node/``). Processes are stopped by PID in reverse order, etcd last: an apiserver whose etcd is
gone hangs on shutdown.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from kubernetes import client, config

from spin_k8s.testing import images, pki, tools
from spin_k8s.testing.node import KUBERNETES_SERVICE_IP, NODE_IP, RealNode, node_ready
from spin_k8s.testing.processes import Process, free_port, start_process, wait_until, write_kubeconfig

T = TypeVar("T")
NODE_NAME = "spin-node-0"
_CONTROLLERS = "*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle-controller," \
               "-persistentvolume-attach-detach-controller"


@dataclass
class Cluster:
    """A control plane and one node in ``root``. Use as a context manager, or call start() / stop()."""

    root: Path
    node_name: str = NODE_NAME
    # A real node (kubelet, containerd, pod network, CoreDNS: spin_k8s/testing/node.py) instead of the agent.
    real_node: bool = False
    node_images: tuple[str, ...] = images.RUNNABLE  # what a real node imports (GiBs: import only what runs)
    processes: list[Process] = field(default_factory=list)
    apiserver_port: int = 0
    node: RealNode | None = None

    @property
    def host(self) -> str:
        """Where the apiserver listens: loopback, or the node IP that pods can reach on a real node."""
        return NODE_IP if self.real_node else "127.0.0.1"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user in system:masters) for tests and kubectl."""
        return self.root / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def node_root(self) -> Path:
        """Where the node agent keeps pod working directories and logs."""
        return self.root / "node"

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """A container's output as the node agent captured it."""
        (log,) = (self.node_root / "pods").glob(f"{namespace}_{pod}_*/{container}.log")
        return log.read_text()

    def _https_ok(self, url: str, cert: pki.ClientCert | None = None, verify: bool = True) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.crt"))
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(cert.cert, cert.key)
        with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
            return bool(r.status == 200)

    def start(self) -> Cluster:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        logs = self.root / "logs"
        if self.real_node:
            self.node = RealNode(self.root / "node", self.node_name, self.node_images)
            try:
                self.node.prepare()  # the node IP, before the apiserver binds it
            except BaseException:
                self.stop()
                raise
        ca = pki.PKI(self.root / "pki")
        sa_key, sa_pub = ca.service_account_keys()
        serving = ca.server("apiserver", ["localhost", "kubernetes", "kubernetes.default",
                                          "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"],
                            ips=(NODE_IP, KUBERNETES_SERVICE_IP) if self.real_node else ())
        admin = ca.client("admin", "spin-test-admin", "system:masters")
        kcm = ca.client("controller-manager", "system:kube-controller-manager")
        sched = ca.client("scheduler", "system:kube-scheduler")
        node = ca.client("node", f"system:node:{self.node_name}", "system:nodes")
        kubelet_client = ca.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        node_serving = ca.server("node-agent", ["localhost", self.node_name])

        etcd_port, etcd_peer, self.apiserver_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        self.processes.append(start_process("etcd", [
            str(tools.etcd_binary()), "--name=default", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
            "--quota-backend-bytes=8589934592",  # 8 GiB, not 2: the scale bench keeps 10,000 Jobs and their pods
        ], logs))
        try:
            self._start_control_plane(ca, etcd_url, serving, sa_key, sa_pub, admin, kcm, sched, node, logs,
                                      kubelet_client, node_serving)
        except BaseException:
            self.stop()
            raise
        print(f"cluster up in {time.monotonic() - started:.1f}s: {self.server}", file=sys.stderr)
        return self

    def _start_control_plane(self, ca: pki.PKI, etcd_url: str, serving: pki.ClientCert, sa_key: Path,
                             sa_pub: Path, admin: pki.ClientCert, kcm: pki.ClientCert,
                             sched: pki.ClientCert, node: pki.ClientCert, logs: Path,
                             kubelet_client: pki.ClientCert, node_serving: pki.ClientCert) -> None:
        ca_file = ca.ca_cert_path
        wait_until("etcd", lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=1).status == 200,
                   30, self.processes)
        self.processes.append(start_process("kube-apiserver", [
            str(tools.kube_binary("kube-apiserver")), f"--etcd-servers={etcd_url}",
            f"--bind-address={self.host}", f"--advertise-address={self.host}", f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca_file}", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # The `kubernetes` Service's endpoint is this apiserver only where pods can reach it.
            f"--endpoint-reconciler-type={'lease' if self.real_node else 'none'}",
            "--allow-privileged=true", "--profiling=false", f"--cert-dir={self.root / 'apiserver-certs'}",
            "--kubelet-preferred-address-types=InternalIP", f"--kubelet-certificate-authority={ca_file}",
            f"--kubelet-client-certificate={kubelet_client.cert}", f"--kubelet-client-key={kubelet_client.key}",
        ], logs))
        wait_until("kube-apiserver /readyz", lambda: self._https_ok(f"{self.server}/readyz", admin), 60,
                   self.processes)
        write_kubeconfig(self.kubeconfig, self.server, ca_file, admin, "admin")
        kcm_config = write_kubeconfig(self.root / "controller-manager.kubeconfig", self.server, ca_file, kcm, "kcm")
        sched_config = write_kubeconfig(self.root / "scheduler.kubeconfig", self.server, ca_file, sched, "scheduler")
        node_config = write_kubeconfig(self.root / "node.kubeconfig", self.server, ca_file, node, "node")
        kcm_port, sched_port = free_port(), free_port()
        self.processes.append(start_process("kube-controller-manager", [
            str(tools.kube_binary("kube-controller-manager")), f"--kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", f"--cert-dir={self.root / 'kcm-certs'}",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={ca_file}",
            "--use-service-account-credentials=true", f"--controllers={_CONTROLLERS}", "--leader-elect=false",
            "--concurrent-job-syncs=10", "--node-monitor-grace-period=60s",
            # Client rate limits far above the defaults (20 qps, burst 30, per controller): a few hundred Jobs at
            # once would otherwise wait on the Job controller's own token bucket (pod creates, finalizer removals,
            # status writes: ~5 requests a Job), and the bench would measure that bucket, not this project.
            "--kube-api-qps=500", "--kube-api-burst=1000",
        ], logs))
        self.processes.append(start_process("kube-scheduler", [
            str(tools.kube_binary("kube-scheduler")), f"--kubeconfig={sched_config}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={self.root / 'sched-certs'}",
            "--leader-elect=false",
            "--kube-api-qps=500", "--kube-api-burst=1000",  # bindings, for the same reason (default 50, 100)
        ], logs))
        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        core = client.CoreV1Api(api)
        if self.node is not None:
            self.node.start(ca, self.server, self.kubeconfig, logs)
        else:
            self._start_node_agent(core, node_config, node_serving, ca_file, logs)
        wait_until("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", "default"),
                   60, self.processes)
        wait_until("kube-scheduler /healthz",
                   lambda: self._https_ok(f"https://127.0.0.1:{sched_port}/healthz", verify=False), 30,
                   self.processes)

    def _start_node_agent(self, core: client.CoreV1Api, node_config: Path, node_serving: pki.ClientCert,
                          ca_file: Path, logs: Path) -> None:
        # Pods find this interpreter's tools (python, torchrun) first, as an image would ship them.
        agent_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.processes.append(start_process("node-agent", [
            sys.executable, "-m", "spin_k8s.testing.nodeagent", f"--kubeconfig={node_config}",
            f"--node={self.node_name}", f"--root={self.node_root}",
            f"--apiserver-port={self.apiserver_port}", f"--ca={ca_file}",
            f"--serving-cert={node_serving.cert}", f"--serving-key={node_serving.key}",
        ], logs, agent_env))

        wait_until("the node agent's Ready node", lambda: node_ready(core, self.node_name), 60, self.processes)

    def stop(self) -> None:
        """Stop every process by PID, the node first, then the control plane newest first, so etcd (the first)
        goes last; a real node's machine changes are undone last of all."""
        if self.node is not None:
            self.node.stop_processes()
        while self.processes:
            self.processes.pop().stop()
        if self.node is not None:
            self.node.stop()
            self.node = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
