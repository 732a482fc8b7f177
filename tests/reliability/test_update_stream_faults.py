"""GetUpdate streams broken on the way: the real cloud-server SIGKILLed mid-stream, and a TCP
proxy that cuts, refuses and stalls downloads at random points.

The device side is the agent's own downlink code (Agent.poll_updates_once -> GrpcTransport ->
AdapterUpdater -> AdapterStore on disk) on a peft MLP whose updates are ~2.9 MB (3 chunks), so the
faults land between and inside chunks. Invariants after every fault: the adapter serving is bit
for bit one the cloud published (never a partial one), the pointer on disk names it, no network
fault is ever acknowledged as a rejection, and once the link is back the device holds the newest
update and the cloud records that version.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from device.agent import Agent, AgentOptions
from device.outbox import Outbox, OutboxConfig
from device.runtime.adapter_store import AdapterStore, Pointer
from device.runtime.loader import adapter_state
from device.sync.client import GrpcTransport
from device.sync.credentials import Credentials
from device.sync.transport import RETRYABLE_CODES
from device.sync.updater import AdapterUpdater, UpdaterConfig
from shared.errors import TransportError
from shared.types import Enrollment
from tests.cloud.daemon import SECRET, rows, start_cloud
from tests.faultproxy import FaultProxy
from tests.reliability.updates import (
    chain,
    cloud_base_model_hash,
    digest,
    mlp_device,
    publish_chain,
)

log = logging.getLogger(__name__)
pytestmark = pytest.mark.integration

WIDTH, RANK = 768, 512  # 4 * 768 * 512 = 1.57 M adapter params: ~2.9 MB (fp16, zstd) per update
DEVICE = "cam-dl"


class _Source:
    name = "unused"  # the downlink path never reads inputs


class _Device:
    """The agent's downlink on a peft MLP, talking to `address`."""

    def __init__(self, tmp_path: Path, address: str, timeout_s: float) -> None:
        self.model = mlp_device(WIDTH, RANK)
        self.v0 = adapter_state(self.model)
        self.store = AdapterStore(tmp_path / "dev" / "adapters")
        self.tmp_path = tmp_path
        self.timeout_s = timeout_s
        self.connect(address)
        grant = self.transport.register(Enrollment(DEVICE, SECRET, "test"))
        self.transport.credentials = self.creds = Credentials(
            DEVICE, grant.device_token, grant.cloud_public_key, grant.base_model_hash)
        self.updater = AdapterUpdater(self.model, self.store, UpdaterConfig(rollback_margin=1.0),
                                      DEVICE, grant.cloud_public_key, grant.base_model_hash,
                                      probe=lambda: 1.0)
        outbox = Outbox(tmp_path / "dev" / "outbox.sqlite3", OutboxConfig())
        self.agent = Agent(None, None, outbox, _Source(), tmp_path / "answers.jsonl",  # type: ignore[arg-type]
                           tmp_path / "status.json", AgentOptions(), self.transport,
                           None, self.updater)

    def connect(self, address: str) -> None:
        # The agent polls every few seconds; these loops poll at once, so reconnect promptly
        # after a reset instead of failing fast through gRPC's default 1-120 s backoff. Without
        # BDP probing the HTTP/2 window stays small, so the cloud can be at most about one chunk
        # ahead of what the device has received: a fault "a third into the stream" is one.
        channel = grpc.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 200), ("grpc.http2.bdp_probe", 0)])
        self.transport = GrpcTransport(channel, self.timeout_s, getattr(self, "creds", None))
        if hasattr(self, "agent"):
            self.agent.transport = self.transport

    def serving(self) -> tuple[int, str]:
        """(version the updater serves, digest of the weights in the model)."""
        return self.updater.version, digest(adapter_state(self.model))

    def check_consistent(self, expected: dict[int, str]) -> None:
        version, held = self.serving()
        assert held == expected[version], f"model weights are not version {version}'s"
        ptr = self.store.pointer()
        assert ptr is not None and ptr.version == version and not ptr.probation
        on_disk = digest(self.store.read(version))
        assert on_disk == expected[version], f"stored v{version} differs from what was published"


def _setup(tmp_path: Path, n_updates: int) -> tuple[dict[int, str], int]:
    """Publish a chain of `n_updates` for DEVICE; returns digests by version and payload bytes."""
    v0 = adapter_state(mlp_device(WIDTH, RANK))
    published = publish_chain(tmp_path / "cloud", DEVICE, [v0, *chain(v0, n_updates)],
                              cloud_base_model_hash())
    expected = {0: digest(v0)} | {h.version: digest(held) for h, _, held in published}
    return expected, published[0][0].payload_bytes


