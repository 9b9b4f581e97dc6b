"""The controller's Prometheus metrics: counters and histograms kept in-process and served as text on
``/metrics``, and ``/healthz`` for probes (500 when the controller says it is unhealthy: a leader past its renew
deadline). Counting API requests at the client's one exit point tells how many requests an iteration costs, the
figure the benchmark reports; the queue-wait and reconcile-time histograms tell the controller's own share of a
reaction from the API server's."""

from __future__ import annotations

import bisect
import http.server
import itertools
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
_histograms: dict[str, list[float]] = {}  # by name: a count per bucket of BUCKETS and +Inf, then the sum
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_HELP = {
    "spin_controller_api_requests_total": "Requests the controller sent to the Kubernetes API, by HTTP method "
                                          "(WATCH for a watch) and resource (leases apart from the runs' own).",
    "spin_controller_reconciles_total": "Reconciles, by result (ok, changed, error).",
    "spin_controller_s3_requests_total": "Requests the controller sent to S3 (lineage reads and writes), by operation.",
    "spin_controller_fenced_requests_total": "Writes refused before they were sent: not a leader that renewed "
                                             "its Lease in time, by verb.",
}
_HISTOGRAM_HELP = {
    "spin_controller_queue_wait_seconds": "How long a run, due for a reconcile, waited for a free worker.",
    "spin_controller_reconcile_seconds": "How long a reconcile took (its API and S3 requests included).",
}


def inc(name: str, **labels: str) -> None:
    with _lock:
        _counters[(name, tuple(sorted(labels.items())))] += 1


def value(name: str, **labels: str) -> int:
    """The sum of a counter over every label set that contains ``labels``."""
    want = set(labels.items())
    with _lock:
        return sum(v for (n, ls), v in _counters.items() if n == name and want <= set(ls))


def observe(name: str, seconds: float) -> None:
    assert name in _HISTOGRAM_HELP, name
    with _lock:
        counts = _histograms.setdefault(name, [0.0] * (len(BUCKETS) + 2))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds
        counts[-1] += seconds


def render() -> str:
    lines = []
    with _lock:
        items = sorted(_counters.items())
        histograms = {name: list(counts) for name, counts in _histograms.items()}
    for name, help_text in sorted(_HISTOGRAM_HELP.items()):
        counts = histograms.get(name) or [0.0] * (len(BUCKETS) + 2)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = list(itertools.accumulate(counts[:-1]))
        bounds = [*BUCKETS, "+Inf"]
        lines += [f'{name}_bucket{{le="{b}"}} {c:.0f}' for b, c in zip(bounds, cumulative, strict=True)]
        lines += [f"{name}_sum {counts[-1]}", f"{name}_count {cumulative[-1]:.0f}"]
    for name in sorted({n for (n, _), _ in items} | set(_HELP)):
        lines += [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} counter"]
        for (n, labels), v in items:
            if n == name:
                rendered = ",".join(f'{k}="{val}"' for k, val in labels)
                lines.append(f"{name}{{{rendered}}} {v}" if rendered else f"{name} {v}")
    return "\n".join(lines) + "\n"


def resource_of(url: str) -> str:
    """The resource a Kubernetes API URL names: ``/apis/batch/v1/namespaces/ns/jobs/x/status`` -> ``jobs``."""
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # past /api/v1 or /apis/GROUP/VERSION
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    return rest[0] if rest else ""


def count_requests(api_client: Any) -> None:
    """Wrap the client's REST layer (every request, watches included, passes through it once). A watch counts
    as WATCH, as the API server counts it: what grows with time (a watch resumed) apart from what does not."""
    rest = api_client.rest_client
    original = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        watching = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("watch") == ["true"]
        inc("spin_controller_api_requests_total", verb="WATCH" if watching else method.upper(),
            resource=resource_of(url))
        return original(method, url, *args, **kwargs)

    rest.request = request


class _Server(http.server.ThreadingHTTPServer):
    healthy: Callable[[], bool]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        code = 200
        if self.path == "/metrics":
            body, ctype = render().encode(), "text/plain; version=0.0.4"
        elif self.path in ("/healthz", "/readyz"):
            code = 200 if self.server.healthy() else 500
            body, ctype = (b"ok\n" if code == 200 else b"leader Lease not renewed within the renew deadline\n",
                           "text/plain")
        else:
            self.send_error(404)
            return
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the controller's own log


def serve(address: str, port: int, healthy: Callable[[], bool] = lambda: True) -> http.server.ThreadingHTTPServer:
    server = _Server((address, port), _Handler)
    server.healthy = healthy
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
