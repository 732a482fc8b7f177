"""A minimal in-test SyncService on 127.0.0.1:0 (real gRPC) with fault injection.

Used where the scenario needs what the real daemon cannot be told to do (lose a receipt after
storing, serve a tampered update). The real `cloud-server` is used by tests/integration.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from shared.pb.v1 import sync_pb2_grpc
from shared.types import UpdateAck, UpdateHeader, UploadReceipt, UploadSample
from shared.wire import convert


@dataclass
class CloudState:
    """What the fake cloud received and what it will do next."""

    samples: list[UploadSample] = field(default_factory=list)
    upload_ids: list[str] = field(default_factory=list)
    receipts: dict[str, UploadReceipt] = field(default_factory=dict)
    fail_next_uploads: int = 0
    """Refuse this many uploads with UNAVAILABLE before storing."""
    lose_next_receipts: int = 0
    """Store this many uploads, then fail the call (the receipt is lost on the way)."""
    updates: dict[int, tuple[UpdateHeader, bytes]] = field(default_factory=dict)
    """Served by `have_version`."""
    update_queue: list[tuple[UpdateHeader, bytes]] = field(default_factory=list)
    """Served first, whatever the device holds (a faulty or hostile cloud); the head is
    dropped once the device acknowledges its version."""
    acks: list[UpdateAck] = field(default_factory=list)
    calls: int = 0
    hold_after_storing: int | None = None
    """0-based index of the stored upload whose receipt is held until `release` is set."""
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class FakeSyncServicer(sync_pb2_grpc.SyncServiceServicer):
    """Stores uploads by id (idempotent), serves scripted updates, records acks."""

    def __init__(self, state: CloudState) -> None:
        self.state = state
        self._lock = threading.Lock()

    def UploadSamples(self, request_iterator, context):  # noqa: N802
        upload_id, payload = convert.reassemble_upload(request_iterator, 64 << 20)
        batch = convert.decode_sample_batch(payload, convert.UploadLimits())
        with self._lock:
            st = self.state
            st.calls += 1
            if st.fail_next_uploads > 0:
                st.fail_next_uploads -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected outage")
            if upload_id in st.receipts:
                r = st.receipts[upload_id]
                return convert.receipt_to_pb(UploadReceipt(upload_id, 0, True, r.pending_samples))
            st.samples.extend(batch.samples)
            st.upload_ids.append(upload_id)
            receipt = UploadReceipt(upload_id, len(batch.samples), False, len(st.samples))
            st.receipts[upload_id] = receipt
            if st.lose_next_receipts > 0:
                st.lose_next_receipts -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected lost receipt")
            hold = st.hold_after_storing == len(st.upload_ids) - 1
        if hold:
            st.holding.set()
            st.release.wait(60)
        return convert.receipt_to_pb(receipt)

    def GetUpdate(self, request, context):  # noqa: N802
        have = convert.have_version_from_pb(request)
        with self._lock:
            queued = self.state.update_queue[0] if self.state.update_queue else None
        item = queued or self.state.updates.get(have)
        if item is None:
            return
        yield from convert.update_chunks(*item)

    def AckUpdate(self, request, context):  # noqa: N802
        ack = convert.ack_from_pb(request)
        with self._lock:
            self.state.acks.append(ack)
            q = self.state.update_queue
            if q and q[0][0].version == ack.version:
                q.pop(0)
        return convert.ack_response_to_pb(ack.version if ack.outcome == "applied" else 0)


class FakeCloud:
    """Context manager: a real grpc.Server on 127.0.0.1:0 with the fake servicer."""

    def __init__(self) -> None:
        self.state = CloudState()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        sync_pb2_grpc.add_SyncServiceServicer_to_server(FakeSyncServicer(self.state), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeCloud:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0).wait()