def test_cloud_sigkill_mid_update_stream(tmp_path: Path) -> None:
    expected, payload_bytes = _setup(tmp_path, 1)
    assert payload_bytes > 2 * 1024 * 1024  # 3 chunks of <= 1 MiB
    cloud = start_cloud(tmp_path, worker={"enabled": False})
    proxy = FaultProxy(cloud.address)
    try:
        dev = _Device(tmp_path, proxy.address, timeout_s=30.0)
        start = proxy.stats.bytes_forwarded
        outcome: list[Any] = []

        def poll() -> None:
            try:
                outcome.append(dev.agent.poll_updates_once())
            except TransportError as e:
                outcome.append(e)

        poller = threading.Thread(target=poll)
        poller.start()
        deadline = time.monotonic() + 60
        while proxy.stats.bytes_forwarded - start < payload_bytes // 3:
            assert time.monotonic() < deadline and poller.is_alive(), "stream never started"
            time.sleep(0.002)
        # The cloud host dies a third of the way into the stream: what it had sent but the
        # device had not received dies with it (the proxy holds it, then resets).
        proxy.set_stall()
        cloud.stop(signal.SIGKILL)
        proxy.set_refuse()
        poller.join(60)
        received = proxy.stats.bytes_forwarded - start
        (err,) = outcome
        assert isinstance(err, TransportError) and err.code in RETRYABLE_CODES, err
        assert received < payload_bytes
        log.info("cloud SIGKILLed after %d of %d update bytes reached the device: %s",
                 received, payload_bytes, err.code)
        dev.check_consistent(expected)
        assert dev.serving()[0] == 0 and dev.store.versions() == [0]
        assert rows(tmp_path, "SELECT status FROM updates") == [("produced",)]

        cloud = start_cloud(tmp_path, worker={"enabled": False})
        dev.connect(cloud.address)
        ack = dev.agent.poll_updates_once()
        assert ack is not None and ack.outcome == "applied", ack
        dev.check_consistent(expected)
        assert dev.serving()[0] == 1
        assert rows(tmp_path, f"SELECT adapter_version FROM devices WHERE device_id='{DEVICE}'"
                    ) == [(1,)]
        assert rows(tmp_path, "SELECT status FROM updates") == [("applied",)]
    finally:
        proxy.close()
        cloud.stop(signal.SIGKILL)


def test_download_cuts_refusals_and_stalls(tmp_path: Path) -> None:
    n = 4
    expected, payload_bytes = _setup(tmp_path, n)
    cloud = start_cloud(tmp_path, worker={"enabled": False})
    proxy = FaultProxy(cloud.address, seed=11)
    rng = random.Random(11)
    faults: dict[str, int] = {}
    codes: dict[str, int] = {}
    outcomes: list[str] = []
    try:
        dev = _Device(tmp_path, proxy.address, timeout_s=3.0)  # a stall ends in DEADLINE_EXCEEDED
        for _ in range(80):
            if dev.serving()[0] == n and not dev.agent._pending_acks:
                break
            fault = rng.choice(["cut", "cut", "cut", "refuse", "stall", "pass"])
            faults[fault] = faults.get(fault, 0) + 1
            if fault == "cut":  # anywhere in request, header, chunks or the ack
                proxy.cut_after(rng.randint(1, payload_bytes + 4096))
            elif fault == "refuse":
                proxy.set_refuse()
            elif fault == "stall":
                proxy.set_stall()
            try:
                ack = dev.agent.poll_updates_once()
                if ack is not None:
                    outcomes.append(ack.outcome)
            except TransportError as e:
                assert e.code in RETRYABLE_CODES, e
                codes[e.code] = codes.get(e.code, 0) + 1
            finally:
                proxy.set_pass()
            dev.check_consistent(expected)
            time.sleep(0.1)  # the agent's poll interval, shortened
        version_recorded = rows(
            tmp_path, f"SELECT adapter_version FROM devices WHERE device_id='{DEVICE}'")
        statuses = rows(tmp_path, "SELECT status FROM updates ORDER BY version")
    finally:
        proxy.close()
        cloud.stop(signal.SIGKILL)
    log.info("download faults %s failed calls %s acks %s cuts %d", faults, codes, outcomes,
             proxy.stats.cuts)
    assert dev.serving()[0] == n and version_recorded == [(n,)]
    assert statuses == [("applied",)] * n
    assert set(outcomes) == {"applied"}  # a broken stream is never acknowledged as rejected
    assert proxy.stats.cuts >= 3 and sum(codes.values()) >= 3  # the faults really happened
    assert dev.store.pointer() == Pointer(n, n - 1)
