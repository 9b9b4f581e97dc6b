"""The real node of the test environment's second tier: containerd (CRI, runc, overlayfs), a CNI bridge with
host-local IPAM, a kubelet, kube-proxy in iptables mode and CoreDNS, all v1.36.3-era and built or installed
by ``scripts/install``. Pods run in real containers from images built here (spin_k8s/testing/images.py).

Network: the bridge ``spin-br0`` carries the node IP 10.233.0.1/24, which exists only inside this machine.
Pods get addresses from that subnet; the apiserver and the S3 server listen on the node IP (the kubelet's
firewall drops pod traffic to 127.0.0.0/8), and the ``kubernetes`` Service (10.96.0.1) leads there through
kube-proxy. CoreDNS answers for ``cluster.local`` only, from the Services and Endpoints it watches.

A node changes the machine beyond its directory: the bridge, iptables chains (kubelet's, kube-proxy's,
CNI's), network namespaces under /run/netns, cgroups named ``kubepods``, a few sysctls, containerd shims and
the propagation of ``/`` (made shared, as mount propagation into pods needs). So one real node runs per
machine (a lock), and everything it changed is written to a state file first: :meth:`RealNode.stop`
undoes it, and the next start undoes what a killed run left behind, so every run starts clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client, config

from spin_k8s.testing import images, pki, tools
from spin_k8s.testing.processes import Process, free_port, start_process, wait_until, write_kubeconfig

BRIDGE = "spin-br0"
NODE_IP = "10.233.0.1"
POD_SUBNET = "10.233.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # the first address of the apiserver's --service-cluster-ip-range
DNS_SERVICE_IP = "10.96.0.10"
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
STATE = Path("/run/spin-k8s/real-node.json")  # what the running node changed; survives a killed test run
LOCK = STATE.with_suffix(".lock")
KUBELET_PORT = 10250
# The kubelet sets these at every start (it expects a dedicated machine); they are put back after it starts.
KERNEL_TUNABLES = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
NETWORK_SYSCTLS = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}
# Chains made by the kubelet, kube-proxy and the CNI plugins; the sweep deletes them and every rule naming them.
OWN_CHAINS = re.compile(r"\b(KUBE-[\w-]+|CNI-[\w-]+)")


def sysctl(name: str, value: str | None = None) -> str:
    path = Path("/proc/sys") / name
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True)


def _sweep_iptables() -> None:
    """Delete the KUBE-*/CNI-* chains and every rule that names one, in every table, IPv4 and IPv6."""
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        dump = _run(save, check=False).stdout
        if not OWN_CHAINS.search(dump):
            continue
        kept = [line for line in dump.splitlines() if not OWN_CHAINS.search(line)]
        # A table whose last own chain is gone keeps only the built-in chains and foreign rules: restoring it
        # whole replaces exactly those tables that were dumped, nothing else on the machine.
        subprocess.run([restore], input="\n".join(kept) + "\n", text=True, check=True)


def kubepods_cgroups() -> list[Path]:
    found = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        found += sorted(hierarchy.glob("kubepods*"))
    return found


def _remove_cgroup(top: Path) -> None:
    """rmdir a cgroup tree, deepest first (cgroup directories cannot be removed with files in them)."""
    for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _unmount_under(root: Path) -> None:
    """Unmount everything mounted at or below ``root``, deepest first (pod volumes, the kubelet's bind mount,
    containerd's rootfs overlays)."""
    prefix = str(root.resolve())
    for _ in range(5):  # a mount can hide another at the same point
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        ours = sorted({m for m in mounts if m == prefix or m.startswith(prefix + "/")}, key=len, reverse=True)
        if not ours:
            return
        for target in ours:
            _run("umount", "--lazy", target, check=False)


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _shim_pids(socket_path: Path) -> list[int]:
    """containerd-shim processes of the containerd at ``socket_path`` (they outlive containerd by design)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv and b"containerd-shim" in argv[0] and str(socket_path).encode() in argv:
                    pids.append(int(proc.name))
    return pids


def sweep(state: dict[str, Any]) -> None:
    """Undo everything a node recorded in ``state``; each step tolerates what is already undone, so this is
    both the normal teardown and the clean-up after a killed run."""
    _kill_pids(state.get("pids", []))
    if sock := state.get("containerd_socket"):
        _kill_pids(_shim_pids(Path(sock)))
    if state.get("kube_proxy"):
        _run(str(tools.kube_binary("kube-proxy")), "--cleanup", check=False)
    _sweep_iptables()
    if root := state.get("root"):
        _unmount_under(Path(root))
        # The imported images and container layers (GiBs per node, and a test session starts several): a
        # later start imports afresh, and the logs stay.
        shutil.rmtree(Path(root) / "containerd" / "root", ignore_errors=True)
    # The pods' veths, deleted here rather than left to the kernel: a pod's network namespace, once unmounted
    # below, is destroyed asynchronously, and its veth with it, some time after this returns.
    ports = _run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout
    for port in re.findall(r"^\d+: ([^:@]+)", ports, re.M):
        _run("ip", "link", "delete", port, check=False)
    for netns in Path("/run/netns").glob("cni-*"):
        _run("umount", str(netns), check=False)
        netns.unlink(missing_ok=True)
    _run("ip", "link", "delete", BRIDGE, check=False)
    for cgroup in kubepods_cgroups():
        _remove_cgroup(cgroup)
    if not state.get("device_plugins_existed", True):
        shutil.rmtree("/var/lib/kubelet/device-plugins", ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/var/lib/kubelet").rmdir()
    for name, value in state.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            sysctl(name, value)
    if state.get("propagation") == "private":
        _run("mount", "--make-rprivate", "/", check=False)


@dataclass
class RealNode:
    """One real node in ``root``. :meth:`prepare` makes the network before the control plane starts (the
    apiserver listens on the node IP); :meth:`start` then brings up containerd, kubelet, kube-proxy and CoreDNS."""

    root: Path
    name: str
    image_names: tuple[str, ...] = images.RUNNABLE  # imported into containerd; pause and coredns always run
    processes: list[Process] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    lock: IO[str] | None = None  # the machine's real-node lock, held from prepare() to stop()
    images: dict[str, str] = field(default_factory=dict)  # name -> reference of each image imported

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    def _save(self) -> None:
        self.state["pids"] = [p.popen.pid for p in self.processes]
        STATE.write_text(json.dumps(self.state))

    def prepare(self) -> None:
        """Take the machine's real-node lock, clean up after a killed run, and make the bridge."""
        STATE.parent.mkdir(parents=True, exist_ok=True)
        self.lock = LOCK.open("w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another real node runs on this machine (lock {LOCK} held)") from None
        if STATE.exists():
            print("real node: cleaning up after a run that did not stop", file=sys.stderr)
            sweep(json.loads(STATE.read_text()))
            STATE.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        propagation = _run("findmnt", "--noheadings", "--output=PROPAGATION", "/").stdout.strip()
        self.state = {
            "root": str(self.root), "containerd_socket": str(self.containerd_socket), "kube_proxy": False,
            "device_plugins_existed": Path("/var/lib/kubelet/device-plugins").exists(),
            "sysctls": {name: sysctl(name) for name in (*NETWORK_SYSCTLS, *KERNEL_TUNABLES)},
            "propagation": propagation,
        }
        self._save()  # before the first change: whatever follows can be undone from here
        for name, value in NETWORK_SYSCTLS.items():
            sysctl(name, value)
        _run("mount", "--make-rshared", "/")  # volume mounts propagate into containers
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")

    def start(self, ca: pki.PKI, server: str, admin_kubeconfig: Path, logs: Path) -> None:
        """Start the node's servers and wait until the Node is Ready and cluster DNS answers."""
        started = time.monotonic()
        archives = images.build_all()
        catalogue = images.catalogue()
        self.images = {name: images.reference(catalogue[name], catalogue)
                       for name in {"pause", "coredns", *self.image_names}}
        self._start_containerd(logs)
        images.import_into(self.containerd_socket, {n: archives[n] for n in self.images})
        imported = _run("ctr", f"--address={self.containerd_socket}", "-n", "k8s.io", "images", "ls", "-q").stdout
        assert set(self.images.values()) <= set(imported.split()), "an image did not import"
        self._start_kubelet(ca, server, logs)
        api = config.new_client_from_config(config_file=str(admin_kubeconfig))
        core = client.CoreV1Api(api)

        wait_until("the kubelet's Node Ready", lambda: node_ready(core, self.name), 60, self.processes)
        for name in KERNEL_TUNABLES:
            sysctl(name, self.state["sysctls"][name])
        self._start_kube_proxy(ca, server, logs)
        self._start_coredns(core, admin_kubeconfig)
        print(f"real node up in {time.monotonic() - started:.1f}s", file=sys.stderr)

    def _start_containerd(self, logs: Path) -> None:
        base = self.root / "containerd"
        base.mkdir(parents=True, exist_ok=True)
        (self.root / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        cfg = base / "config.toml"
        cfg.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images['pause']}"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails ("can't get final child's PID").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{images.RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.root / 'cni' / 'net.d'}"
""")
        (self.root / "cni" / "net.d" / "10-spin.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "spin-pods",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.root / "cni" / "ipam"),
                          "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))
        self.processes.append(start_process("containerd", ["containerd", f"--config={cfg}"], logs))
        self._save()

        def serving() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.containerd_socket))
            return True

        wait_until("containerd's socket", serving, 30, self.processes)

    def _start_kubelet(self, ca: pki.PKI, server: str, logs: Path) -> None:
        kubelet = self.root / "kubelet"
        kubelet.mkdir(parents=True, exist_ok=True)
        cert = ca.client("kubelet", f"system:node:{self.name}", "system:nodes")
        serving = ca.server("kubelet-serving", [self.name], ips=(NODE_IP,))
        kubeconfig = write_kubeconfig(kubelet / "kubeconfig", server, ca.ca_cert_path, cert, "kubelet")
        # Pods that resolve through the node (dnsPolicy Default, CoreDNS itself) get this: no upstream exists.
        (kubelet / "resolv.conf").write_text(f"nameserver {DNS_SERVICE_IP}\n")
        cfg = kubelet / "config.yaml"
        cfg.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": KUBELET_PORT, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
            "tlsCertFile": str(serving.cert), "tlsPrivateKeyFile": str(serving.key),
            "authentication": {"x509": {"clientCAFile": str(ca.ca_cert_path)}, "webhook": {"enabled": True},
                               "anonymous": {"enabled": False}},
            "authorization": {"mode": "Webhook"},
            # This machine: cgroup v1 (hybrid), no systemd, swap not accounted.
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "clusterDomain": "cluster.local", "clusterDNS": [DNS_SERVICE_IP],
            "resolvConf": str(kubelet / "resolv.conf"),
            "volumePluginDir": str(kubelet / "volume-plugins"),
            # Images come only from the import; nothing may garbage-collect them or evict for a full disk.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": False, "registerNode": True, "rotateCertificates": False,
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s",
        }))
        self.processes.append(start_process("kubelet", [
            str(tools.kube_binary("kubelet")), f"--config={cfg}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={kubelet / 'root'}", f"--hostname-override={self.name}", f"--node-ip={NODE_IP}",
        ], logs))
        self._save()

    def _start_kube_proxy(self, ca: pki.PKI, server: str, logs: Path) -> None:
        proxy = self.root / "kube-proxy"
        proxy.mkdir(parents=True, exist_ok=True)
        cert = ca.client("kube-proxy", "system:kube-proxy")  # bound to system:node-proxier by default
        kubeconfig = write_kubeconfig(proxy / "kubeconfig", server, ca.ca_cert_path, cert, "kube-proxy")
        cfg = proxy / "config.yaml"
        cfg.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "mode": "iptables",
            "clusterCIDR": POD_SUBNET, "hostnameOverride": self.name,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # No conntrack sysctls to tune on this VM: leave the kernel's.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        self.state["kube_proxy"] = True
        self.processes.append(start_process("kube-proxy", [
            str(tools.kube_binary("kube-proxy")), f"--config={cfg}"], logs))
        self._save()

    def _start_coredns(self, core: client.CoreV1Api, admin_kubeconfig: Path) -> None:
        manifest = COREDNS.replace("IMAGE", self.images["coredns"]) \
                          .replace("DNS_SERVICE_IP", DNS_SERVICE_IP)
        subprocess.run([str(tools.kube_binary("kubectl")), f"--kubeconfig={admin_kubeconfig}", "apply", "-f", "-"],
                       input=manifest, text=True, check=True, capture_output=True)
        wait_until("CoreDNS Ready", lambda: _pod_ready(core, "kube-system", "k8s-app=kube-dns"), 90,
                   self.processes)

    def stop_processes(self) -> None:
        """Stop every process by PID, newest first (kube-proxy, the kubelet, then containerd with its
        containers: no kubelet is left to stop them)."""
        while self.processes:
            proc = self.processes.pop()
            if proc.name == "containerd":
                _stop_containers(self.containerd_socket)
            proc.stop()

    def stop(self) -> None:
        """Stop the processes, undo the machine changes recorded in the state file, release the lock."""
        self.stop_processes()
        if self.state:
            sweep(self.state)
            STATE.unlink(missing_ok=True)
            self.state = {}
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _stop_containers(address: Path) -> None:
    """Kill every container of containerd's CRI namespace (the kubelet that would stop them is gone)."""
    ctr = ["ctr", f"--address={address}", "--namespace=k8s.io"]
    for task in _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
        _run(*ctr, "tasks", "kill", "--signal=SIGKILL", task, check=False)
    deadline = time.monotonic() + 10
    while _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split() and time.monotonic() < deadline:
        for task in _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            _run(*ctr, "tasks", "delete", "--force", task, check=False)
        time.sleep(0.2)


def node_ready(core: client.CoreV1Api, name: str) -> bool:
    conditions = core.read_node(name).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _pod_ready(core: client.CoreV1Api, namespace: str, selector: str) -> bool:
    """Whether the selected pod is Ready; raises, with the container's reason and log, when it cannot be."""
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting
            if waiting and waiting.reason in {"CrashLoopBackOff", "ErrImageNeverPull", "CreateContainerError",
                                              "CreateContainerConfigError", "InvalidImageName"}:
                log = ""
                with contextlib.suppress(client.ApiException):
                    log = core.read_namespaced_pod_log(pod.metadata.name, namespace, previous=True, tail_lines=20)
                raise RuntimeError(f"{namespace}/{pod.metadata.name}: {waiting.reason}: {waiting.message}\n{log}")
        if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
            return True
    return False


# Cluster DNS: cluster.local from the API only (no upstream: nothing outside this machine may be asked); every
# query is logged, so a test can see which names pods looked up.
COREDNS = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        log
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 5
        }
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: coredns
        image: IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 1}
        livenessProbe: {httpGet: {path: /health, port: 8080}, periodSeconds: 10}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: DNS_SERVICE_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
"""
