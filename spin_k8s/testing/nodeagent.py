"""The node agent: the test environment's stand-in for a kubelet.

It registers a Ready Node, renews the Node's Lease, and runs every pod bound to the Node as local processes:
the container's ``command`` + ``args`` (the image is ignored) with the container's environment (values,
downward-API fields such as the Job completion index, Secret and ConfigMap keys), in a per-pod working
directory, with each container's output in ``<pod dir>/<container>.log``. It reports Running, then
Succeeded or Failed with the real exit code, as a kubelet would, so the real Job and Deployment controllers
drive everything else.

Pod disks: as a container has its own /tmp, every pod gets its own temporary directory as ``TMPDIR`` (the
container's ``env`` may override it), linked from ``<pod dir>/tmp``. Its path is short, as a container's /tmp is
(unix sockets such as vLLM's live there and their paths may not exceed 107 bytes): ``/tmp/spin-node-*/<uid[:8]>``,
removed when the agent stops. Nothing is mounted over /tmp itself: pods read test
inputs from host paths such as ``file:///tmp/pytest-...``. Whatever honours TMPDIR (Python's ``tempfile``,
hence the workers' default cache) starts empty in a new pod and is never shared between pods, so a
restarted pod finds nothing a killed one left behind, as on a real cluster.

Termination messages, as a kubelet reports them in ``state.terminated.message``: the content of the container's
termination-message file (at most its last 4096 bytes), else, under ``terminationMessagePolicy:
FallbackToLogsOnError`` and a non-zero exit code, the last 80 lines (at most 2048 bytes) of the container's log.
A host process cannot write the container's ``terminationMessagePath`` (/dev/termination-log by default), so
the file is ``<pod dir>/<container>.termination-log``, created empty before each start as the kubelet does, and
named in the container's environment as ``$TERMINATION_MESSAGE_PATH``.

Pod networking: pod IPs are handed out from 10.244.0.0/16 as data only; nothing may connect to them. Each
pod runs in its own mount and UTS namespace (when ``unshare`` works) with the pod's hostname and an
``/etc/hosts`` that maps every pod hostname on this node (``{hostname}.{subdomain}[.{ns}.svc.cluster.local]``,
the names a headless Service gives) to 127.0.0.1. A training gang therefore rendezvouses through the same
names as on a real cluster, over loopback; two gangs using the same port at once would collide.

How a test makes a pod do something other than run its command (pod annotations):
- ``nodeagent.selfplay.dev/exit-code: "N"``: the containers are not started; the pod exits N at once.
- ``nodeagent.selfplay.dev/hang: "true"``: the containers are not started; the pod stays Running until
  it is deleted.
A container without ``command`` also stays Running until deleted (there is no image entrypoint to run).
Otherwise a pod fails by its command exiting non-zero (``sh -c "exit 3"``) and hangs by sleeping.

Run: ``python -m spin_k8s.testing.nodeagent --kubeconfig node.kubeconfig --root DIR --node NAME``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from spin_k8s import local
from spin_k8s.testing import podlogs

log = logging.getLogger("spin_k8s.nodeagent")

EXIT_CODE_ANNOTATION = "nodeagent.selfplay.dev/exit-code"
HANG_ANNOTATION = "nodeagent.selfplay.dev/hang"
LEASE_SECONDS = 40
RENEW_SECONDS = 10
# The only variables of the agent's own environment a pod sees: enough to find interpreters and keep
# numerical libraries working on this machine; nothing secret (AWS keys, kubeconfigs) leaks into pods.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TERMINATION_MESSAGE_ENV = "TERMINATION_MESSAGE_PATH"
# The kubelet's limits (pkg/kubelet/container): the file's last 4096 bytes, or the log's last 80 lines / 2048 bytes.
MESSAGE_FILE_BYTES, MESSAGE_LOG_LINES, MESSAGE_LOG_BYTES = 4096, 80, 2048
_POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class HostsFile:
    """One hosts file per node, shared by every pod through a bind mount.

    It is rewritten in place (same inode), so pods already running see names added after they started,
    e.g. a worker that starts before its master pod was bound.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        self._names: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        path.write_text(self._base)

    def add(self, uid: str, names: list[str]) -> None:
        with self._lock:
            self._names[uid] = names
            lines = [self._base.rstrip("\n"), "# pods on this node (loopback: pod IPs are data only)"]
            lines += [f"127.0.0.1\t{' '.join(n)}" for n in self._names.values() if n]
            with self.path.open("r+") as f:
                f.seek(0)
                f.write("\n".join(lines) + "\n")
                f.truncate()


