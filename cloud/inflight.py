"""Counts SyncService calls in progress, so a drain can wait for them itself.

While the count drains, the server stays up and the draining servicer answers new calls with
UNAVAILABLE; once gRPC core's own `stop()` has begun it would reject them as CANCELLED instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class InFlightCalls(grpc.ServerInterceptor):
    """Server interceptor counting the calls of one service from start to last response."""

    def __init__(self, service_name: str) -> None:
        self._prefix = f"/{service_name}/"
        self._count = 0
        self._idle = threading.Condition()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no call is in progress or `timeout_s` passes; True when idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=max(0.0, timeout_s))

    def _enter(self) -> None:
        with self._idle:
            self._count += 1

    def _exit(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def _unary(self, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter()
            try:
                return fn(request, context)
            finally:
                self._exit()
        return run

    def _streaming(self, fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                   ) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._enter()
            try:
                yield from fn(request, context)
            finally:  # also on a cancelled stream: gRPC closes the generator
                self._exit()
        return run

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream))
        return handler._replace(stream_stream=self._streaming(handler.stream_stream))
