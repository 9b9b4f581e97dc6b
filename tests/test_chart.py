"""The Helm chart (charts/spin) and the plain manifests (manifests/): lint, what they render, that a typo in
values fails, that RBAC grants exactly what the controller calls, and one install on the test control plane
where the chart's controller runs a SpinRun under its own ServiceAccount and `helm uninstall` keeps the CRD
and the run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from support import Controllers, run_store

import spin_k8s
from spin_k8s import api as spin_api
from spin_k8s import lineage
from spin_k8s.controller.manager import LEASE_NAME
from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import free_port, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

ROOT = Path(__file__).parent.parent
CHART = ROOT / "charts" / "spin"
CRDS = [ROOT / "manifests" / "crd" / f"{name}.selfplay.dev.yaml" for name in (spin_api.PLURAL, spin_api.RUNTIME_PLURAL)]
CUSTOM_VALUES = Path(__file__).parent / "data" / "chart-values.yaml"
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/component")
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.helm_binary()), *args], capture_output=True, text=True, check=False)


def install(cluster: Cluster, namespace: str, metrics_port: int, s3_endpoint: str) -> subprocess.CompletedProcess[str]:
    """`helm install --wait` of the chart watching its own namespace, allowed to reach the test S3 server. The
    metrics server binds loopback: every pod shares this machine's network, and nothing here may listen beyond
    127.0.0.1."""
    return helm("--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace, "install", "spin", str(CHART),
                "--wait", "--timeout", "180s", "--set", f"watchNamespace={namespace}",
                "--set", f"metrics.port={metrics_port}", "--set", "metrics.bindAddress=127.0.0.1",
                "--set", f"storage.allowedEndpoints={{{s3_endpoint}}}")


def uninstall(cluster: Cluster, namespace: str) -> subprocess.CompletedProcess[str]:
    return helm("--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace, "uninstall", "spin", "--wait",
                "--timeout", "120s")


def render(*args: str, release: str = "spin", namespace: str = "spin-system") -> list[dict[str, Any]]:
    done = helm("template", release, str(CHART), "--namespace", namespace, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    return found


def controller(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb) triples, to compare regardless of grouping."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


# -- lint and render -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, CUSTOM_VALUES], ids=["defaults", "custom"])
def test_helm_lint_strict(values: Path | None) -> None:
    done = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == spin_k8s.__version__


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml has a comment on the line right above it; only the Kubernetes quantities
    under `resources` are documented once, by the comment on `resources`."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, in_resources = [], False
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)([\w.-]+):", line)
        if not key:
            continue
        in_resources = (in_resources and key.group(1) != "") or key.group(2) == "resources"
        if not lines[i - 1].strip().startswith("#") and not (in_resources and key.group(1)):
            undocumented.append(key.group(2))
    assert undocumented == []


def test_defaults_render_a_hardened_cluster_wide_controller() -> None:
    objects = render()
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                            "RoleBinding", "Service", "Deployment", "SpinRuntime"}
    for o in objects:
        labels = o["metadata"]["labels"]
        assert all(labels.get(k) for k in STANDARD_LABELS), (o["kind"], labels)
        assert labels["app.kubernetes.io/version"] == spin_k8s.__version__
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"] == "controller"

    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = controller(objects)
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert set(c["resources"]) == {"requests", "limits"}
    assert all(set(c["resources"][k]) == {"cpu", "memory"} for k in ("requests", "limits"))
    assert c["image"] == f"ghcr.io/spin-k8s/controller:{spin_k8s.__version__}"
    assert c["command"] == ["python", "-m", "spin_k8s.controller"]
    assert c["args"] == ["--metrics-bind=0.0.0.0:8080", "--lease-namespace=spin-system", "--leader-elect",
                         "--lease-seconds=15", "--resync-seconds=30",
                         f"--generate-image={spin_api.DEFAULT_IMAGES.generate}",
                         f"--train-image={spin_api.DEFAULT_IMAGES.train}"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c["env"]

    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(objects, "ClusterRole", "spin-controller")["metadata"]["name"]
    # No Secret anywhere by default (tenantNamespaces lists where), no custom S3 endpoint, never its own identity.
    assert not [r for r in one(objects, "ClusterRole", "spin-controller")["rules"] if "secrets" in r["resources"]]
    assert by_kind(objects, "RoleBinding") == [one(objects, "RoleBinding", "spin-controller-leader-election")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": "spin-system"}]
    lease_role = one(objects, "Role")
    assert lease_role["metadata"]["namespace"] == "spin-system"
    assert rule_set(lease_role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def test_custom_values_watch_one_namespace_with_a_role_and_force_leader_election() -> None:
    objects = render("-f", str(CUSTOM_VALUES), "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    # Cluster-wide for the controller, only what a namespaced Role cannot hold: reading the SpinRun CRD (checked
    # at start) and SpinRuntimes. The users' aggregated roles are cluster-scoped by nature.
    cluster_wide = by_kind(objects, "ClusterRole") + by_kind(objects, "ClusterRoleBinding")
    assert sorted(r["metadata"]["name"] for r in cluster_wide) == ["spin-controller-crd"] * 2 + ["spin-edit",
                                                                                                 "spin-view"]
    role = one(objects, "Role", "spin-controller")
    assert role["metadata"]["namespace"] == "team-a"
    binding = one(objects, "RoleBinding", "spin-controller")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "spin-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spin-operator", "namespace": "spin-system"}]
    # The leader Lease stays in the release namespace, not the watched one.
    assert one(objects, "Role", "spin-controller-leader-election")["metadata"]["namespace"] == "spin-system"

    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    c = controller(objects)
    # leaderElection.enabled is false in the file, but two replicas must never reconcile at once.
    assert "--leader-elect" in c["args"] and "--no-leader-elect" not in c["args"]
    assert "--namespace=team-a" in c["args"] and "--lease-namespace=spin-system" in c["args"]
    assert "--metrics-bind=0.0.0.0:9443" in c["args"] and "--lease-seconds=20" in c["args"]
    assert c["image"] == "registry.example.com/spin/controller:0.1.0-rc1" and c["imagePullPolicy"] == "Always"
    assert "--train-image=registry.example.com/spin/train:custom" in c["args"]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "spin-operator"
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec["tolerations"][0]["key"] == "dedicated" and spec["priorityClassName"] == "system-cluster-critical"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["team"] == "a"
    assert pod_labels["app.kubernetes.io/name"] == "spin"  # a user's label never breaks the selector

    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                             "scrapeTimeout": "5s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()
    assert one(objects, "Service")["spec"]["ports"][0]["port"] == 9443


def test_service_monitor_needs_the_api_and_the_value() -> None:
    served = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert by_kind(render(*served), "ServiceMonitor") == []  # off by default
    assert by_kind(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor") == []  # no API
    assert len(by_kind(render("--set", "metrics.serviceMonitor.enabled=true", *served), "ServiceMonitor")) == 1


def test_leader_election_is_a_choice_with_one_replica() -> None:
    assert "--no-leader-elect" in controller(render("--set", "leaderElection.enabled=false"))["args"]


def test_names_and_labels_are_cut_to_63_characters() -> None:
    release = "a-very-long-release-name-that-is-53-characters-long-x"
    assert len(release) == 53  # helm's own limit for release names
    # Watching the release namespace puts both Roles in one namespace: their names must still differ.
    objects = render("--set", "watchNamespace=spin-system", release=release)
    for o in objects:
        assert len(o["metadata"]["name"]) <= 63 and not o["metadata"]["name"].endswith("-"), o["metadata"]["name"]
        assert all(len(v) <= 63 for v in o["metadata"]["labels"].values())
    for kind in ("Role", "RoleBinding"):
        names = [o["metadata"]["name"] for o in by_kind(objects, kind)]
        assert len(names) == 2 and len(set(names)) == 2, names


@pytest.mark.parametrize(("setting", "key"), [
    ("replicaCount=2", "replicaCount"),
    ("metrics.serviceMonitor.intervall=1m", "intervall"),
    ("leaderElection.enable=false", "enable"),
    ("image.tags=v1", "tags"),
    ("workerImages.generte=x", "generte"),
])
def test_a_typo_in_values_fails_and_names_the_key(setting: str, key: str) -> None:
    done = helm("template", "spin", str(CHART), "--set", setting)
    assert done.returncode != 0
    assert f"'{key}' not allowed" in done.stderr, done.stderr


def test_a_wrongly_typed_value_fails() -> None:
    done = helm("template", "spin", str(CHART), "--set", "leaderElection.enabled=yes")
    assert done.returncode != 0 and "leaderElection/enabled" in done.stderr, done.stderr


# -- RBAC against the code ---------------------------------------------------------------------------------

# Each Kubernetes client method the controller calls, by the resource it touches: (apiGroup, resource).
_RESOURCES = {
    "job": ("batch", "jobs"), "service": ("", "services"), "secret": ("", "secrets"), "event": ("", "events"),
    "pod": ("", "pods"), "custom_resource_definition": ("apiextensions.k8s.io", "customresourcedefinitions"),
    "lease": ("coordination.k8s.io", "leases"), "custom_object": (spin_api.GROUP, spin_api.PLURAL),
    "custom_object_status": (spin_api.GROUP, f"{spin_api.PLURAL}/status"),
}
# The client's verbs as RBAC verbs. Every list the controller makes feeds a watch (manager._watch).
_VERBS = {"read": ("get",), "list": ("list", "watch"), "create": ("create",), "patch": ("patch",),
          "replace": ("update",), "delete": ("delete",)}
_CALL = re.compile(r"\.(read|list|create|patch|replace|delete)_(?:namespaced_|cluster_)?(\w+?)"
                   r"(?:_for_all_namespaces)?\b")
# A custom-object call on Kueue's Workloads (named in the call) rather than on SpinRuns.
_KUEUE_WORKLOADS = ("kueue.x-k8s.io", "workloads")
# Listed without a watch: a failed Job's pods, once, for their termination messages; the events of a Job that
# lacks pods, for why they were refused; a Job's Kueue Workload, when a run is cancelled or resumed.
_UNWATCHED = {("", "pods", "watch"), ("", "events", "watch"), (*_KUEUE_WORKLOADS, "watch")}
# Granted without a call of their own, each for a reason the chart's templates/rbac.yaml states.
_EXTRA = {(spin_api.GROUP, spin_api.PLURAL, "get"), (spin_api.GROUP, f"{spin_api.PLURAL}/finalizers", "update")}


def controller_calls() -> set[tuple[str, str, str]]:
    needed = set()
    for source in (ROOT / "spin_k8s" / "controller").glob("*.py"):
        text = source.read_text()
        for call in _CALL.finditer(text):
            verb, kind = call.groups()
            assert kind in _RESOURCES, f"{source.name}: a call on {kind!r}: map it to an RBAC rule in this test"
            arguments = text[call.end():text.index(")", call.end())]
            resource = (_KUEUE_WORKLOADS if '"workloads"' in arguments
                        else (spin_api.GROUP, spin_api.RUNTIME_PLURAL) if "RUNTIME_PLURAL" in arguments
                        else _RESOURCES[kind])
            needed |= {(*resource, v) for v in _VERBS[verb]}
    return needed


def test_rbac_grants_exactly_what_the_controller_calls() -> None:
    needed = controller_calls()
    assert (spin_api.GROUP, f"{spin_api.PLURAL}/status", "patch") in needed  # the scan sees the code
    objects = render("--set", "tenantNamespaces={team-a,team-b}")
    secrets = one(objects, "ClusterRole", "spin-controller-secrets")["rules"]
    assert rule_set(secrets) == {("", "secrets", "get")}
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")
                  if b["roleRef"]["name"] == "spin-controller-secrets") == ["team-a", "team-b"]
    granted = rule_set(one(objects, "ClusterRole", "spin-controller")["rules"]) | rule_set(secrets) | \
        rule_set(one(objects, "Role")["rules"])
    assert granted == (needed - _UNWATCHED) | _EXTRA
    objects = render()
    namespaced = render("--set", "watchNamespace=team-a")
    crd = one(namespaced, "ClusterRole", "spin-controller-crd")["rules"]  # cluster-scoped: never in a Role
    assert crd == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                    "verbs": ["get"], "resourceNames": ["spinruns.selfplay.dev", "spinruntimes.selfplay.dev"]},
                   {"apiGroups": ["selfplay.dev"], "resources": ["spinruntimes"], "verbs": ["list", "watch"]}]
    assert one(namespaced, "ClusterRoleBinding", "spin-controller-crd")["roleRef"]["name"] == "spin-controller-crd"
    assert rule_set(one(namespaced, "Role", "spin-controller")["rules"]) | rule_set(crd) == \
        rule_set(one(objects, "ClusterRole", "spin-controller")["rules"]) | rule_set(secrets)


def test_the_controller_may_reach_only_the_storage_the_chart_lists() -> None:
    args = controller(render("--set", "storage.allowedEndpoints={http://minio.storage:9000}",
                             "--set", "storage.controllerIdentityPrefixes={s3://team-a/spin,s3://shared}"))["args"]
    assert [a for a in args if a.startswith(("--allowed-endpoint", "--own-identity-prefix"))] == [
        "--allowed-endpoint=http://minio.storage:9000", "--own-identity-prefix=s3://team-a/spin",
        "--own-identity-prefix=s3://shared"]
    refused = helm("template", "spin", str(CHART), "--set", "storage.controllerIdentityPrefixes={team-a}")
    assert refused.returncode != 0 and "controllerIdentityPrefixes" in refused.stderr


def test_users_get_spinruns_through_the_built_in_edit_and_view_roles() -> None:
    objects = render()
    edit, view = one(objects, "ClusterRole", "spin-edit"), one(objects, "ClusterRole", "spin-view")
    assert {k: v for k, v in edit["metadata"]["labels"].items() if k.startswith("rbac.")} == {
        "rbac.authorization.k8s.io/aggregate-to-admin": "true", "rbac.authorization.k8s.io/aggregate-to-edit": "true"}
    assert {k: v for k, v in view["metadata"]["labels"].items() if k.startswith("rbac.")} == {
        "rbac.authorization.k8s.io/aggregate-to-view": "true"}
    assert ("selfplay.dev", "spinruns", "create") in rule_set(edit["rules"])
    assert ("selfplay.dev", "spinruns/status", "patch") not in rule_set(edit["rules"])  # the controller's
    assert rule_set(view["rules"]) == {("selfplay.dev", r, v) for r in ("spinruns", "spinruns/status")
                                       for v in ("get", "list", "watch")} | {
        ("selfplay.dev", "spinruntimes", v) for v in ("get", "list")}  # runtimes: changed by cluster admins only
    assert not [r for r in edit["rules"] if "spinruntimes" in r["resources"]]
    assert not by_kind(render("--set", "rbac.aggregateUserRoles=false"), "ClusterRole")[1:]


# -- manifests/ (kubectl apply -k) -------------------------------------------------------------------------


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `5e-07` (kustomize's spelling of the CRD's `5.0e-7`) is a string; the
    API server reads YAML 1.2, where it is a number. Read kustomize's output the way the server does."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"),
    list("-+0123456789."))


def kustomize() -> list[dict[str, Any]]:
    done = subprocess.run([str(tools.kube_binary("kubectl")), "kustomize", str(ROOT / "manifests")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.load_all(done.stdout, Loader=Yaml12Loader) if d]


def without_helm_labels(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k not in ("helm.sh/chart", "app.kubernetes.io/managed-by")}


def test_kustomize_renders_the_source_crds() -> None:
    objects = kustomize()
    assert by_kind(objects, "CustomResourceDefinition") == [yaml.safe_load(path.read_text()) for path in CRDS]
    assert one(objects, "Namespace")["metadata"]["name"] == "spin-system"


def test_kustomize_equals_the_chart_defaults() -> None:
    """`kubectl apply -k manifests/` and `helm install spin charts/spin -n spin-system` install the same
    controller: same pod spec, same RBAC, same Service; only Helm's own labels differ."""
    plain, chart = kustomize(), render()
    kinds = ("Deployment", "ServiceAccount", "Service", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    assert sorted((o["kind"], o["metadata"]["name"]) for o in plain if o["kind"] in kinds) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in chart if o["kind"] in kinds)
    for kind, name in sorted((o["kind"], o["metadata"]["name"]) for o in plain if o["kind"] in kinds):
        ours, theirs = one(plain, kind, name), one(chart, kind, name)
        assert ours["metadata"].get("namespace") == theirs["metadata"].get("namespace"), kind
        assert ours["metadata"]["labels"] == without_helm_labels(theirs["metadata"]["labels"]), kind
        for key in ("spec", "roleRef", "subjects"):
            if kind == "Deployment" and key == "spec":
                continue
            assert ours.get(key) == theirs.get(key), (kind, key)
        if kind.endswith("Role"):
            assert rule_set(ours["rules"]) == rule_set(theirs["rules"]), kind
    ours, theirs = one(plain, "Deployment")["spec"], one(chart, "Deployment")["spec"]
    assert ours["template"]["spec"] == theirs["template"]["spec"]
    assert ours["template"]["metadata"]["labels"] == without_helm_labels(theirs["template"]["metadata"]["labels"])
    assert {k: v for k, v in ours.items() if k != "template"} == {k: v for k, v in theirs.items() if k != "template"}


