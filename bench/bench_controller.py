"""Controller benchmark on the real test control plane (not a test: it prints figures).

1. Reaction latency: the time from a Job turning Complete to the next Job of the run being created, p50 and
   p99 over many iterations, next to the same-run baseline of the Kubernetes Job controller itself (last pod
   Succeeded -> Job Complete), both seen through one watch.
2. API requests per iteration, from the controller's own /metrics counters (Kubernetes by resource and verb, S3
   by operation). The runs' own requests (everything but ``leases``) make the per-iteration figure; lease
   renewals are the controller's fixed cost, shared by all runs, and are given per hour instead.
3. 100 concurrent SpinRuns: the controller's peak RSS and CPU seconds.
4. Scale (opt-in: ``--scale-runs 1000`` runs over 15 minutes on 2 cores): that many runs at once, each
   ``--scale-iterations`` iterations (1,000 x 5 = 10,000 Jobs, all kept: the controller's Job cache ends
   holding them all), one generation shard each so pods = Jobs (under the pod garbage collector's 12,500
   threshold). Reaction latency and the Job controller's baseline at that scale, peak RSS, CPU seconds (the
   controller's and every server's), wall time, requests per iteration; then the latency phase's runs once
   more, with the 1,000 runs and their Jobs still held.
5. Idle runs: runs whose generation pods hang, held for a while at the controller's default settings (resync
   30 s, storage check 300 s, lease 15 s): Kubernetes + S3 requests per idle run-hour, the costs that grow with
   time (resyncs, Secret and lineage reads); lease renewals apart, per hour.

Pods are simulated: the node agent exits them 0 at once (pod annotation), and the bench writes the outputs
the workers would have written (shard done records, metrics.json), so only orchestration is measured.
Targets: p50 < 0.2 s, p99 < 1 s (at scale too), <= 10 Kubernetes + S3 requests per iteration, RSS < 300 MB
(< 500 MB at 1,000 runs), < 100 requests per idle run-hour. A phase given 0 runs is skipped.

Run: .venv/bin/python bench/bench_controller.py [--runs 10 --iterations 3 --concurrent 100 --idle-runs 100
     --idle-seconds 330 --scale-runs 0 --scale-iterations 5]
Scale only: .venv/bin/python bench/bench_controller.py --concurrent 0 --idle-runs 0 --scale-runs 1000
(with ``--runs``, the latency phase runs again after the scale phase, every scale Job still held)
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
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
from kubernetes import client, config

from spin_k8s import api, naming
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.nodeagent import EXIT_CODE_ANNOTATION, HANG_ANNOTATION
from spin_k8s.testing.processes import free_port, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import data

CRDS = sorted((Path(__file__).parent.parent / "manifests" / "crd").glob("*.yaml"))  # SpinRun and SpinRuntime
NS = "bench"
SHARDS = 2


def run_body(name: str, endpoint: str, iterations: int, hang: bool = False,
             shards: int = SHARDS) -> dict[str, Any]:
    pods = {HANG_ANNOTATION: "true"} if hang else {EXIT_CODE_ANNOTATION: "0"}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": {"model": "file:///simulated/model", "dataset": "file:///simulated/sft.jsonl",
                     "iterations": iterations,
                     "storage": {"uri": "s3://bench/spin", "credentialsSecret": "s3", "endpoint": endpoint},
                     "generation": {"shards": shards, "gpusPerShard": 0}, "training": {"gpusPerNode": 0},
                     "podAnnotations": pods}}


def write_outputs(s3: Any, uid: str, name: str, iterations: int, shards: int = SHARDS) -> None:
    """What the workers of every step would leave in storage."""
    prefix = naming.run_prefix("s3://bench/spin", NS, name, uid).removeprefix("s3://bench/")
    for t in range(iterations):
        for i in range(shards):
            record = data.ShardRecord(shard=i, num_shards=shards, rows=1, sha256="0" * 64, engine="simulated",
                                      engine_version="0", sampling={}, model="simulated", model_digest="0" * 64,
                                      scored=False, max_prompt_length=0, max_length=0, data="simulated")
            key = f"{prefix}/i{t}/synthetic/{data.done_name(i, shards)}"
            s3.put_object(Bucket="bench", Key=key, Body=record.to_json().encode())
        s3.put_object(Bucket="bench", Key=f"{prefix}/i{t}/model/metrics.json",
                      Body=json.dumps({"final": {"loss": 0.5}}).encode())


class JobClock:
    """Watches Jobs; records when each turned Complete, when each was created, and the Job controller's own
    delay from the pod finishing (status.completionTime is whole seconds, so the watch clock is used).

    The watches read raw JSON lines and keep three fields: at 10,000 Jobs and their pods, building client
    models for every event would cost this process more CPU than the controller it measures."""

    def __init__(self, batch: client.BatchV1Api, core: client.CoreV1Api) -> None:
        self.batch, self.core = batch, core
        self.complete: dict[str, float] = {}
        self.added: dict[str, float] = {}
        self.pod_done: dict[str, float] = {}  # job name -> when its last pod was seen Succeeded
        self._pods_seen: set[str] = set()
        self.stop = threading.Event()
        threading.Thread(target=self._watch, args=(batch.list_namespaced_job, self._on_job), daemon=True).start()
        threading.Thread(target=self._watch, args=(core.list_namespaced_pod, self._on_pod), daemon=True).start()

    def _on_pod(self, pod: dict[str, Any], now: float) -> None:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        uid = pod["metadata"]["uid"]
        if job and (pod.get("status") or {}).get("phase") == "Succeeded" and uid not in self._pods_seen:
            self._pods_seen.add(uid)
            self.pod_done[job] = now

    def _on_job(self, job: dict[str, Any], now: float) -> None:
        name = job["metadata"]["name"]
        self.added.setdefault(name, now)
        conditions = (job.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions):
            self.complete.setdefault(name, now)

    def _watch(self, lister: Any, handle: Any) -> None:
        rv = None
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # a broken stream (or the cluster stopping at the end): again
                if rv is None:
                    listed = json.loads(lister(NS, _preload_content=False).data)
                    now = time.monotonic()
                    for item in listed["items"]:
                        handle(item, now)
                    rv = listed["metadata"]["resourceVersion"]
                response = lister(NS, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                  timeout_seconds=300, _preload_content=False)
                buffered = b""
                for chunk in response.stream(65536):
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            rv = None  # 410 Gone: list again
                            break
                        rv = event["object"]["metadata"].get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            handle(event["object"], time.monotonic())
                    if rv is None or self.stop.is_set():
                        break
                continue
            time.sleep(1)


def successor(name: str) -> str | None:
    run, _, rest = name.partition("-i")
    t, _, role = rest.partition("-")
    return f"{run}-i{t}-train" if role == "gen" else f"{run}-i{int(t) + 1}-gen"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def percentiles(values: list[float]) -> str:
    if not values:
        return "none measured"
    return f"p50 {statistics.median(values):.3f} s, p99 {percentile(values, 0.99):.3f} s"


def reaction(clock: JobClock, prefix: str) -> tuple[list[float], list[float]]:
    """Job Complete -> next Job created, and last pod Succeeded -> Job Complete, over the Jobs of runs whose
    names start with ``prefix``."""
    complete = {j: at for j, at in clock.complete.items() if j.startswith(prefix)}
    latencies = [clock.added[nxt] - at for job, at in complete.items()
                 if (nxt := successor(job)) in clock.added and clock.added[nxt] > at]
    baseline = [at - clock.pod_done[job] for job, at in complete.items()
                if job in clock.pod_done and at >= clock.pod_done[job]]
    return latencies, baseline


def own_share(before: dict[str, float], after: dict[str, float]) -> str:
    """The controller's own share of its reactions over an interval, from two scrapes of its /metrics: how long a
    due run waited for a worker, and how long its reconcile took, p50 and p99 as the histogram buckets bound them
    (the API server's share is the rest: watch delivery, and the time it takes to answer)."""
    shown = []
    for name, what in (("spin_controller_queue_wait_seconds", "queue wait"),
                       ("spin_controller_reconcile_seconds", "reconcile")):
        prefix = f'{name}_bucket{{le="'
        grown = sorted((float(k[len(prefix):-2]), v - before.get(k, 0.0)) for k, v in after.items()
                       if k.startswith(prefix))
        total = grown[-1][1] if grown else 0.0
        bound = {q: next((b for b, c in grown if c >= q * total), float("inf")) for q in (0.5, 0.99)}
        shown.append(f"{what} p50 <= {bound[0.5]:g} s, p99 <= {bound[0.99]:g} s over {total:.0f}")
    return "; ".join(shown)


def print_requests(spent: dict[str, float], iterations: int, seconds: float) -> None:
    """The runs' requests per iteration (everything but leases), by resource and verb; lease renewals per hour."""
    runs = {k: c for k, c in spent.items() if not k.startswith("leases ")}
    leases = sum(c for k, c in spent.items() if k.startswith("leases "))
    s3 = sum(c for k, c in runs.items() if k.startswith("S3 "))
    total = sum(runs.values())
    print(f"Kubernetes + S3 requests per iteration, the runs' own: {total / iterations:.2f} (target <= 10; "
          f"Kubernetes {(total - s3) / iterations:.2f}, S3 {s3 / iterations:.2f}) over {iterations} iterations: "
          + ", ".join(f"{k} {c / iterations:.2f}" for k, c in sorted(runs.items())))
    print(f"lease renewals, the controller's fixed cost shared by all runs: {leases} in {seconds:.0f} s = "
          f"{leases / seconds * 3600:.0f} per hour")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs for the latency phase (default 10; 0 skips)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per run (default 3)")
    parser.add_argument("--concurrent", type=int, default=100, help="runs at once in phase 3 (default 100; 0 skips)")
    parser.add_argument("--scale-runs", type=int, default=0,
                        help="runs at once in the scale phase (default 0: skipped; the issue's scale is 1000)")
    parser.add_argument("--scale-iterations", type=int, default=5,
                        help="iterations per scale run, two Jobs each (default 5: 1,000 runs make 10,000 Jobs)")
    parser.add_argument("--scale-shards", type=int, default=1,
                        help="generation shards (pods) per scale run's generation Job (default 1)")
    parser.add_argument("--scale-creators", type=int, default=8,
                        help="threads creating the scale runs and writing their outputs (default 8)")
    parser.add_argument("--controller-workers", type=int,
                        help="the controller's --workers (default: the controller's default)")
    parser.add_argument("--idle-runs", type=int, default=100, help="idle runs in phase 5 (default 100; 0 skips)")
    parser.add_argument("--idle-seconds", type=float, default=330.0,
                        help="how long phase 5 watches them (default 330: past one storage check)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spin-bench-"))
    print(f"bench directory: {root}", file=sys.stderr)
    with Cluster(root / "cluster") as cluster, S3Server(root / "s3") as s3server:
        s3 = s3server.client()
        s3.create_bucket(Bucket="bench")
        kube = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        core, batch, objects = client.CoreV1Api(kube), client.BatchV1Api(kube), client.CustomObjectsApi(kube)
        for crd in CRDS:
            client.ApiextensionsV1Api(kube).create_custom_resource_definition(yaml.safe_load(crd.read_text()))
        core.create_namespace({"metadata": {"name": NS}})
        wait_until("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", NS), 60)
        core.create_namespaced_secret(NS, {"metadata": {"name": "s3"}, "stringData": {
            "AWS_ACCESS_KEY_ID": s3server.access_key, "AWS_SECRET_ACCESS_KEY": s3server.secret_key}})
        time.sleep(2)  # the CRD's API appears
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "spin_k8s.controller", f"--kubeconfig={cluster.kubeconfig}",
                                 f"--namespace={NS}", f"--lease-namespace={NS}", f"--metrics-bind=127.0.0.1:{port}",
                                 f"--allowed-endpoint={s3server.endpoint}",
                                 *([f"--workers={args.controller_workers}"] if args.controller_workers else [])],
                                stdout=(root / "controller.log").open("wb"), stderr=subprocess.STDOUT)
        ctl = psutil.Process(proc.pid)
        servers = {p.name: psutil.Process(p.popen.pid) for p in cluster.processes}
        if s3server.process is not None:
            servers["weed (S3)"] = psutil.Process(s3server.process.popen.pid)
        servers["controller"], servers["bench"] = ctl, psutil.Process()

        def scrape() -> dict[str, float]:
            """Every counter of /metrics by its name and labels, as rendered."""
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line and not line.startswith("#")}

        def labels(series: str) -> dict[str, str]:
            inner = series[series.index("{") + 1:-1] if "{" in series else ""
            return {k: v.strip('"') for k, v in (kv.split("=", 1) for kv in inner.split(",") if kv)}

        def by_verb() -> dict[str, int]:
            """Kubernetes requests by resource and method ("jobs POST"), S3 requests by operation ("S3 GetObject")."""
            counts: dict[str, int] = collections.Counter()
            for series, v in scrape().items():
                if series.startswith("spin_controller_api_requests_total{"):
                    ls = labels(series)
                    counts[f"{ls.get('resource') or '?'} {ls.get('verb')}"] += int(v)
                elif series.startswith("spin_controller_s3_requests_total{"):
                    counts["S3 " + next(iter(labels(series).values()))] += int(v)
            return dict(counts)

        def reconciles() -> dict[str, int]:
            return {labels(k).get("result", ""): int(v) for k, v in scrape().items()
                    if k.startswith("spin_controller_reconciles_total{")}

        def requests() -> int:
            return sum(by_verb().values()) + 1  # 1: the metrics answered at all

        def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
            return {k: c - before.get(k, 0) for k, c in after.items() if c - before.get(k, 0)}

        def phases(names: list[str]) -> dict[str, str | None]:
            items, token = [], None
            while True:  # paged: 1,000 runs in one answer is megabytes
                page = objects.list_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL, limit=500,
                                                             _continue=token)
                items += page["items"]
                token = page["metadata"].get("continue")
                if not token:
                    break
            wanted = set(names)
            return {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items
                    if i["metadata"]["name"] in wanted}

        def check_done(names: list[str]) -> tuple[bool, int]:
            found = phases(names)
            failed = [n for n in names if found.get(n) == "Failed"]
            assert not failed, f"runs failed: {failed[:10]} (see {root}/controller.log)"
            succeeded = sum(found.get(n) == "Succeeded" for n in names)
            return succeeded == len(names), succeeded

        def create(name: str, iterations: int, shards: int = SHARDS) -> None:
            created = objects.create_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL,
                                                              run_body(name, s3server.endpoint, iterations,
                                                                       shards=shards))
            write_outputs(s3, created["metadata"]["uid"], name, iterations, shards)

        def run_all(names: list[str], iterations: int) -> None:
            for name in names:
                create(name, iterations)
            wait_until("runs to finish", lambda: check_done(names)[0], 1800)

        try:
            wait_until("the controller's metrics", requests, 30)
            # Its start-up (the Lease, a list and a watch per kind) is once per controller, not per iteration.
            wait_until("the controller's watches", lambda: sum(
                c for k, c in by_verb().items() if k.endswith(" WATCH")) >= 4, 60)
            clock = JobClock(batch, core)
            if args.runs:
                before, started, scraped = by_verb(), time.monotonic(), scrape()
                run_all([f"lat{i}" for i in range(args.runs)], args.iterations)
                latencies, baseline = reaction(clock, "lat")
                print(f"reaction latency over {len(latencies)} transitions: {percentiles(latencies)} "
                      f"(targets 0.2 / 1.0); the controller's own share: {own_share(scraped, scrape())}")
                print(f"baseline, the Job controller (last pod Succeeded -> Job Complete): {percentiles(baseline)}; "
                      f"ratio ours / Job controller at p50: "
                      f"{statistics.median(latencies) / statistics.median(baseline):.2f}")
                print_requests(delta(before, by_verb()), args.runs * args.iterations, time.monotonic() - started)

            if args.concurrent:
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
                print(f"{args.concurrent} concurrent runs: done in {time.monotonic() - started:.1f} s, controller "
                      f"peak RSS {peak / 2**20:.0f} MiB (target < 300), CPU {cpu:.1f} s")

            if args.scale_runs:
                held = scale(args, clock, servers, ctl, create, check_done, by_verb, delta, reconciles, batch,
                             scrape)
                if args.runs:
                    scraped = scrape()
                    # The latency phase again, with every scale run and Job still there: the controller's
                    # reaction with its cache at full size, apart from the storm of 1,000 runs moving at once.
                    run_all([f"held{i}" for i in range(args.runs)], args.iterations)
                    latencies, baseline = reaction(clock, "held")
                    print(f"scale: reaction latency of {args.runs} runs started after it, the {args.scale_runs} "
                          f"scale runs and their {held} Jobs held: {percentiles(latencies)} "
                          f"(target p99 < 1); the Job controller: {percentiles(baseline)}; the controller's own "
                          f"share: {own_share(scraped, scrape())}")

            if args.idle_runs:
                idle = [f"idle{i}" for i in range(args.idle_runs)]
                for name in idle:
                    objects.create_namespaced_custom_object(api.GROUP, api.VERSION, NS, api.PLURAL,
                                                            run_body(name, s3server.endpoint, 1, hang=True))
                wait_until("every idle run's generation Job", lambda: all(
                    f"{n}-i0-gen" in clock.added for n in idle), 600)
                time.sleep(30)  # their pods start and the Jobs' own status updates settle
                before, started = by_verb(), time.monotonic()
                time.sleep(args.idle_seconds)
                seconds = time.monotonic() - started
                per_hour = args.idle_runs * seconds / 3600
                spent = delta(before, by_verb())
                leases = sum(c for k, c in spent.items() if k.startswith("leases "))
                runs = {k: c for k, c in spent.items() if not k.startswith("leases ")}
                s3_spent = sum(c for k, c in runs.items() if k.startswith("S3 "))
                total = sum(runs.values())
                print(f"{args.idle_runs} idle runs for {seconds:.0f} s: {total / per_hour:.1f} requests per idle "
                      f"run-hour (target < 100; Kubernetes {(total - s3_spent) / per_hour:.1f}, "
                      f"S3 {s3_spent / per_hour:.1f}): "
                      + ", ".join(f"{k} {c / per_hour:.2f}" for k, c in sorted(runs.items())))
                print(f"lease renewals, the controller's fixed cost shared by all runs: "
                      f"{leases / seconds * 3600:.0f} per hour (not per run)")
            clock.stop.set()
        finally:
            proc.kill()
            proc.wait()
    return 0


