"""Builds the real-node tier's container images with buildah and imports them into a containerd.

The product images are the Dockerfiles under ``images/``, built with their own steps; only their base changes,
through the ``BASE`` build argument: a Debian bookworm root filesystem made here by mmdebstrap with Python 3.11
(``testing/images/base``), plus the CPU torch wheel from ``../shared/wheels`` for the workers
(``testing/images/torch``). The infrastructure images (``pause``, ``coredns``) come from ``testing/images``.
No registry is reachable here, so every image is kept as an OCI archive in the cache
(``<cache>/images/<name>-<key>.tar``). Its key hashes the Dockerfile, the build arguments, every file the
build copies and the key of its base: a change to any of them rebuilds that image and the ones built on it,
and nothing else.

Run ``python -m spin_k8s.testing.images`` to build what is missing (``scripts/install`` does).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from spin_k8s.testing import tools

ROOT = Path(__file__).resolve().parents[2]  # the repository root: the product images' build context
HERE = Path(__file__).resolve().parent / "images"
REGISTRY = "spin-k8s.local"
WHEELS = ROOT.parent / "shared" / "wheels"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
# What mmdebstrap puts in the base: Python with venv (pip comes with it) and CA certificates for pip.
DEBIAN = ("bookworm", ("python3", "python3-venv", "ca-certificates"))
RUNC = "/usr/sbin/runc"  # Debian's crun cannot run in hybrid cgroup mode (../shared/FACTS.md)
RUNNABLE = ("pause", "coredns", "controller", "generate", "train")  # what pods run; the rest are bases


@dataclass(frozen=True)
class Image:
    """One image: its Dockerfile, the files the build reads, its base image (by name) and build args."""

    name: str
    dockerfile: Path
    context: Path
    files: tuple[Path, ...]
    base: str | None = None
    args: dict[str, str] = field(default_factory=dict)


def _selected(context: Path, dockerignore: Path) -> tuple[Path, ...]:
    """The files a ``*`` + ``!include`` style .dockerignore lets into the context: what the build can copy."""
    include: list[str] = []
    exclude: list[str] = []
    for raw in dockerignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "*":
            continue
        (include if line.startswith("!") else exclude).append(line.lstrip("!").rstrip("/"))
    files = []
    for pattern in include:
        top = context / pattern
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            rel = path.relative_to(context).as_posix()
            if not any(fnmatch.fnmatch(rel, ex) or fnmatch.fnmatch(rel, ex + "/*") or f"/{Path(ex).name}/" in
                       f"/{rel}" for ex in exclude):
                files.append(path)
    return tuple(files)


def catalogue() -> dict[str, Image]:
    """Every image the tier uses, by name, bases first."""
    product = {
        name: Image(name, ROOT / "images" / name / "Dockerfile", ROOT,
                    _selected(ROOT, ROOT / "images" / name / "Dockerfile.dockerignore"), base, args)
        # The CPU base carries no vLLM, so the generation image installs the workers' common extra and the
        # tests run the transformers engine; the production base brings vLLM and the default extra. The
        # training image builds DeepSpeed's CPU collective op, which a CPU accelerator needs.
        for name, base, args in (("controller", "base", {}), ("generate", "torch", {"EXTRAS": "worker"}),
                                 ("train", "torch", {"DS_BUILD_SHM_COMM": "1"}))
    }
    return {
        "base": Image("base", HERE / "base" / "Dockerfile", HERE / "base", ()),
        "torch": Image("torch", HERE / "torch" / "Dockerfile", WHEELS, (WHEELS / TORCH_WHEEL,), "base",
                       {"TORCH_WHEEL": TORCH_WHEEL}),
        "pause": Image("pause", HERE / "pause" / "Dockerfile", HERE / "pause", (), "base"),
        "coredns": Image("coredns", HERE / "coredns" / "Dockerfile", tools.coredns_binary().parent,
                         (tools.coredns_binary(),)),
        **product,
    }


def _digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def key(image: Image, images: dict[str, Image]) -> str:
    """The cache key of ``image``: a hash of everything that decides what it contains."""
    h = hashlib.sha256(image.dockerfile.read_bytes())
    h.update(repr(sorted(image.args.items())).encode())
    if image.name == "base":
        h.update(repr(DEBIAN).encode())
    for path in image.files:
        h.update(path.relative_to(image.context).as_posix().encode() + b"\0" + _digest(path))
    if image.base:
        h.update(key(images[image.base], images).encode())
    return h.hexdigest()[:16]


def reference(image: Image, images: dict[str, Image]) -> str:
    """The image's name in buildah and containerd: ``spin-k8s.local/<name>:<key>``."""
    return f"{REGISTRY}/{image.name}:{key(image, images)}"


