"""Servers of the test environment as child processes: start one with its log file, stop it by PID, wait
for it to become ready (failing at once, with its log's tail, if it dies meanwhile), and write the kubeconfigs
and pick the loopback ports they use."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import urllib3
from kubernetes.client.rest import ApiException

from spin_k8s.testing import pki

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (and whose +10000 neighbour is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port + 10000))
                return port


def write_kubeconfig(path: Path, server: str, ca: Path, cert: pki.ClientCert, user: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: spin-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n"
        f"users:\n- name: {user}\n  user:\n    client-certificate: {cert.cert}\n    client-key: {cert.key}\n"
        f"contexts:\n- name: spin-test\n  context:\n    cluster: spin-test\n    user: {user}\n"
        "current-context: spin-test\n"
    )
    path.chmod(0o600)
    return path


@dataclass
class Process:
    """A started server: its name, Popen handle and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def start_process(name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> Process:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
    return Process(name, popen, log)


def wait_until(what: str, check: Callable[[], T], timeout: float, procs: list[Process] | None = None,
               retry_on: tuple[type[BaseException], ...] = (OSError, ApiException, urllib3.exceptions.HTTPError)
               ) -> T:
    """Poll ``check()`` until it returns something truthy and return that; the exceptions in ``retry_on``
    count as "not yet", any other propagates. Fails at once, with the tail of its log, if one of ``procs``
    dies meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs or []:
            if p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n{tail}")
        try:
            value = check()
            if value:
                return value
        except retry_on:
            pass  # not ready yet
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