def _pod_names(pod: client.V1Pod) -> list[str]:
    """The DNS names a pod has on a real cluster: hostname, and with a subdomain the headless-Service names."""
    spec, meta = pod.spec, pod.metadata
    hostname = spec.hostname or meta.name
    names = [hostname]
    if spec.subdomain:
        fq = f"{hostname}.{spec.subdomain}"
        ns = meta.namespace
        names += [fq, f"{fq}.{ns}", f"{fq}.{ns}.svc", f"{fq}.{ns}.svc.cluster.local"]
    return names


class PodRunner(threading.Thread):
    """Runs one pod to completion (or until deleted) and reports its status."""

    def __init__(self, agent: NodeAgent, pod: client.V1Pod, pod_ip: str) -> None:
        super().__init__(name=f"pod-{pod.metadata.name}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.pod_ip = pod_ip
        self.uid: str = pod.metadata.uid
        meta = pod.metadata
        self.dir = agent.root / "pods" / f"{meta.namespace}_{meta.name}_{self.uid[:8]}"
        self.tmp = agent.tmp_root / self.uid[:8]  # the pod's own /tmp, given to its containers as TMPDIR
        self.stopping = threading.Event()
        self.grace = 30.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_start: dict[str, int] = {}  # where each container's current run begins in its log
        self._lock = threading.Lock()
        self.kubeconfig: Path | None = None

    # -- environment -------------------------------------------------------------------------------
    def _field(self, path: str) -> str:
        meta = self.pod.metadata
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((getattr(meta, m.group(1)) or {}).get(m.group(2), ""))
        values = {
            "metadata.name": meta.name,
            "metadata.namespace": meta.namespace,
            "metadata.uid": meta.uid,
            "spec.nodeName": self.pod.spec.node_name,
            "spec.serviceAccountName": self.pod.spec.service_account_name or "",
            "status.hostIP": "127.0.0.1",
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
        }
        return str(values.get(path, ""))

    def _source(self, kind: str, name: str) -> dict[str, str]:
        ns = self.pod.metadata.namespace
        if kind == "secret":
            data = self.agent.core.read_namespaced_secret(name, ns).data or {}
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(self.agent.core.read_namespaced_config_map(name, ns).data or {})

    def _env(self, container: client.V1Container) -> dict[str, str]:
        env = {k: os.environ[k] for k in self.agent.passed_env if k in os.environ}
        env.update(
            HOSTNAME=self.pod.spec.hostname or self.pod.metadata.name,
            HOME=str(self.dir),
            TMPDIR=str(self.tmp),
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.agent.apiserver_port),
        )
        env[TERMINATION_MESSAGE_ENV] = str(self._message_file(container))
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        for source in container.env_from or []:
            ref = source.secret_ref or source.config_map_ref
            kind = "secret" if source.secret_ref else "configmap"
            try:
                values = self._source(kind, ref.name)
            except ApiException:
                if ref.optional:
                    continue
                raise
            env.update({(source.prefix or "") + k: v for k, v in values.items()})
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = local.expand(var.value or "", env)
                continue
            vf = var.value_from
            if vf.field_ref is not None:
                env[var.name] = self._field(vf.field_ref.field_path)
            elif vf.secret_key_ref is not None or vf.config_map_key_ref is not None:
                ref = vf.secret_key_ref or vf.config_map_key_ref
                try:
                    env[var.name] = self._source("secret" if vf.secret_key_ref else "configmap", ref.name)[ref.key]
                except (ApiException, KeyError):
                    if not ref.optional:
                        raise
            elif vf.resource_field_ref is not None:
                limits = (container.resources.limits or {}) if container.resources else {}
                env[var.name] = str(limits.get(vf.resource_field_ref.resource.split(".", 1)[-1], "0"))
        return env

    # -- processes ---------------------------------------------------------------------------------
    def _start(self, container: client.V1Container) -> subprocess.Popen[bytes] | None:
        if not container.command:
            return None
        env = self._env(container)
        self._message_file(container).write_bytes(b"")
        argv = [local.expand(a, env) for a in list(container.command) + list(container.args or [])]
        if self.agent.isolate:
            hostname = self.pod.spec.hostname or self.pod.metadata.name
            wrapper = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
            argv = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                    "/bin/sh", "-c", wrapper, str(self.agent.hosts.path), hostname[:63], *argv]
        # A pod's processes never outlive a killed agent (the parent-death signal survives exec).
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        logfile = (self.dir / f"{container.name}.log").open("ab")
        self._log_start[container.name] = logfile.tell()
        try:
            return subprocess.Popen(
                argv, cwd=self.dir, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as e:
            logfile.write(f"node agent: cannot start {argv[0]!r}: {e}\n".encode())
            return None
        finally:
            logfile.close()

    def _signal_all(self, sig: int) -> None:
        with self._lock:
            for proc in self._procs.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)

    def terminate(self, grace: float) -> None:
        """Deletion: SIGTERM now, SIGKILL after the grace period (done by :meth:`run`)."""
        self.grace = grace
        self.stopping.set()
        self._signal_all(signal.SIGTERM)

    def _wait(self, proc: subprocess.Popen[bytes] | None) -> int:
        """Wait for a process (or, without one, for deletion); the container's exit code."""
        deadline: float | None = None
        while True:
            if self.stopping.is_set() and deadline is None:
                deadline = time.monotonic() + self.grace
            if proc is None:
                if self.stopping.is_set():
                    return 137
                self.stopping.wait(0.5)
                continue
            code = proc.poll()
            if code is not None:
                return 128 - code if code < 0 else code
            if deadline is not None and time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)

    def _message_file(self, container: client.V1Container) -> Path:
        return self.dir / f"{container.name}.termination-log"

    def _message(self, container: client.V1Container, code: int) -> str:
        """The termination message of a container that exited ``code``, read as a kubelet reads it."""
        with contextlib.suppress(OSError), self._message_file(container).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - MESSAGE_FILE_BYTES))
            written = f.read()
            if written:
                return written.decode(errors="replace")
        if code == 0 or container.termination_message_policy != "FallbackToLogsOnError":
            return ""
        with contextlib.suppress(OSError), (self.dir / f"{container.name}.log").open("rb") as f:
            f.seek(self._log_start.get(container.name, 0))
            tail = b"".join(f.readlines()[-MESSAGE_LOG_LINES:])[-MESSAGE_LOG_BYTES:]
            return tail.decode(errors="replace")
        return ""

    # -- status ------------------------------------------------------------------------------------
    def _conditions(self, ready: bool, initialized: bool = True) -> list[dict[str, Any]]:
        now = _now().isoformat()
        flags = {"PodReadyToStartContainers": True, "Initialized": initialized,
                 "ContainersReady": ready, "Ready": ready}
        return [{"type": t, "status": "True" if v else "False", "lastTransitionTime": now}
                for t, v in flags.items()]

    def _report(self, status: dict[str, Any]) -> None:
        status.setdefault("hostIP", "127.0.0.1")
        status.setdefault("hostIPs", [{"ip": "127.0.0.1"}])
        status.setdefault("podIP", self.pod_ip)
        status.setdefault("podIPs", [{"ip": self.pod_ip}])
        meta = self.pod.metadata
        try:
            self.agent.core.patch_namespaced_pod_status(meta.name, meta.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:  # a pod deleted meanwhile has nothing left to report to
                raise

    @staticmethod
    def _state(code: int | None, started: str, finished: str | None = None, message: str = "") -> dict[str, Any]:
        if code is None:
            return {"running": {"startedAt": started}}
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        return {"terminated": terminated}

    def _container_status(self, c: client.V1Container, state: dict[str, Any], restarts: int = 0,
                          ready: bool = False) -> dict[str, Any]:
        return {"name": c.name, "image": c.image or "", "imageID": "", "ready": ready,
                "started": "running" in state, "restartCount": restarts, "state": state,
                "containerID": f"nodeagent://{self.uid}/{c.name}"}

    # -- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a pod the agent cannot run fails visibly instead of hanging
            log.exception("pod %s/%s", self.pod.metadata.namespace, self.pod.metadata.name)
            with contextlib.suppress(Exception):
                self._report({"phase": "Failed", "reason": "NodeAgentError", "message": str(e)[:500],
                              "conditions": self._conditions(False)})
        finally:
            self.agent.finished(self)

    def _run(self) -> None:
        spec, meta = self.pod.spec, self.pod.metadata
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").symlink_to(self.tmp)
        annotations = meta.annotations or {}
        start = _now().isoformat()
        scripted = annotations.get(EXIT_CODE_ANNOTATION)
        simulated = scripted is not None or annotations.get(HANG_ANNOTATION) == "true"
        # A simulated pod starts no process, so it needs no token (a TokenRequest, and the wait for the Node
        # authorizer to see the binding, per pod: the scale bench runs thousands).
        if (self.agent.pod_kubeconfig is not None and spec.automount_service_account_token is not False
                and not simulated):
            self.kubeconfig = self.agent.pod_kubeconfig(self)
        self._report({"phase": "Pending", "startTime": start, "conditions": self._conditions(False, False)})

        if simulated:
            self._report({"phase": "Running", "conditions": self._conditions(True),
                          "containerStatuses": [self._container_status(c, self._state(None, start), ready=True)
                                                for c in spec.containers]})
            code = int(scripted) if scripted is not None else self._wait(None)
            self._finish(spec.containers, dict.fromkeys((c.name for c in spec.containers), code), start)
            return

        init_statuses = []
        for c in spec.init_containers or []:
            code = self._wait(self._register(c))
            init_statuses.append(self._container_status(c, self._state(code, start, _now().isoformat())))
            if code != 0:
                self._report({"phase": "Failed", "reason": "InitContainerFailed",
                              "initContainerStatuses": init_statuses, "conditions": self._conditions(False, False)})
                return

        restarts = dict.fromkeys((c.name for c in spec.containers), 0)
        procs = {c.name: self._register(c) for c in spec.containers}
        self._report({"phase": "Running", "conditions": self._conditions(True),
                      "initContainerStatuses": init_statuses,
                      "containerStatuses": [self._container_status(c, self._state(None, start), ready=True)
                                            for c in spec.containers]})
        policy = spec.restart_policy or "Always"
        codes: dict[str, int] = {}
        pending = list(spec.containers)
        while pending:
            done = [c for c in pending if (p := procs[c.name]) is not None and p.poll() is not None]
            if self.stopping.is_set() or not done:
                if self.stopping.is_set():
                    for c in pending:
                        codes[c.name] = self._wait(procs[c.name])
                    break
                time.sleep(0.05)
                continue
            for c in done:
                code = self._wait(procs[c.name])
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    restarts[c.name] += 1
                    log.info("restarting %s/%s (exit %d)", meta.name, c.name, code)
                    self.stopping.wait(min(10.0, 0.5 * 2 ** restarts[c.name]))
                    if not self.stopping.is_set():
                        procs[c.name] = self._register(c)
                        continue
                codes[c.name] = code
                pending.remove(c)
        self._finish(spec.containers, codes, start, restarts)

    def _register(self, c: client.V1Container) -> subprocess.Popen[bytes] | None:
        proc = self._start(c)
        if proc is not None:
            with self._lock:
                self._procs[c.name] = proc
        return proc

    def _finish(self, containers: list[client.V1Container], codes: dict[str, int], start: str,
                restarts: dict[str, int] | None = None) -> None:
        if self.stopping.is_set():
            return  # deleted: the agent removes the pod object; a terminal status would only race with that
        end = _now().isoformat()
        ok = all(code == 0 for code in codes.values())
        self._report({
            "phase": "Succeeded" if ok else "Failed",
            "conditions": self._conditions(False),
            "containerStatuses": [
                self._container_status(c, self._state(code, start, end, self._message(c, code)),
                                       (restarts or {}).get(c.name, 0))
                for c in containers for code in [codes.get(c.name, 137)]
            ],
        })


class NodeAgent:
    """Registers one Node and runs the pods bound to it until :meth:`stop`."""

    def __init__(self, api: client.ApiClient, node_name: str, root: Path, apiserver_port: int,
                 capacity: dict[str, str] | None = None, passed_env: tuple[str, ...] = PASSED_ENV) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.node_name = node_name
        self.root = root
        self.apiserver_port = apiserver_port
        self.capacity = {"cpu": "64", "memory": "256Gi", "pods": "1100", "nvidia.com/gpu": "16",
                         "ephemeral-storage": "500Gi", **(capacity or {})}
        self.passed_env = passed_env
        self.pod_kubeconfig: Any = None
        self.kubelet_port = 0  # where the apiserver reads container logs (podlogs.LogServer); 0: not served
        self.hosts = HostsFile(root / "hosts")
        self.tmp_root = Path(tempfile.mkdtemp(prefix="spin-node-"))
        self.isolate = _can_isolate()
        self._runners: dict[str, PodRunner] = {}
        self._done: set[str] = set()
        self._ips = (str(ip) for ip in itertools.islice(_POD_NETWORK.hosts(), 2, None))
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name,
                             "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64"}}}
        try:
            self.core.create_node(node)
        except ApiException as e:
            if e.status != 409:
                raise
        now = _now().isoformat()
        self.core.patch_node_status(self.node_name, {"status": {
            "capacity": self.capacity, "allocatable": self.capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "NodeAgentReady", "message": "spin-k8s node agent",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                *({"type": t, "status": "False", "reason": "NodeAgent", "lastHeartbeatTime": now,
                   "lastTransitionTime": now} for t in ("MemoryPressure", "DiskPressure", "PIDPressure")),
            ],
            "nodeInfo": {"kubeletVersion": "v0.0.0-spin-k8s-nodeagent", "containerRuntimeVersion": "process://",
                         "operatingSystem": "linux", "architecture": "amd64", "osImage": "spin-k8s",
                         "kernelVersion": os.uname().release, "machineID": "", "systemUUID": "", "bootID": "",
                         "kubeProxyVersion": ""},
        }})

    def _renew_lease(self) -> None:
        ns = "kube-node-lease"
        while not self._stop.is_set():
            body = {"metadata": {"name": self.node_name},
                    "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_SECONDS,
                             "renewTime": _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
            try:
                try:
                    self.coordination.patch_namespaced_lease(self.node_name, ns, body)
                except ApiException as e:
                    if e.status != 404:
                        raise
                    self.coordination.create_namespaced_lease(ns, body)
            except Exception:
                log.exception("lease renewal")
            self._stop.wait(RENEW_SECONDS)

    def running(self, pod_dir: Path) -> bool:
        """Whether the pod whose working directory is ``pod_dir`` still has a runner."""
        with self._lock:
            return any(r.dir == pod_dir for r in self._runners.values())

    def finished(self, runner: PodRunner) -> None:
        with self._lock:
            self._runners.pop(runner.uid, None)
            self._done.add(runner.uid)
        if runner.stopping.is_set():
            self._delete(runner.pod)

    def _delete(self, pod: client.V1Pod) -> None:
        meta = pod.metadata
        body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta.uid))
        try:
            self.core.delete_namespaced_pod(meta.name, meta.namespace, body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def _handle(self, kind: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        with self._lock:
            runner = self._runners.get(uid)
            done = uid in self._done
        if kind == "DELETED":
            if runner:
                runner.terminate(0)
            return
        if pod.metadata.deletion_timestamp is not None:
            if runner:
                runner.terminate(float(pod.metadata.deletion_grace_period_seconds or 0))
            elif not done or pod.status.phase in ("Succeeded", "Failed", "Pending", None):
                self._delete(pod)
            return
        if runner or done or pod.status.phase in ("Succeeded", "Failed"):
            return
        if pod.status.phase == "Running":
            # Running under an earlier agent: its processes died with that agent.
            self._done.add(uid)
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": {
                "phase": "Failed", "reason": "NodeAgentRestarted", "message": "the node agent restarted"}})
            return
        # Names go into the hosts file before any process starts, so a gang's peers resolve each other.
        self.hosts.add(uid, _pod_names(pod))
        with self._lock:
            runner = PodRunner(self, pod, next(self._ips))
            self._runners[uid] = runner
        runner.start()

    def run(self) -> None:
        """Register, then watch this node's pods until :meth:`stop` (relisting after a 410)."""
        self.register()
        threading.Thread(target=self._renew_lease, name="lease", daemon=True).start()
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for pod in listed.items:
                    self._handle("ADDED", pod)
                rv = listed.metadata.resource_version
                w = watch.Watch()
                for event in w.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                      resource_version=rv, timeout_seconds=30, allow_watch_bookmarks=True):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._handle(event["type"], event["object"])
            except ApiException as e:
                if e.status != 410:
                    log.warning("pod watch: %s", e.reason)
                    self._stop.wait(1)
            except Exception:
                if not self._stop.is_set():
                    log.exception("pod watch")
                    self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.terminate(2)
        for r in runners:
            r.join(timeout=5)
        shutil.rmtree(self.tmp_root, ignore_errors=True)


