"""Lineage on the real S3 server (and the file store): write-once steps, compare-and-swap manifest."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from spin_k8s import api, lineage, naming, planner
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import data

RUN = {"name": "demo", "namespace": "ns", "uid": "u-1"}


def stores(s3_server: S3Server, bucket: str, tmp_path: Path) -> list[lineage.Store]:
    return [lineage.S3Store(s3_server.client(), bucket, "spin/ns/demo/u-1"), lineage.FileStore(tmp_path)]


@pytest.mark.s3
def test_racing_writers_lose_nothing(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    for store in stores(s3_server, bucket, tmp_path):
        # 8 concurrent controllers each record a different step, half of them from the same stale version they
        # read first: every compare-and-swap loser re-reads, merges and retries.
        stale = lineage.read(store)
        threads = [threading.Thread(target=lineage.record_steps, args=(
            store, RUN, {"iterations": 4}, [(t, role, {"job": f"j{t}{role}"})], stale if t % 2 else None))
                   for t in range(4) for role in ("generate", "train")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        steps = lineage.load(store)
        assert sorted(steps) == [(t, r) for t in range(4) for r in ("generate", "train")]
        assert all(rec["job"] == f"j{t}{r}" for (t, r), rec in steps.items())
        manifest = json.loads(store.get(lineage.MANIFEST_KEY)[0])  # type: ignore[index]
        assert manifest["run"] == RUN and manifest["spec"] == {"iterations": 4}


@pytest.mark.s3
def test_a_step_is_recorded_once_and_a_known_version_is_written_in_one_request(
        s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    for store in stores(s3_server, bucket, tmp_path):
        first = lineage.record_steps(store, RUN, {}, [(0, "generate", {"job": "gen"})])
        assert first.etag == lineage.read(store).etag  # the version written is the version stored
        # A replay after a crash (or a second controller) keeps the first record.
        again = lineage.record_steps(store, RUN, {}, [(0, "generate", {"job": "other"})], first)
        assert again == first and lineage.load(store)[(0, "generate")]["job"] == "gen"
        # From a known version: one write, no read; two steps in one write.
        counted = Counting(store)
        second = lineage.record_steps(counted, RUN, {}, [(0, "train", {"job": "t"}), (1, "generate", {"job": "g"})],
                                      first)
        assert counted.calls == ["put"]
        assert lineage.read(store) == second and sorted(second.steps) == [(0, "generate"), (0, "train"),
                                                                           (1, "generate")]
        # From a stale version: the write is refused, the writer reads, merges, and writes again.
        counted.calls.clear()
        third = lineage.record_steps(counted, RUN, {}, [(1, "train", {"job": "t1"})], first)
        assert counted.calls == ["put", "get", "put"]
        assert sorted(third.steps) == [(0, "generate"), (0, "train"), (1, "generate"), (1, "train")]


class Counting:
    """A store that records the calls made to it."""

    def __init__(self, store: lineage.Store) -> None:
        self.store, self.calls = store, list[str]()

    def get(self, key: str) -> tuple[bytes, str] | None:
        self.calls.append("get")
        return self.store.get(key)

    def put(self, key: str, data: bytes, *, etag: str | None) -> str | None:
        self.calls.append("put")
        return self.store.put(key, data, etag=etag)


@pytest.mark.s3
def test_stale_etag_is_refused(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    for store in stores(s3_server, bucket, tmp_path):
        assert store.put("m.json", b"1", etag=None)
        _, etag = store.get("m.json")  # type: ignore[misc]
        assert store.put("m.json", b"2", etag=etag)
        assert not store.put("m.json", b"3", etag=etag)  # stale
        assert store.get("m.json")[0] == b"2"  # type: ignore[index]


def test_a_shard_record_of_an_older_worker_image_is_read_with_the_defaults_it_meant(tmp_path: Path) -> None:
    """A run whose generation Job ran an image from before ``length_stopped`` existed, completed after the
    controller was upgraded: its step is recorded (lengthStopped 0), not a reconcile that fails forever."""
    run = api.parse(api.load_defaulted({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"},
        "spec": {"model": "s3://b/base", "dataset": "s3://b/sft.jsonl", "iterations": 1, "storage": {"uri": "s3://b/spin"},
                 "generation": {"shards": 1}}}))
    store = lineage.FileStore(tmp_path)
    old = {"shard": 0, "num_shards": 1, "rows": 3, "sha256": "a" * 64, "engine": "vllm", "engine_version": "0.8",
           "sampling": {}, "model": "s3://b/base", "model_digest": "b" * 64, "scored": True,
           "max_prompt_length": 512, "max_length": 1024, "data": "s3://b/sft.jsonl"}
    assert store.put(f"i0/synthetic/{data.done_name(0, 1)}", json.dumps(old).encode(), etag=None)
    job = planner.JobView("demo-i0-gen", "uid", 0, naming.GENERATE, 0, "complete")
    outputs = lineage.step_outputs(store, run, "s3://b/spin/ns/demo/u-1", [job], {})
    output = outputs[(0, naming.GENERATE)]
    assert output is not None and output["lengthStopped"] == 0
    assert [(r["rows"], r["engine"], r["lengthStopped"]) for r in output["shards"]] == [(3, "vllm", 0)]