# -- on the test control plane -----------------------------------------------------------------------------


def start_run(cluster: Cluster, namespace: str, body: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Submit a SpinRun the way a user does after `helm install` (the next command NOTES.txt prints):
    `spinctl start -f`, which prints the created object with `-o json`."""
    spec_file = workdir / "spinrun.yaml"
    spec_file.write_text(yaml.safe_dump(body))
    done = subprocess.run([str(Path(sys.executable).parent / "spinctl"), "start", "--kubeconfig",
                           str(cluster.kubeconfig), "-n", namespace, "-f", str(spec_file), "-o", "json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)
    return created


def tiny_example(assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, secret: str) -> dict[str, Any]:
    """manifests/examples/tiny-cpu.yaml with its placeholders filled: the local tiny model and data, and
    storage on the test S3 server; one iteration, and a rendezvous port nothing else uses."""
    body: dict[str, Any] = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    spec = body["spec"]
    spec.update(model=f"file://{assets.model_dir}", dataset=f"file://{assets.data_path}", iterations=1)
    spec["storage"] = {"uri": f"s3://{bucket}/spin", "credentialsSecret": secret, "endpoint": s3_server.endpoint}
    spec["training"]["port"] = free_port()
    return body


def can(api: client.ApiClient, user: str, verb: str, resource: str, namespace: str, group: str = "",
        subresource: str = "") -> bool:
    review = client.AuthorizationV1Api(api).create_subject_access_review({
        "spec": {"user": user, "resourceAttributes": {"verb": verb, "resource": resource, "group": group,
                                                      "namespace": namespace, "subresource": subresource}}})
    return bool(review.status.allowed)


def gone(read: Any, *args: str) -> bool:
    try:
        read(*args)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


@pytest.mark.cluster
@pytest.mark.s3
def test_helm_install_runs_a_spinrun_and_uninstall_keeps_the_crd_and_the_run(
        cluster: Cluster, api: client.ApiClient, namespace: str, s3_server: S3Server, bucket: str,
        tmp_path: Path) -> None:
    core, apps, rbac = client.CoreV1Api(api), client.AppsV1Api(api), client.RbacAuthorizationV1Api(api)
    ext = client.ApiextensionsV1Api(api)
    port = free_port()
    # The CRD is cluster-scoped and other tests may have created it: Helm then skips crds/ and goes on.
    installed = install(cluster, namespace, port, s3_server.endpoint)
    assert installed.returncode == 0, installed.stderr
    assert f"spin-k8s {spin_k8s.__version__} is installed" in installed.stdout
    assert f"kubectl get deploy,spinruns -n {namespace}" in installed.stdout
    assert "spinctl start --iterations 4" in installed.stdout
    wait_until("the SpinRun CRD", lambda: any(
        c.type == "Established" and c.status == "True"
        for c in ext.read_custom_resource_definition("spinruns.selfplay.dev").status.conditions or []), 30)

    deployment = apps.read_namespaced_deployment("spin-controller", namespace)
    assert deployment.status.ready_replicas == 1
    (pod,) = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=controller").items
    assert pod.spec.service_account_name == "spin-controller"

    # Least privilege, as the API server's authorizer sees the controller's ServiceAccount.
    user = f"system:serviceaccount:{namespace}:spin-controller"
    assert can(api, user, "list", "spinruns", namespace, spin_api.GROUP)
    assert can(api, user, "create", "jobs", namespace, "batch")
    assert not can(api, user, "delete", "jobs", namespace, "batch")
    assert not can(api, user, "get", "secrets", "default")  # one watched namespace: nothing beyond it
    assert not can(api, user, "list", "spinruns", "default", spin_api.GROUP)
    # People: the built-in edit and view roles now carry SpinRuns (the aggregation controller merged ours in).
    for person, role in (("alice", "edit"), ("bob", "view")):
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": f"{person}-{role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": person}]})
    wait_until("edit and view to aggregate SpinRuns", lambda: can(
        api, "alice", "create", "spinruns", namespace, spin_api.GROUP) and can(
        api, "bob", "list", "spinruns", namespace, spin_api.GROUP), 60)
    assert not can(api, "alice", "patch", "spinruns", namespace, spin_api.GROUP, "status")  # the controller's
    assert not can(api, "bob", "create", "spinruns", namespace, spin_api.GROUP)
    assert not can(api, "alice", "create", "spinruns", "default", spin_api.GROUP)  # only where she has edit

    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    assets = tiny.create(tmp_path / "tiny", rows=16, seed=0)
    created = start_run(cluster, namespace, tiny_example(assets, s3_server, bucket, "s3"), tmp_path)
    name = created["metadata"]["name"]
    watch = Controllers(cluster, namespace, tmp_path, s3_server)  # starts no controller: the chart's runs
    run = watch.wait_phase(api, name, "Succeeded")
    assert [i["iteration"] for i in run["status"]["iterations"]] == [0]
    # The one cluster run on vLLM (the example's default engine): the shard records say which engine ran.
    shards = lineage.load(run_store(s3_server, bucket, run))[(0, "generate")]["shards"]
    assert [s["engine"] for s in shards] == ["vllm"] * len(shards)
    manifest_key = run["status"]["manifest"].removeprefix(f"s3://{bucket}/")
    assert s3_server.client().head_object(Bucket=bucket, Key=manifest_key)["ContentLength"] > 0
    # Nothing else reconciles in this namespace, so the run went through the chart's controller, which
    # holds the leader Lease in the release namespace.
    lease = client.CoordinationV1Api(api).read_namespaced_lease(LEASE_NAME, namespace)
    assert lease.spec.holder_identity

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    assert "# TYPE spin_controller_reconciles_total counter" in text
    changed = re.search(r'^spin_controller_reconciles_total\{result="changed"\} (\d+)$', text, re.M)
    assert changed and int(changed.group(1)) > 0, text
    log = cluster.pod_log(namespace, pod.metadata.name, "controller")
    assert not re.search(r"\b403\b|Forbidden", log), log[-3000:]  # RBAC refused nothing it asked for

    uninstalled = uninstall(cluster, namespace)
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert gone(apps.read_namespaced_deployment, "spin-controller", namespace)
    assert gone(core.read_namespaced_service_account, "spin-controller", namespace)
    assert gone(core.read_namespaced_service, "spin-controller-metrics", namespace)
    for role in ("spin-controller", "spin-controller-leader-election"):
        assert gone(rbac.read_namespaced_role, role, namespace)
        assert gone(rbac.read_namespaced_role_binding, role, namespace)
    # Kept: the CRD (Helm never deletes crds/), the SpinRun with its status, and its lineage in S3.
    assert ext.read_custom_resource_definition("spinruns.selfplay.dev").metadata.name == "spinruns.selfplay.dev"
    kept = client.CustomObjectsApi(api).get_namespaced_custom_object(G, V, namespace, P, name)
    assert kept["metadata"]["uid"] == created["metadata"]["uid"] and kept["status"]["phase"] == "Succeeded"
    assert s3_server.client().head_object(Bucket=bucket, Key=manifest_key)["ContentLength"] > 0

    # A second install finds the CRD in place (whatever the first found): Helm skips crds/ and succeeds.
    again = install(cluster, namespace, free_port(), s3_server.endpoint)
    assert again.returncode == 0, again.stderr
    assert apps.read_namespaced_deployment("spin-controller", namespace).status.ready_replicas == 1
    uninstalled = uninstall(cluster, namespace)
    assert uninstalled.returncode == 0, uninstalled.stderr


@pytest.mark.cluster
def test_cluster_wide_the_controller_reads_secrets_only_in_the_tenant_namespaces(
        api: client.ApiClient, namespace: str) -> None:
    """The chart's RBAC for a controller of every namespace, created on the API server as rendered (release
    "probe"): SpinRuns everywhere, Secrets only where tenantNamespaces says."""
    objects = [o for o in render("--set", f"tenantNamespaces={{{namespace}}}", release="probe",
                                 namespace="probe-system")
               if o["kind"] in ("ClusterRole", "ClusterRoleBinding") or (o["kind"] == "RoleBinding"
               and o["metadata"]["namespace"] == namespace)]
    assert sorted(o["kind"] for o in objects) == ["ClusterRole"] * 4 + ["ClusterRoleBinding", "RoleBinding"]
    rbac = client.RbacAuthorizationV1Api(api)
    try:
        for o in objects:
            if o["kind"] == "ClusterRole":
                rbac.create_cluster_role(o)
            elif o["kind"] == "ClusterRoleBinding":
                rbac.create_cluster_role_binding(o)
            else:
                rbac.create_namespaced_role_binding(namespace, o)
        (subject,) = next(o for o in objects if o["kind"] == "RoleBinding")["subjects"]
        assert subject["namespace"] == "probe-system"
        user = f"system:serviceaccount:probe-system:{subject['name']}"
        wait_until("the controller's roles to apply", lambda: can(api, user, "get", "secrets", namespace), 60)
        assert can(api, user, "list", "spinruns", "default", spin_api.GROUP)
        assert not can(api, user, "get", "secrets", "default")
        assert not can(api, user, "list", "secrets", namespace)  # get, by name: the Secret a run names
    finally:
        for o in objects:
            if o["kind"] == "ClusterRole":
                rbac.delete_cluster_role(o["metadata"]["name"])
            elif o["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(o["metadata"]["name"])