def _can_isolate() -> bool:
    """Whether pods can get their own mount and UTS namespaces (root with unshare available)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--uts", "--", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True, help="the node's kubeconfig (user system:node:NAME)")
    parser.add_argument("--node", required=True, help="the Node name to register")
    parser.add_argument("--root", required=True, type=Path, help="directory for pod working dirs and logs")
    parser.add_argument("--apiserver-port", type=int, required=True, help="given to pods as KUBERNETES_SERVICE_PORT")
    parser.add_argument("--ca", type=Path, help="CA certificate written into pods' service-account kubeconfigs")
    parser.add_argument("--serving-cert", type=Path, help="TLS certificate of the container-log endpoint")
    parser.add_argument("--serving-key", type=Path, help="its key; with --serving-cert and --ca, logs are served")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    configuration = client.Configuration()
    config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    # Every pod's runner reports through this client: a pool smaller than the runners at once (the default is
    # 5 per CPU) discards a connection after each request, and the next pays a new TLS handshake.
    configuration.connection_pool_maxsize = 128
    api = client.ApiClient(configuration)
    args.root.mkdir(parents=True, exist_ok=True)
    agent = NodeAgent(api, args.node, args.root, args.apiserver_port)
    if args.ca is not None:
        agent.pod_kubeconfig = _service_account_kubeconfig(agent, args.ca)
    if args.ca is not None and args.serving_cert is not None and args.serving_key is not None:
        logs = podlogs.LogServer(args.root / "pods", agent.running, args.serving_cert, args.serving_key, args.ca)
        logs.start()
        agent.kubelet_port = logs.port
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    log.info("node %s: isolation=%s", args.node, agent.isolate)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.stop()


def _service_account_kubeconfig(agent: NodeAgent, ca: Path) -> Any:
    """The agent's counterpart of the projected service-account volume: a kubeconfig with a bound token."""

    def make(runner: PodRunner) -> Path:
        pod = runner.pod
        sa = pod.spec.service_account_name or "default"
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=24 * 3600,
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1",
                                                           name=pod.metadata.name, uid=pod.metadata.uid)))
        for attempt in range(50):
            try:
                response = agent.core.create_namespaced_service_account_token(sa, pod.metadata.namespace, request)
                break
            except ApiException as e:
                # The Node authorizer learns of a new binding a moment after the pod reaches us, as a kubelet
                # also finds: until then the request is refused, so wait as the kubelet does.
                if e.status != 403 or attempt == 49:
                    raise
                time.sleep(0.1)
        token = response.status.token
        path = runner.dir / "serviceaccount.kubeconfig"
        server = f"https://127.0.0.1:{agent.apiserver_port}"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: local, cluster: {{server: '{server}', certificate-authority: '{ca}'}}}}]\n"
            f"users: [{{name: sa, user: {{token: '{token}'}}}}]\n"
            f"contexts: [{{name: sa, context: {{cluster: local, user: sa, namespace: '{pod.metadata.namespace}'}}}}]\n"
            "current-context: sa\n"
        )
        path.chmod(0o600)
        return path

    return make


if __name__ == "__main__":
    main()
