"""A TCP proxy for fault injection between a real client and a real server on loopback.

Modes can change at any time from the test: `pass`, `refuse` (accept then close at once),
`stall` (hold bytes without forwarding), and `cut_after(n)` (forward n more bytes in either
direction, then reset every connection). Counts what it did so tests can assert faults happened.
"""

from __future__ import annotations

import random
import select
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    """What the proxy did so far."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes_forwarded: int = 0
    events: list[str] = field(default_factory=list)


class FaultProxy:
    """Listens on 127.0.0.1:0 and forwards to `target` ("host:port")."""

    def __init__(self, target: str, seed: int = 0) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.stats = ProxyStats()
        self._mode = "pass"
        self._budget = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    # --- controls -------------------------------------------------------------------------

    def set_pass(self) -> None:
        """Forward everything."""
        with self._lock:
            self._mode = "pass"

    def set_refuse(self) -> None:
        """Close new connections immediately and reset live ones."""
        with self._lock:
            self._mode = "refuse"
        self._reset_all("refuse")

    def set_stall(self) -> None:
        """Stop forwarding (bytes are held in the kernel buffers) until another mode is set."""
        with self._lock:
            self._mode = "stall"

    def cut_after(self, n_bytes: int | None = None) -> None:
        """Forward `n_bytes` more (random 1..256 KiB if None), then reset all connections."""
        with self._lock:
            self._mode = "cut"
            self._budget = n_bytes if n_bytes is not None else self._rng.randint(1, 256 * 1024)

    def close(self) -> None:
        """Stop accepting and reset everything."""
        self._closed.set()
        self._listener.close()
        self._reset_all("close")

    # --- internals ------------------------------------------------------------------------

    def _reset_all(self, why: str) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b in conns:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                except OSError:
                    pass
        if conns:
            self.stats.events.append(f"{why}: reset {len(conns)}")

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.stats.connections += 1
            if self._mode == "refuse":
                self.stats.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._closed.is_set():
                if self._mode == "stall":
                    self._closed.wait(0.05)
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if self._mode == "cut":
                        with self._lock:
                            allowed = min(len(data), self._budget)
                            self._budget -= allowed
                        peers[s].sendall(data[:allowed])
                        self.stats.bytes_forwarded += allowed
                        if self._budget <= 0:
                            self.stats.cuts += 1
                            with self._lock:
                                self._mode = "pass"
                            self._reset_all("cut")
                            return
                        continue
                    peers[s].sendall(data)
                    self.stats.bytes_forwarded += len(data)
        except (OSError, ValueError):  # ValueError: another thread reset (closed) this socket
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
