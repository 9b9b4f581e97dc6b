"""``python -m spin_k8s.testing up``: bring the test environment up by hand, for debugging.

Starts the control plane, the node agent (or with ``--real-node`` a kubelet on containerd with a pod network
and CoreDNS, spin_k8s/testing/node.py) and the S3 server in a directory (``--dir``, else a new temporary
one), prints the environment variables to use them, and runs until Ctrl-C or ``python -m spin_k8s.testing
down [--dir DIR]``, then stops everything by PID. Each environment keeps its PID in its own directory, so
several can run side by side and each is stopped by its directory; ``down`` returns once it has stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server

PIDFILE = "testenv.pid"  # in the environment's directory
TEMP_PREFIX = "spin-k8s-env-"  # of the directories `up` makes without --dir
STOP_SECONDS = 120.0  # how long `down` waits: stopping etcd, the apiserver and pods takes ~35 s


def alive(pid: int) -> bool:
    """Whether ``pid`` is an environment's `up` (not a PID since reused by another program)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"spin_k8s.testing" in cmdline.read_bytes()


def running_pid(root: Path) -> int | None:
    """The PID of the `up` that owns ``root``, if it still runs (a pidfile left by a killed `up` is stale)."""
    try:
        pid = int((root / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def up(root: Path, with_s3: bool, real_node: bool = False) -> int:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (pid := running_pid(root)) is not None:
        print(f"a test environment already runs in {root} (pid {pid})", file=sys.stderr)
        return 1
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # while starting: abort the start, which stops what it started

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    (root / PIDFILE).write_text(str(os.getpid()))
    try:
        with Cluster(root / "cluster", real_node=real_node) as cluster:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            s3 = S3Server(root / "s3", host=cluster.host).start() if with_s3 else None
            try:
                print(f"# test environment in {root}; paste these lines into a shell:")
                print(f"export KUBECONFIG={cluster.kubeconfig}")
                for key, value in (s3.env() if s3 else {}).items():
                    print(f"export {key}={value}")
                if not real_node:
                    print(f"# pod logs: {cluster.node_root}/pods/<ns>_<pod>_<uid>/<container>.log")
                print(f"# Ctrl-C or `python -m spin_k8s.testing down --dir {root}` stops everything", flush=True)
                stop.wait()
            finally:
                if s3:
                    s3.stop()
    except KeyboardInterrupt:
        print("interrupted while starting: stopped", file=sys.stderr)
        return 130
    finally:
        (root / PIDFILE).unlink(missing_ok=True)
    return 0


def down(root: Path | None, timeout: float = STOP_SECONDS) -> int:
    """Stop the environment in ``root`` (None: the one running in a temporary directory) and wait until it
    has stopped."""
    if root is None:
        temp = Path(tempfile.gettempdir())
        found = [d for d in sorted(temp.glob(f"{TEMP_PREFIX}*")) if running_pid(d) is not None]
        if len(found) != 1:
            print("no test environment is running in a temporary directory; stop one started with --dir by "
                  "`down --dir DIR`" if not found else
                  f"{len(found)} test environments are running; stop one by `down --dir DIR`: "
                  f"{', '.join(map(str, found))}", file=sys.stderr)
            return 1
        root = found[0]
    pid = running_pid(root)
    if pid is None:
        print(f"no test environment is running in {root}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    print(f"stopping the test environment in {root} (pid {pid})", flush=True)
    deadline = time.monotonic() + timeout
    while alive(pid):  # its pidfile goes first, then the process
        if time.monotonic() > deadline:
            print(f"still running after {timeout:g}s: `kill -9 {pid}` stops it (its servers may outlive it)",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_k8s.testing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  python -m spin_k8s.testing up --dir /tmp/spin-env\n"
                                            "  python -m spin_k8s.testing down --dir /tmp/spin-env")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start everything and wait for Ctrl-C")
    p_up.add_argument("--dir", type=Path, help="where to keep state (default: a new temp dir)")
    p_up.add_argument("--no-s3", action="store_true", help="skip the S3 server")
    p_up.add_argument("--real-node", action="store_true",
                      help="a real kubelet, containerd, pod network and CoreDNS instead of the node agent (root; "
                           "one per machine)")
    p_down = sub.add_parser("down", help="stop an environment started with `up` and wait until it has stopped")
    p_down.add_argument("--dir", type=Path,
                        help="the environment's directory (default: the one running in a temporary directory)")
    args = parser.parse_args(argv)
    if args.command == "down":
        return down(args.dir)
    return up(args.dir or Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)), not args.no_s3, args.real_node)


if __name__ == "__main__":
    sys.exit(main())
