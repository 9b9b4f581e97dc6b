"""``python -m spin_k8s.testing up``: bring the test environment up by hand, for debugging.

Starts the control plane, the node agent and the S3 server in a fresh directory, prints the environment
variables to use them, and runs until Ctrl-C (or ``python -m spin_k8s.testing down``), then stops
everything by PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server

PIDFILE = Path(tempfile.gettempdir()) / "spin-k8s-testenv.pid"


def up(root: Path, with_s3: bool) -> int:
    root.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Cluster(root / "cluster") as cluster:
        s3 = S3Server(root / "s3").start() if with_s3 else None
        try:
            PIDFILE.write_text(str(os.getpid()))
            print(f"# test environment in {root}; paste these lines into a shell:")
            print(f"export KUBECONFIG={cluster.kubeconfig}")
            for key, value in (s3.env() if s3 else {}).items():
                print(f"export {key}={value}")
            print(f"# pod logs: {cluster.node_root}/pods/<ns>_<pod>_<uid>/<container>.log")
            print("# Ctrl-C or `python -m spin_k8s.testing down` stops everything", flush=True)
            stop.wait()
        finally:
            PIDFILE.unlink(missing_ok=True)
            if s3:
                s3.stop()
    return 0


def down() -> int:
    try:
        pid = int(PIDFILE.read_text())
    except (FileNotFoundError, ValueError):
        print("no test environment is running", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    print(f"stopping the test environment (pid {pid})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_k8s.testing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start everything and wait for Ctrl-C")
    p_up.add_argument("--dir", type=Path, help="where to keep state (default: a new temp dir)")
    p_up.add_argument("--no-s3", action="store_true", help="skip the S3 server")
    sub.add_parser("down", help="stop an environment started with `up`")
    args = parser.parse_args()
    if args.command == "down":
        return down()
    return up(args.dir or Path(tempfile.mkdtemp(prefix="spin-k8s-env-")), not args.no_s3)


if __name__ == "__main__":
    sys.exit(main())