def archive(image: Image, images: dict[str, Image]) -> Path:
    return tools.cache_dir() / "images" / f"{image.name}-{key(image, images)}.tar"


def _buildah(*argv: str, capture: bool = False) -> str:
    storage = tools.cache_dir() / "buildah"
    cmd = ["buildah", f"--root={storage / 'storage'}", f"--runroot={storage / 'run'}", "--storage-driver=overlay",
           *argv]
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def _host_trust() -> list[str]:
    """RUN steps reach the package registries as this machine does: through its trust store (which may hold
    an egress proxy's CA) and its pip configuration, mounted read-only for the build; the image keeps its own."""
    return [f"--volume={p}:{p}:ro" for p in ("/etc/ssl/certs", "/etc/pip.conf") if Path(p).exists()]


@contextmanager
def _rootfs_context() -> Iterator[Path]:
    """A build context holding rootfs.tar, a bookworm minbase with DEBIAN's packages from mmdebstrap."""
    suite, packages = DEBIAN
    with tempfile.TemporaryDirectory(prefix="spin-k8s-rootfs-") as tmp:
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(packages)}", suite,
                        str(Path(tmp) / "rootfs.tar")], check=True)
        yield Path(tmp)


def ensure(name: str, images: dict[str, Image] | None = None) -> Path:
    """The OCI archive of image ``name``, built (with its bases) unless cached; its reference is also in
    buildah's storage, so images built on it find it."""
    images = images or catalogue()
    image = images[name]
    ref, tar = reference(image, images), archive(image, images)
    present = bool(_buildah("images", "--quiet", "--filter", f"reference={ref}", capture=True).strip())
    if tar.is_file():
        if not present:  # a cache restored without buildah's storage: images built on this one need it there
            image_id = _buildah("pull", "--quiet", f"oci-archive:{tar}", capture=True).split()[-1]
            _buildah("tag", image_id, ref)
        return tar
    base_args = []
    if image.base:
        ensure(image.base, images)
        base_args = ["--build-arg", f"BASE={reference(images[image.base], images)}"]
    started = time.monotonic()
    print(f"image {name}: building {ref}", flush=True)
    with _rootfs_context() if name == "base" else contextlib.nullcontext(image.context) as context:
        build_args = [a for k, v in image.args.items() for a in ("--build-arg", f"{k}={v}")]
        _buildah("build", "--quiet", "--layers", "--isolation=oci", f"--runtime={RUNC}", "--pull=never",
                 *_host_trust(), "-f", str(image.dockerfile), "-t", ref, *base_args, *build_args, str(context))
    tar.parent.mkdir(parents=True, exist_ok=True)
    partial = tar.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    # Uncompressed: gzip would cost more time at every import into a node's containerd than it saves on disk.
    _buildah("push", "--quiet", "--disable-compression", ref, f"oci-archive:{partial}:{ref}")
    partial.rename(tar)
    for old in tar.parent.glob(f"{name}-*.tar"):  # superseded builds of this image
        if old != tar:
            old.unlink()
    print(f"image {name}: built in {time.monotonic() - started:.0f}s ({tar.stat().st_size >> 20} MiB)", flush=True)
    return tar


def build_all() -> dict[str, Path]:
    """Every image's archive, building what is missing; one build at a time per machine."""
    images = catalogue()
    lock_path = tools.cache_dir() / "images" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        archives = {name: ensure(name, images) for name in images}
        _drop_superseded({reference(image, images) for image in images.values()})
        return archives


def _drop_superseded(current: set[str]) -> None:
    """Remove every image of an earlier build from buildah's storage, and the working containers of builds
    killed midway with the layers they held (35 GiB after a day of source edits, on a shared disk). Untagged
    intermediate images stay: they are the layer cache, and the dependency layers all builds share are in it."""
    _buildah("rm", "--all", capture=True)  # no build runs: the caller holds the build lock
    names = _buildah("images", "--format", "{{.Name}}:{{.Tag}}", capture=True).split()
    superseded = [n for n in names if n.startswith(f"{REGISTRY}/") and n not in current]
    if superseded:
        _buildah("rmi", "--force", *superseded, capture=True)


def import_into(address: Path, archives: dict[str, Path]) -> None:
    """Import archives into the containerd at ``address``, in the ``k8s.io`` namespace its CRI uses."""
    for tar in archives.values():
        subprocess.run(["ctr", f"--address={address}", "--namespace=k8s.io", "images", "import", str(tar)],
                       check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    missing = [tool for tool in ("buildah", "mmdebstrap", RUNC) if shutil.which(tool) is None]
    if missing:
        print(f"error: missing {', '.join(missing)}: scripts/install installs them (apt)", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("error: building images needs root (buildah with runc, mmdebstrap)", file=sys.stderr)
        return 1
    for name, tar in build_all().items():
        print(f"{name}: {tar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
