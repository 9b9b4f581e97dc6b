"""A real node leaves the machine as it found it, even when the run that started it was killed: the next start
cleans up after it. Runs before the session's real node (file order), which is then the third start on the
same machine and must come up clean too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from kubernetes import client, config

from spin_k8s.testing import node
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import wait_until

pytestmark = [pytest.mark.kubelet, pytest.mark.cluster]


def machine() -> dict[str, object]:
    """What a real node changes outside its directory, as seen from the machine."""
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    processes = []  # this test's servers and container shims: their command lines name its directories
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "realnode-lifecycle" in argv:
                processes.append(argv.replace("\0", " "))
    return {
        "links": sorted(re.findall(r"^\d+: ([^:@]+)", subprocess.run(
            ["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout, re.M)),
        "chains": sorted(set(node.OWN_CHAINS.findall(iptables))),
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").exists() else [],
        "cgroups": [str(p) for p in node.kubepods_cgroups()],
        "mounts": [line.split()[4] for line in mounts.splitlines() if "realnode-lifecycle" in line],
        "sysctls": {name: node.sysctl(name) for name in (*node.NETWORK_SYSCTLS, *node.KERNEL_TUNABLES)},
        "propagation": subprocess.run(["findmnt", "-no", "PROPAGATION", "/"], capture_output=True, text=True,
                                      check=True).stdout.strip(),
        "processes": sorted(processes),
        "state_file": node.STATE.exists(),
    }


def run_a_pod(cluster: Cluster) -> None:
    """A pod in a container on the node: the node really ran something before it was killed."""
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    assert cluster.node is not None
    core.create_namespaced_pod("default", {"metadata": {"name": "sleeper"}, "spec": {"containers": [{
        "name": "sleep", "image": cluster.node.images["pause"], "imagePullPolicy": "Never"}]}})
    wait_until("the pod to run", lambda: core.read_namespaced_pod("sleeper", "default").status.phase == "Running",
               120, cluster.processes)


def test_a_killed_real_node_is_cleaned_up_by_the_next_start(tmp_path_factory: pytest.TempPathFactory) -> None:
    before = machine()
    first = Cluster(tmp_path_factory.mktemp("realnode-lifecycle"), real_node=True, node_images=("pause",)).start()
    try:
        run_a_pod(first)
        assert first.node is not None
        # The test run dies: every server SIGKILLed, no teardown, its lock released with its process.
        for proc in [*first.node.processes, *first.processes]:
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
        assert first.node.lock is not None
        first.node.lock.close()
    except BaseException:
        first.stop()
        raise
    killed = machine()
    assert killed["state_file"] and "spin-br0" in killed["links"] and killed["chains"] and killed["cgroups"]

    second = Cluster(tmp_path_factory.mktemp("realnode-lifecycle"), real_node=True, node_images=("pause",)).start()
    try:
        run_a_pod(second)
    finally:
        second.stop()
    assert machine() == before
    for started in (first, second):  # the images and container layers, GiBs each, are gone too
        assert not (started.root / "node" / "containerd" / "root").exists()
