"""Iteration lineage: what each step of a run consumed and produced, kept in object storage.

One object under the run's prefix (``naming.run_prefix``): ``manifest.json``, the run's aggregate (spec, code
version, every recorded step), updated by compare-and-swap on its ETag (``If-Match``; ``If-None-Match: *`` for
the first write). A step's record is written once: a writer finding the step already recorded keeps that
record (a replay after a crash, or a second controller). A writer that loses the race (412, 409, or 404 where
the object vanished) re-reads and retries. A writer that knows the manifest's current version (its own last
read or write: the controller's writes are fenced by its Lease) writes without reading first: one request.

:func:`step_outputs` reads what the workers of a finished step left (shard done records, ``metrics.json``)
for the planner's record of that step; the controller and the local executor both read outputs through it.

Stores: :class:`S3Store` (boto3 client given by the caller: each run has its own credentials) and
:class:`FileStore` (local directory, same interface) for local runs and tests of pure logic.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import spin_k8s
from spin_k8s import naming, storage
from spin_k8s.workers import data

if TYPE_CHECKING:
    from spin_k8s import api, planner

_CAS_ATTEMPTS = 20


class Store(Protocol):
    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None when absent."""

    def put(self, key: str, data: bytes, *, etag: str | None) -> str | None:
        """Write only if the object's ETag is ``etag`` (``None``: only if absent); the new ETag, or None when
        the race was lost."""


@dataclass(frozen=True)
class S3Store:
    client: Any
    bucket: str
    prefix: str

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/")

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), str(obj["ETag"])

    def put(self, key: str, data: bytes, *, etag: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            written = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                             ContentType="application/json", **condition)
        except self.client.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412, 404):
                return None
            raise
        return str(written["ETag"])


@dataclass(frozen=True)
class FileStore:
    root: Path

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put(self, key: str, data: bytes, *, etag: str | None) -> str | None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the compare and the swap happen under one lock
            current = self.get(key)
            if (current is None) != (etag is None) or (current is not None and current[1] != etag):
                return None
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=64)
def _s3_client(endpoint: str | None, region: str, key: str | None, secret: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}))


def open_store(prefix: str, *, endpoint: str | None = None, region: str = "us-east-1",
               credentials: dict[str, str] | None = None) -> Store:
    """The store of a run's prefix (``naming.run_prefix``): S3 for ``s3://``, else a local directory.
    ``credentials`` holds ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (None: boto3's default chain)."""
    loc = storage.parse(prefix)
    if loc.scheme != "s3":
        return FileStore(Path(loc.key))
    creds = credentials or {}
    return S3Store(_s3_client(endpoint, region, creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY")),
                   loc.bucket, loc.key)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()


MANIFEST_KEY = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """The manifest as stored: its body (``{}`` when absent) and ETag (None when absent)."""

    body: dict[str, Any]
    etag: str | None

    @property
    def steps(self) -> dict[tuple[int, str], dict[str, Any]]:
        """The recorded steps by (iteration, role)."""
        return {(int(t), role): rec for t, roles in self.body.get("iterations", {}).items()
                for role, rec in roles.items()}


def read(store: Store) -> Manifest:
    """The manifest (one read)."""
    got = store.get(MANIFEST_KEY)
    return Manifest({}, None) if got is None else Manifest(json.loads(got[0]), got[1])


def load(store: Store) -> dict[tuple[int, str], dict[str, Any]]:
    """The recorded steps (one read)."""
    return read(store).steps


def record_steps(store: Store, run: dict[str, Any], spec: dict[str, Any],
                 records: Iterable[tuple[int, str, dict[str, Any]]], known: Manifest | None = None) -> Manifest:
    """Add steps' records (iteration, role, record) to the manifest in one compare-and-swap write, each only if
    its step has no record yet (the first record of a step stands); the manifest as stored after it.
    ``known``: the manifest's current version where the caller knows it, so that the write needs no read."""
    records = list(records)
    current = known if known is not None else read(store)
    for _ in range(_CAS_ATTEMPTS):
        body = copy.deepcopy(current.body) or {"run": run, "spec": spec, "codeVersion": spin_k8s.__version__,
                                               "created": _now(), "iterations": {}}
        added = False
        for iteration, role, record in records:
            roles = body["iterations"].setdefault(str(iteration), {})
            if role not in roles:
                roles[role] = {**record, "recorded": _now()}
                added = True
        if not added:
            return current
        body["updated"] = _now()
        etag = store.put(MANIFEST_KEY, _dump(body), etag=current.etag)
        if etag is not None:
            return Manifest(body, etag)
        current = read(store)  # another writer went first: merge into what it wrote
    raise RuntimeError(f"lineage manifest: lost the compare-and-swap race {_CAS_ATTEMPTS} times")


def step_outputs(store: Store, run: api.SpinRun, prefix: str, jobs: Iterable[planner.JobView],
                 steps: dict[tuple[int, str], dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any] | None]:
    """What the workers of Complete, unrecorded steps left in storage (None where it is incomplete)."""
    outputs: dict[tuple[int, str], dict[str, Any] | None] = {}
    for j in jobs:
        if j.state != "complete" or (j.iteration, j.role) in steps:
            continue
        if j.role == naming.GENERATE:
            sub = f"i{j.iteration}/synthetic/"
            records, length_stopped = [], 0
            for s in range(run.spec.generation.shards):
                name = data.shard_name(s, run.spec.generation.shards)
                got = store.get(f"{sub}{data.done_name(s, run.spec.generation.shards)}")
                if got is None:
                    break
                # Read as the workers read it: a record an older worker image wrote lacks the newer fields,
                # and ShardRecord gives them the values they meant then.
                rec = data.ShardRecord.from_json(got[0])
                records.append({"uri": f"{naming.synthetic_uri(prefix, j.iteration)}/{name}",
                                "sha256": rec.sha256, "rows": rec.rows, "engine": rec.engine,
                                "modelDigest": rec.model_digest, "lengthStopped": rec.length_stopped})
                length_stopped += rec.length_stopped
            complete = len(records) == run.spec.generation.shards
            # Samples cut at maxTokens: no end-of-turn token follows them, in scoring and training.
            outputs[(j.iteration, j.role)] = {"shards": records, "lengthStopped": length_stopped} if complete else None
        else:
            got = store.get(f"i{j.iteration}/model/metrics.json")
            metrics = json.loads(got[0]) if got else None
            outputs[(j.iteration, j.role)] = (
                {"metrics": metrics, "checkpointDigest": metrics.get("checkpoint_sha256")} if metrics else None)
    return outputs
