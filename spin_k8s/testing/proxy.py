"""A TCP forwarder on loopback for fault tests: put it between a client and a server, then switch it to
blackhole and back.

Forwarding, it copies bytes both ways and passes on each side's close. Blackholed, every connection open then
or accepted later is held open and silent: nothing is forwarded, nothing is closed, no reset is sent, which is
what a half-open connection (a dead peer, a dropped NAT entry, a partition) looks like to the client. Restored,
new connections are forwarded again; the silenced ones stay silent until the proxy stops, as a dead peer's would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``. Use as a context manager, or call start() / stop()."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._silenced = False
        self._live: list[tuple[socket.socket, socket.socket, threading.Event]] = []  # client, server, dead
        self._held: list[socket.socket] = []  # every socket, closed at stop

    def start(self) -> Proxy:
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()
        return self

    def blackhole(self) -> None:
        """Silence every open connection and every one accepted from now on."""
        with self._lock:
            self._silenced = True
            for _, _, dead in self._live:
                dead.set()
            self._live.clear()

    def restore(self) -> None:
        """Forward connections accepted from now on."""
        with self._lock:
            self._silenced = False

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._held:
                with contextlib.suppress(OSError):
                    s.close()
            self._held.clear()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._held.append(downstream)
                silenced = self._silenced
            if silenced:
                continue  # accepted (the client's connect succeeds), then never answered
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            dead = threading.Event()
            with self._lock:
                self._held.append(upstream)
                if self._silenced:
                    continue
                self._live.append((downstream, upstream, dead))
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst, dead), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, dead: threading.Event) -> None:
        """Copy ``src`` to ``dst`` until ``src`` closes (then close ``dst`` for writing) or the connection is
        silenced (then stop reading and leave both open)."""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if dead.is_set():
                return  # what arrived after the blackhole is dropped
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
