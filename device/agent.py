"""The device agent's loop: read -> answer (compressed student) -> UTS select -> outbox -> upload,
with downlink updates polled in the background and applied between batches.

Three threads share one process: the main loop (inference; holds `model_lock` per batch), the
uploader (drains the durable outbox), and the update poller (fetches outside the lock, applies
inside it). Progress is committed to the outbox's cursor together with the batch's uploads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from device.inputs import InputItem
from device.outbox import Outbox
from device.runtime.inference import DeviceInference, Inference
from device.sampling.base import Selection
from device.sampling.payload import pack_tokens
from device.sampling.uncertainty import UncertaintySampler
from device.sync.transport import MalformedUpdateError, Transport
from device.sync.updater import AdapterUpdater
from device.sync.uploader import Uploader
from shared.errors import StoreFullError, TransportError
from shared.media.frames import sample_indices
from shared.types import SampleBatch, UpdateAck, UploadSample
from shared.wire import convert

log = logging.getLogger(__name__)


class Source(Protocol):
    """An input stream with a stable name, resumable by position."""

    name: str

    def iterate(self, start: int) -> Any:
        """(position, InputItem) pairs from `start`."""
        ...


@dataclass
class Counters:
    """What `device-agent run` reports (also written to `<data_dir>/status.json`)."""

    samples_seen: int = 0
    answered_this_run: int = 0
    selected: int = 0
    selected_bytes: int = 0
    """Wire bytes of the selected samples (each serialized alone)."""
    rejected_full: int = 0
    adapter_version: int = 0
    updates: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """Loop knobs taken from DeviceSettings."""

    batch_size: int = 4
    payload: str = "tokens"
    round_size: int = 1
    """Records gathered before the sampler decides (the sampler's round in budget mode)."""
    poll_interval_s: float = 5.0
    drain_timeout_s: float = 60.0
    upload_idle_s: float = 0.2
    progress: bool = False


class Agent:
    """Runs one input stream to its end (or until `stop`), then drains the outbox."""

    def __init__(self, inference: DeviceInference, sampler: UncertaintySampler, outbox: Outbox,
                 source: Source, answers_path: Path, status_path: Path, options: AgentOptions,
                 transport: Transport | None = None, uploader: Uploader | None = None,
                 updater: AdapterUpdater | None = None,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 recalibrate: Callable[[], UncertaintySampler] | None = None) -> None:
        self.inference = inference
        self.sampler = sampler
        self.outbox = outbox
        self.source = source
        self.answers_path = answers_path
        self.status_path = status_path
        self.options = options
        self.transport = transport
        self.uploader = uploader
        self.updater = updater
        self.on_status = on_status
        self.recalibrate = recalibrate
        """Returns the sampler calibrated for the adapter now serving (after an update)."""
        """Called with every status snapshot (Prometheus gauges)."""
        self.model_lock = threading.Lock()
        self.counters = Counters(samples_seen=outbox.cursor(source.name))
        # acks a crash may have lost are owed first (the cloud's record must converge)
        self._pending_acks: list[UpdateAck] = updater.owed_acks() if updater is not None else []

    # ------------------------------------------------------------------ main loop

    def run(self, stop: threading.Event) -> Counters:
        """Process the stream, uploading and updating in the background."""
        threads = []
        if self.uploader is not None:
            threads.append(threading.Thread(target=self.uploader.run,
                                            args=(self.options.upload_idle_s,),
                                            name="uploader", daemon=True))
        if self.updater is not None and self.transport is not None:
            threads.append(threading.Thread(target=self._poll_updates, args=(stop,),
                                            name="updates", daemon=True))
        for t in threads:
            t.start()
        start = self.outbox.cursor(self.source.name)
        if start:
            log.info("resuming input stream", extra={"stream": self.source.name, "at": start})
        bar = tqdm(desc="samples", initial=start, disable=not self.options.progress,
                   unit="sample", dynamic_ncols=True)
        pending: list[tuple[int, InputItem, Inference]] = []
        batch: list[tuple[int, InputItem]] = []
        with self.answers_path.open("a", encoding="utf-8") as answers:
            for pos, item in self.source.iterate(start):
                if stop.is_set():
                    break
                batch.append((pos, item))
                if len(batch) < self.options.batch_size:
                    continue
                pending += self._infer(batch, answers)
                bar.update(len(batch))
                batch = []
                if len(pending) >= self.options.round_size:
                    self._decide(pending)
                    pending = []
                    self._write_status(bar)
            if batch and not stop.is_set():
                pending += self._infer(batch, answers)
                bar.update(len(batch))
            if pending and not stop.is_set():
                self._decide(pending)
        bar.close()
        self._finish(stop)
        for t in threads:
            t.join(timeout=30)
        self._write_status(None)
        return self.counters

    def _finish(self, stop: threading.Event) -> None:
        """Give the uploader `drain_timeout_s` to empty the outbox, then stop the threads."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.uploader is not None and not stop.is_set() and time.monotonic() < deadline:
            if self.outbox.depth() == (0, 0):
                break
            stop.wait(0.05)
        stop.set()

    def _infer(self, batch: Sequence[tuple[int, InputItem]], answers: Any
               ) -> list[tuple[int, InputItem, Inference]]:
        out: list[tuple[int, InputItem, Inference]] = []
        kinds: dict[str, list[tuple[int, InputItem]]] = {}
        for pos, item in batch:  # a model batch is all images or all videos
            kinds.setdefault(item.media_kind, []).append((pos, item))
        for group in kinds.values():
            with self.model_lock:
                version = self.updater.version if self.updater is not None else 0
                res = self.inference.run([i.frames for _, i in group],
                                         [i.question for _, i in group],
                                         [i.sample_id for _, i in group])
            for (pos, item), r in zip(group, res, strict=True):
                conf = self.sampler.confidence(r.record)
                answers.write(json.dumps({
                    "sample_id": item.sample_id, "question": item.question, "answer": r.answer,
                    "confidence": round(conf, 6), "adapter_version": version,
                    **({"truth": item.answer} if item.answer is not None else {}),
                    **item.meta}) + "\n")
                out.append((pos, item, r))
        answers.flush()
        self.counters.answered_this_run += len(batch)
        out.sort(key=lambda x: x[0])
        return out

    def _decide(self, pending: Sequence[tuple[int, InputItem, Inference]]) -> None:
        chosen = self.sampler.select([r.record for _, _, r in pending])
        by_id = {item.sample_id: (item, r) for _, item, r in pending}
        version = self.updater.version if self.updater is not None else 0
        samples = tuple(self._upload_sample(sel, *by_id[sel.sample_id]) for sel in chosen)
        cursor = (self.source.name, pending[-1][0] + 1)
        if samples:
            batch = SampleBatch(version, samples)
            try:
                self.outbox.enqueue(batch, cursor=cursor)
            except StoreFullError:
                self.counters.rejected_full += len(samples)
            self.counters.selected += len(samples)
            self.counters.selected_bytes += sum(self.sample_bytes(s, version) for s in samples)
        else:
            self.outbox.advance(*cursor)
        self.counters.samples_seen = cursor[1]

    @staticmethod
    def sample_bytes(sample: UploadSample, version: int) -> int:
        """Wire bytes of one sample serialized alone."""
        return len(convert.encode_sample_batch(SampleBatch(version, (sample,))))

    def _upload_sample(self, sel: Selection, item: InputItem, r: Inference) -> UploadSample:
        return build_upload_sample(sel, item, r, self.options.payload,
                                   self.inference.feature_space,
                                   self.sampler.config.value_dtype,
                                   self.inference.student.processor.config.num_frames)

    # ------------------------------------------------------------------ downlink

    def _poll_updates(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_updates_once()
            except TransportError as e:
                log.warning("update poll failed", extra={"code": e.code})
            stop.wait(self.options.poll_interval_s)

    def poll_updates_once(self) -> UpdateAck | None:
        """Resend unsent acks, fetch (outside the model lock), apply (inside), acknowledge.

        A stream that fails reassembly (size, sha256) is rejected like a bad signature: the
        serving adapter is untouched and the announced version is acknowledged as rejected.
        """
        updater, transport = self.updater, self.transport
        if updater is None or transport is None:
            return None
        while self._pending_acks:
            updater.delivered(self._pending_acks[0], transport.ack(self._pending_acks[0]))
            self._pending_acks.pop(0)
        try:
            got = transport.fetch_update(updater.version, updater.config.max_update_bytes)
        except MalformedUpdateError as e:
            log.warning("update stream malformed", extra={"reason": str(e)})
            if e.header is None:
                return None
            ack = UpdateAck(e.header.version, "rejected", detail=f"payload: {e}"[:1024])
        else:
            if got is None:
                return None
            with self.model_lock:
                ack = updater.apply(*got)
                if ack.outcome == "applied" and self.recalibrate is not None:
                    self.sampler = self.recalibrate()
        self.counters.adapter_version = updater.version
        self.counters.updates[ack.outcome] = self.counters.updates.get(ack.outcome, 0) + 1
        self._pending_acks.append(ack)
        updater.delivered(ack, transport.ack(ack))
        self._pending_acks.pop(0)
        return ack

    # ------------------------------------------------------------------ reporting

    def _write_status(self, bar: tqdm | None) -> None:
        if self.updater is not None:
            self.counters.adapter_version = self.updater.version
        ob = self.outbox.counters()
        pending, in_flight = self.outbox.depth()
        status = {
            "samples_seen": self.counters.samples_seen,
            "answered_this_run": self.counters.answered_this_run,
            "selected": self.counters.selected,
            "selected_bytes": self.counters.selected_bytes,
            "uploaded_samples": ob["uploaded_samples"],
            "uploaded_bytes": ob["uploaded_bytes"],
            "outbox_pending": pending, "outbox_in_flight": in_flight,
            "dropped_oldest": ob["dropped_oldest"], "rejected_new": ob["rejected_new"],
            "dead_lettered": ob["dead_lettered"],
            "adapter_version": self.counters.adapter_version,
            "updates": self.counters.updates,
        }
        if bar is not None:
            bar.set_postfix(uploaded=ob["uploaded_samples"], kb=ob["uploaded_bytes"] // 1024,
                            v=self.counters.adapter_version, refresh=False)
        if self.on_status is not None:
            self.on_status(status)
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, self.status_path)


def calibration_confidences(inference: DeviceInference, sampler: UncertaintySampler,
                            items: Sequence[InputItem], batch_size: int) -> list[float]:
    """Confidences of the device on source-domain items (for the threshold quantile)."""
    out: list[float] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        res = inference.run([c.frames for c in chunk], [c.question for c in chunk],
                            [c.sample_id for c in chunk])
        out += [sampler.confidence(r.record) for r in res]
    return out


def probe_accuracy(inference: DeviceInference, items: Sequence[InputItem],
                   batch_size: int) -> float:
    """Exact-match accuracy of the serving model on labelled items."""
    right = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        res = inference.run([c.frames for c in chunk], [c.question for c in chunk],
                            [c.sample_id for c in chunk])
        right += sum(r.answer == c.answer for r, c in zip(res, chunk, strict=True))
    return right / max(1, len(items))



def build_upload_sample(sel: Selection, item: InputItem, r: Inference, payload: str,
                        feature_space: str, value_dtype: str, num_frames: int) -> UploadSample:
    """The wire record of one selected sample: its selected tokens, or its sampled raw frames."""
    meta = {k: v for k, v in item.meta.items() if k == "domain"}
    if payload == "frames":
        frames = item.frames if item.media_kind == "image" else \
            item.frames[sample_indices(item.frames.shape[0], num_frames)]
        return UploadSample(sel.sample_id, item.media_kind, item.question, r.answer,
                            sel.confidence, frames=frames.numpy(), meta=meta)
    idx = sel.tokens  # (K',) into r.record.keep
    tokens = pack_tokens(r.features[idx], r.record.keep[idx], r.grid, feature_space, value_dtype)
    return UploadSample(sel.sample_id, item.media_kind, item.question, r.answer,
                        sel.confidence, tokens=tokens, meta=meta)
