"""The fault proxy itself: forwards, cuts and refuses as told (so fault tests can trust it)."""

from __future__ import annotations

import socket
import threading

from tests.faultproxy import FaultProxy


def _echo(conn: socket.socket) -> None:
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:  # the proxy resets connections on purpose
        pass
    finally:
        conn.close()


def _echo_server() -> tuple[socket.socket, str]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def test_forwards_then_cuts_then_refuses() -> None:
    srv, addr = _echo_server()
    proxy = FaultProxy(addr)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
    proxy.cut_after(3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.sendall(b"abcdef")
        got = b""
        try:
            while chunk := c.recv(10):
                got += chunk
        except OSError:
            pass
        assert len(got) < 6
    assert proxy.stats.cuts == 1
    proxy.set_refuse()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.settimeout(2)
        try:
            assert c.recv(1) == b""
        except OSError:
            pass
    assert proxy.stats.refused == 1
    proxy.close()
    srv.close()