def scale(args: argparse.Namespace, clock: JobClock, servers: dict[str, psutil.Process], ctl: psutil.Process,
          create: Any, check_done: Any, by_verb: Any, delta: Any, reconciles: Any, batch: client.BatchV1Api,
          scrape: Any) -> int:
    """Phase 4: ``--scale-runs`` runs at once, every Job kept; how many Jobs of ours the namespace holds after."""
    n, iterations = args.scale_runs, args.scale_iterations
    names = [f"scale{i}" for i in range(n)]
    cpu_before = {name: _cpu(p) for name, p in servers.items()}
    peak = ctl.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.5):
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ctl.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    before, reconciled, started, scraped = by_verb(), reconciles(), time.monotonic(), scrape()
    with concurrent.futures.ThreadPoolExecutor(args.scale_creators) as pool:
        for future in [pool.submit(create, name, iterations, args.scale_shards) for name in names]:
            future.result()
    print(f"{time.monotonic() - started:7.1f}s created {n} runs and wrote their outputs", file=sys.stderr)
    done, succeeded = False, 0
    deadline = started + 4 * 3600
    while not done:
        assert time.monotonic() < deadline, f"the scale runs did not finish: {succeeded} of {n} succeeded"
        time.sleep(10)
        done, succeeded = check_done(names)
        jobs = sum(1 for j in list(clock.added) if j.startswith("scale"))
        print(f"{time.monotonic() - started:7.1f}s {succeeded}/{n} runs succeeded, {jobs} Jobs, "
              f"{sum(1 for j in list(clock.complete) if j.startswith('scale'))} complete, controller RSS "
              f"{ctl.memory_info().rss / 2**20:.0f} MiB, CPU {sum(ctl.cpu_times()[:2]):.0f} s", file=sys.stderr)
    wall = time.monotonic() - started
    stop.set()
    spent, reconciled, share = delta(before, by_verb()), delta(reconciled, reconciles()), own_share(scraped, scrape())
    cpu = {name: _cpu(p) - cpu_before[name] for name, p in servers.items()}
    label = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER}"
    held, token = 0, None
    while True:  # what the controller's Job watch lists: every Job of ours, finished ones included
        page = batch.list_namespaced_job(NS, label_selector=label, limit=500, _continue=token)
        held += len(page.items)
        token = page.metadata._continue
        if not token:
            break
    latencies, baseline = reaction(clock, "scale")
    print(f"scale: {n} concurrent runs x {iterations} iterations, {held} Jobs of ours in the namespace (all kept: "
          f"the controller's Job cache holds them), done in {wall:.0f} s ({n * iterations / wall:.1f} iterations/s)")
    print(f"scale: reaction latency over {len(latencies)} transitions: {percentiles(latencies)} (target p99 < 1)")
    print(f"scale: baseline, the Job controller (last pod Succeeded -> Job Complete): {percentiles(baseline)}")
    print(f"scale: the controller's own share: {share}")
    print(f"scale: controller peak RSS {peak / 2**20:.0f} MiB (target < 500), CPU {cpu['controller']:.0f} s; "
          f"reconciles {dict(sorted(reconciled.items()))}")
    print("scale: CPU seconds by process (2 cores): "
          + ", ".join(f"{name} {c:.0f}" for name, c in sorted(cpu.items(), key=lambda kv: -kv[1])))
    print_requests(spent, n * iterations, wall)
    return held


def _cpu(p: psutil.Process) -> float:
    """A process's own CPU seconds (user + system), not its children's: the bench's children are the servers."""
    with contextlib.suppress(psutil.Error):
        return float(sum(p.cpu_times()[:2]))
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
