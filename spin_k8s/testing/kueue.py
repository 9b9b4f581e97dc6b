"""A real Kueue (the binary and CRDs spin_k8s.testing.tools builds from its Go module) for one test cluster:
its CRDs, its manager process on loopback, and the queues a test asks for.

What differs from a production install, and why: Kueue's admission webhooks are not registered. Its own
certificate management names the webhook Service's DNS name, which an apiserver here could only reach through
a Service IP routed by kube-proxy; registered with a loopback URL instead, every call would fail TLS. So Jobs
must be created suspended, which the SpinRun controller does for runs with a queueName (the webhook would
suspend them otherwise). The conversion webhooks of the CRDs Kueue serves in two versions point at the
manager on loopback (Kueue's certificate rotator requires them to exist); nothing here reads the older version,
so they are never called. Everything else (the Job integration's reconciler, Workloads, quota, admission,
deactivation, manageJobsWithoutQueueName) is Kueue's own code.
"""

from __future__ import annotations

import base64
import functools
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from spin_k8s.testing import tools
from spin_k8s.testing.processes import Process, free_port, start_process, wait_until

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
NAMESPACE = "kueue-system"
# The namespaces Kueue manages (a test's own, labelled): there it also manages Jobs without a queue name, as a
# cluster with manageJobsWithoutQueueName does; the rest of the test cluster is left alone.
MANAGED_LABEL = "spin-test/kueue-managed"
# The CRDs whose conversion webhook Kueue's certificate rotator fills in (pkg/util/cert in Kueue).
_CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")


@dataclass
class Kueue:
    """Kueue running against the cluster whose admin kubeconfig is ``kubeconfig``; logs and certs in ``root``."""

    root: Path
    kubeconfig: Path
    process: Process | None = None
    api: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api = config.new_client_from_config(config_file=str(self.kubeconfig))

    def start(self) -> Kueue:
        webhook, health = free_port(), free_port()
        self._install_crds(webhook)
        core, admission = client.CoreV1Api(self.api), client.AdmissionregistrationV1Api(self.api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        # The rotator fills this Secret (Kueue's manifests ship it empty) and Kueue serves from its copy in certs/.
        core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "kueue-webhook-server-cert"}})
        # Empty: the rotator injects its CA into each of their webhooks (none), and is then ready.
        admission.create_validating_webhook_configuration(
            {"metadata": {"name": "kueue-validating-webhook-configuration"}, "webhooks": []})
        admission.create_mutating_webhook_configuration(
            {"metadata": {"name": "kueue-mutating-webhook-configuration"}, "webhooks": []})
        self.root.mkdir(parents=True, exist_ok=True)
        settings = self.root / "kueue-config.yaml"
        settings.write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook, "certDir": str(self.root / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": True, "webhookServiceName": "kueue-webhook-service",
                                       "webhookSecretName": "kueue-webhook-server-cert"},
            "manageJobsWithoutQueueName": True,
            "managedJobsNamespaceSelector": {"matchLabels": {MANAGED_LABEL: "true"}},
            "integrations": {"frameworks": ["batch/job"]},
        }))
        self.process = start_process(
            "kueue", [str(tools.kueue_binary()), f"--config={settings}", "--feature-gates=VisibilityOnDemand=false"],
            self.root / "logs", env={"KUBECONFIG": str(self.kubeconfig), "PATH": "/usr/bin:/bin"})
        # What a kubelet does with the Secret volume of Kueue's Deployment: the certificates the rotator wrote
        # into the Secret become files in certDir, where the rotator and the webhook server look for them.
        def filled() -> dict[str, str]:
            data: dict[str, str] = core.read_namespaced_secret("kueue-webhook-server-cert", NAMESPACE).data or {}
            return data if "tls.key" in data else {}

        secret = wait_until("Kueue's certificates", filled, 60, [self.process])
        certs = self.root / "certs"
        certs.mkdir(mode=0o700, exist_ok=True)
        for name, value in secret.items():
            (certs / name).write_bytes(base64.b64decode(value))
        wait_until("Kueue ready", lambda: urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2)
                   .status == 200, 120, [self.process])
        return self

    def _install_crds(self, webhook: int) -> None:
        extensions = client.ApiextensionsV1Api(self.api)
        for path in sorted(tools.kueue_crds().glob("*.yaml")):
            crd: dict[str, Any] = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in _CONVERTED:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook}/convert"}}}
            extensions.create_custom_resource_definition(crd)
        def established(name: str) -> bool:
            return any(c.type == "Established" and c.status == "True"
                       for c in extensions.read_custom_resource_definition(name).status.conditions or [])

        for path in tools.kueue_crds().glob("*.yaml"):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            wait_until(f"CRD {name} established", functools.partial(established, name), 30)

    def queue(self, namespace: str, name: str, quota: dict[str, str]) -> None:
        """A ClusterQueue ``name`` with ``quota`` for one flavor, and a LocalQueue ``name`` in ``namespace``."""
        objects = client.CustomObjectsApi(self.api)
        flavors = objects.list_cluster_custom_object(GROUP, VERSION, "resourceflavors")["items"]
        if not flavors:
            objects.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": "default"}})
        objects.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": name},
            "spec": {"namespaceSelector": {}, "resourceGroups": [{
                "coveredResources": sorted(quota),
                "flavors": [{"name": "default", "resources": [
                    {"name": r, "nominalQuota": q} for r, q in sorted(quota.items())]}]}]}})
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue", "metadata": {"name": name},
            "spec": {"clusterQueue": name}})

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads")["items"]
        return items

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def admitted(workload: dict[str, Any]) -> bool:
    return any(c["type"] == "Admitted" and c["status"] == "True"
               for c in (workload.get("status") or {}).get("conditions") or [])


def describe(workloads: list[dict[str, Any]]) -> str:
    """Workloads in one line each, for assertion messages."""
    return "\n".join(json.dumps({"name": w["metadata"]["name"], "active": w["spec"].get("active"),
                                 "conditions": [(c["type"], c["status"], c.get("reason"))
                                                for c in (w.get("status") or {}).get("conditions") or []]})
                     for w in workloads)
