"""Controller benchmark on the real test control plane (not a test: it prints figures).

1. Reaction latency: the time from a Job turning Complete to the next Job of the run being created, p50 and
   p99 over many iterations, next to the same-run baseline of the Kubernetes Job controller itself (last pod
   Succeeded -> Job Complete), both seen through one watch.
2. API requests per iteration, from the controller's own /metrics counter.
3. 100 concurrent SpinRuns: the controller's peak RSS and CPU seconds.
4. Idle runs: runs whose generation pods hang, held for a while at the controller's default settings (resync
   30 s, storage check 300 s, lease 15 s): Kubernetes + S3 requests per idle run-hour, the costs that grow with
   time (resyncs, lease renewals, Secret and lineage reads).

Pods are simulated: the node agent exits them 0 at once (pod annotation), and the bench writes the outputs
the workers would have written (shard done records, metrics.json), so only orchestration is measured.
Targets: p50 < 0.2 s, p99 < 1 s, <= 10 Kubernetes + S3 requests per iteration, < 300 MB, < 100 requests per
idle run-hour.

Run: .venv/bin/python bench/bench_controller.py [--runs 10 --iterations 3 --concurrent 100 --idle-runs 100
     --idle-seconds 330]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config, watch

from spin_k8s import api, naming
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.nodeagent import EXIT_CODE_ANNOTATION, HANG_ANNOTATION
from spin_k8s.testing.processes import free_port, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import data

CRD = Path(__file__).parent.parent / "manifests" / "crd" / "spinruns.selfplay.dev.yaml"
NS = "bench"
SHARDS = 2


def run_body(name: str, endpoint: str, iterations: int, hang: bool = False) -> dict[str, Any]:
    pods = {HANG_ANNOTATION: "true"} if hang else {EXIT_CODE_ANNOTATION: "0"}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": {"model": "file:///simulated/model", "dataset": "file:///simulated/sft.jsonl",
                     "iterations": iterations,
                     "storage": {"uri": "s3://bench/spin", "credentialsSecret": "s3", "endpoint": endpoint},
                     "generation": {"shards": SHARDS, "gpusPerShard": 0}, "training": {"gpusPerNode": 0},
                     "podAnnotations": pods}}


def write_outputs(s3: Any, uid: str, name: str, iterations: int) -> None:
    """What the workers of every step would leave in storage."""
    prefix = naming.run_prefix("s3://bench/spin", NS, name, uid).removeprefix("s3://bench/")
    for t in range(iterations):
        for i in range(SHARDS):
            record = data.ShardRecord(shard=i, num_shards=SHARDS, rows=1, sha256="0" * 64, engine="simulated",
                                      engine_version="0", sampling={}, model="simulated", model_digest="0" * 64,
                                      scored=False, max_prompt_length=0, max_length=0, data="simulated")
            key = f"{prefix}/i{t}/synthetic/{data.done_name(i, SHARDS)}"
            s3.put_object(Bucket="bench", Key=key, Body=record.to_json().encode())
        s3.put_object(Bucket="bench", Key=f"{prefix}/i{t}/model/metrics.json",
                      Body=json.dumps({"final": {"loss": 0.5}}).encode())


class JobClock:
    """Watches Jobs; records when each turned Complete, when each was created, and the Job controller's own
    delay from the pod finishing (status.completionTime is whole seconds, so the watch clock is used)."""

    def __init__(self, batch: client.BatchV1Api, core: client.CoreV1Api) -> None:
        self.batch, self.core = batch, core
        self.complete: dict[str, float] = {}
        self.added: dict[str, float] = {}
        self.pod_done: dict[str, float] = {}  # job name -> when its last pod was seen Succeeded
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        threading.Thread(target=self._pods, daemon=True).start()

    def _pods(self) -> None:
        with contextlib.suppress(Exception):  # the stream breaks when the cluster stops at the end
            self._watch_pods()

    def _watch_pods(self) -> None:
        seen: set[str] = set()
        w = watch.Watch()
        for event in w.stream(self.core.list_namespaced_pod, NS, timeout_seconds=3600):
            pod = event["object"]
            job = (pod.metadata.labels or {}).get("job-name")
            if job and pod.status.phase == "Succeeded" and pod.metadata.uid not in seen:
                seen.add(pod.metadata.uid)
                self.pod_done[job] = time.monotonic()
            if self.stop.is_set():
                w.stop()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the stream breaks when the cluster stops at the end
            self._watch_jobs()

    def _watch_jobs(self) -> None:
        w = watch.Watch()
        for event in w.stream(self.batch.list_namespaced_job, NS, timeout_seconds=3600):
            now = time.monotonic()
            job = event["object"]
            name = job.metadata.name
            self.added.setdefault(name, now)
            if any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []):
                self.complete.setdefault(name, now)
            if self.stop.is_set():
                w.stop()


def successor(name: str) -> str | None:
    run, _, rest = name.partition("-i")
    t, _, role = rest.partition("-")
    return f"{run}-i{t}-train" if role == "gen" else f"{run}-i{int(t) + 1}-gen"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs for the latency phase (default 10)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run (default 3)")
    parser.add_argument("--concurrent", type=int, default=100, help="runs at once in phase 3 (default 100)")
    parser.add_argument("--idle-runs", type=int, default=100, help="idle runs in phase 4 (default 100)")
    parser.add_argument("--idle-seconds", type=float, default=330.0,
                        help="how long phase 4 watches them (default 330: past one storage check)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spin-bench-"))
    with Cluster(root / "cluster") as cluster, S3Server(root / "s3") as s3server:
        s3 = s3server.client()
        s3.create_bucket(Bucket="bench")
        kube = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        core, batch, objects = client.CoreV1Api(kube), client.BatchV1Api(kube), client.CustomObjectsApi(kube)
        client.ApiextensionsV1Api(kube).create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
        core.create_namespace({"metadata": {"name": NS}})
        wait_until("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", NS), 60)
        core.create_namespaced_secret(NS, {"metadata": {"name": "s3"}, "stringData": {
            "AWS_ACCESS_KEY_ID": s3server.access_key, "AWS_SECRET_ACCESS_KEY": s3server.secret_key}})
        time.sleep(2)  # the CRD's API appears
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "spin_k8s.controller", f"--kubeconfig={cluster.kubeconfig}",
                                 f"--namespace={NS}", f"--lease-namespace={NS}", f"--metrics-bind=127.0.0.1:{port}",
                                 f"--allowed-endpoint={s3server.endpoint}"],
                                stdout=(root / "controller.log").open("wb"), stderr=subprocess.STDOUT)
        ctl = psutil.Process(proc.pid)

        def by_verb() -> dict[str, int]:
            """Kubernetes requests by HTTP method, S3 requests by operation ("S3 GetObject")."""
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            counts = {line[line.index("{") + 1:line.index("}")]: int(float(line.rsplit(" ", 1)[1]))
                      for line in text.splitlines() if line.startswith("spin_controller_api_requests_total{")}
            counts.update({"S3 " + line.split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
                           for line in text.splitlines() if line.startswith("spin_controller_s3_requests_total{")})
            return counts

        def requests() -> int:
            return sum(by_verb().values())

        def run_all(names: list[str], iterations: int) -> None:
            for name in names:
                created = objects.create_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL,
                                                                  run_body(name, s3server.endpoint, iterations))
                write_outputs(s3, created["metadata"]["uid"], name, iterations)

            def done() -> bool:
                items = objects.list_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL)["items"]
                phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
                failed = [n for n in names if phases.get(n) == "Failed"]
                assert not failed, f"runs failed: {failed} (see {root}/controller.log)"
                return all(phases.get(n) == "Succeeded" for n in names)

            wait_until("runs to finish", done, 1800)

        try:
            wait_until("the controller's metrics", requests, 30)
            clock = JobClock(batch, core)
            before = by_verb()
            run_all([f"lat{i}" for i in range(args.runs)], args.iterations)
            n = args.runs * args.iterations
            verbs = {v: (c - before.get(v, 0)) / n for v, c in by_verb().items()}
            per_iteration = sum(verbs.values())
            latencies = [clock.added[nxt] - at for job, at in clock.complete.items()
                         if (nxt := successor(job)) in clock.added and clock.added[nxt] > at]
            baseline = [at - clock.pod_done[job] for job, at in clock.complete.items()
                        if job in clock.pod_done and at >= clock.pod_done[job]]
            p50, base50 = statistics.median(latencies), statistics.median(baseline)
            print(f"reaction latency over {len(latencies)} transitions: p50 {p50:.3f} s, "
                  f"p99 {percentile(latencies, 0.99):.3f} s (targets 0.2 / 1.0)")
            print(f"baseline, the Job controller (last pod Succeeded -> Job Complete): p50 {base50:.3f} s, "
                  f"p99 {percentile(baseline, 0.99):.3f} s; ratio ours / Job controller at p50: {p50 / base50:.2f}")
            print(f"Kubernetes + S3 requests per iteration: {per_iteration:.1f} (target <= 10): "
                  + ", ".join(f"{v} {c:.1f}" for v, c in sorted(verbs.items())))

            cpu_before = sum(ctl.cpu_times()[:2])
            peak = ctl.memory_info().rss
            names = [f"many{i}" for i in range(args.concurrent)]
            sampler_stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not sampler_stop.wait(0.2):
                    peak = max(peak, ctl.memory_info().rss)

            threading.Thread(target=sample, daemon=True).start()
            started = time.monotonic()
            run_all(names, 1)
            sampler_stop.set()
            cpu = sum(ctl.cpu_times()[:2]) - cpu_before
            print(f"{args.concurrent} concurrent runs: done in {time.monotonic() - started:.1f} s, controller peak "
                  f"RSS {peak / 2**20:.0f} MiB (target < 300), CPU {cpu:.1f} s")

            idle = [f"idle{i}" for i in range(args.idle_runs)]
            for name in idle:
                objects.create_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL,
                                                        run_body(name, s3server.endpoint, 1, hang=True))
            wait_until("every idle run's generation Job", lambda: all(
                f"{n}-i0-gen" in clock.added for n in idle), 600)
            time.sleep(30)  # their pods start and the Jobs' own status updates settle
            before, started = by_verb(), time.monotonic()
            time.sleep(args.idle_seconds)
            hours = (time.monotonic() - started) / 3600
            spent = {v: c - before.get(v, 0) for v, c in by_verb().items() if c - before.get(v, 0)}
            s3_spent = sum(c for v, c in spent.items() if v.startswith("S3 "))
            total = sum(spent.values())
            per_hour = args.idle_runs * hours
            print(f"{args.idle_runs} idle runs for {hours * 3600:.0f} s: {total / per_hour:.1f} requests per idle "
                  f"run-hour (target < 100; Kubernetes {(total - s3_spent) / per_hour:.1f}, "
                  f"S3 {s3_spent / per_hour:.1f}; lease renewals included, shared by all runs): "
                  + ", ".join(f"{v} {c}" for v, c in sorted(spent.items())))
            clock.stop.set()
        finally:
            proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
