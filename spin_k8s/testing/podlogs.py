"""The one piece of the kubelet API the node agent serves: ``GET /containerLogs/{ns}/{pod}/{container}``.

kube-apiserver answers ``kubectl logs`` (and the client's ``read_namespaced_pod_log``) by calling the kubelet
of the pod's Node at its InternalIP and ``status.daemonEndpoints.kubeletEndpoint.Port`` over TLS, checking the
serving certificate against ``--kubelet-certificate-authority`` and presenting its
``--kubelet-client-certificate``. This server does the same handshake (a client certificate from the
cluster CA is required) and streams the container's log file from the node agent's pod directory, honouring
``tailLines``, ``limitBytes`` and ``follow`` (until the pod's processes are gone and the file is drained).
"""

from __future__ import annotations

import http.server
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

FOLLOW_POLL_SECONDS = 0.2


def find_log(pods_root: Path, namespace: str, pod: str, container: str) -> Path | None:
    """A container's log in the newest directory of a pod of that name (a name may be reused after a delete)."""
    dirs = sorted(pods_root.glob(f"{namespace}_{pod}_*"), key=lambda d: d.stat().st_mtime)
    for d in reversed(dirs):
        if (d / f"{container}.log").is_file():
            return d / f"{container}.log"
    return None


def select(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The part of a log the query asks for: the last ``tail_lines`` lines, then at most ``limit_bytes``."""
    if tail_lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


class LogServer:
    """Serves container logs over mutual TLS on 127.0.0.1. ``running(pod_dir)`` says whether a pod's
    processes still run (a follow ends when they are gone)."""

    def __init__(self, pods_root: Path, running: Callable[[Path], bool], cert: Path, key: Path, client_ca: Path,
                 port: int = 0) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # the apiserver logs its own requests

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                log = find_log(server.pods_root, *parts[1:]) if len(parts) == 4 and parts[0] == "containerLogs" \
                    else None
                if log is None:
                    body = b"no such container log\n"
                    self.send_response(404)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
                tail = int(query["tailLines"]) if "tailLines" in query else None
                limit = int(query["limitBytes"]) if "limitBytes" in query else None
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with log.open("rb") as f:
                    data = select(f.read(), tail, limit)
                    if data:
                        self._chunk(data)
                    sent = len(data)
                    while query.get("follow") == "true" and (limit is None or sent < limit):
                        more = f.read()
                        if more:
                            more = more[: None if limit is None else limit - sent]
                            self._chunk(more)
                            sent += len(more)
                        elif not server.running(log.parent):
                            break
                        else:
                            time.sleep(FOLLOW_POLL_SECONDS)
                self.wfile.write(b"0\r\n\r\n")

        self.pods_root = pods_root
        self.running = running
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED  # only the apiserver (a CA-signed client) may read logs
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port: int = self._httpd.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self._httpd.serve_forever, name="pod-logs", daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
