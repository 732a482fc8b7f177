"""Wires the agent's parts from DeviceSettings (called once, from `device-agent run`)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from device.agent import Agent, AgentOptions, calibration_confidences, probe_accuracy
from device.compress import COMPRESSORS
from device.inputs import FolderInput, InputItem, ProceduralInput, generator_for
from device.metrics import DeviceMetrics
from device.outbox import Outbox, OutboxConfig
from device.runtime.adapter_store import AdapterStore
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, load_student
from device.sampling import SAMPLERS
from device.sampling.uncertainty import UncertaintySampler
from device.settings import DeviceSettings
from device.sync.client import GrpcTransport, open_channel
from device.sync.credentials import Credentials
from device.sync.updater import AdapterUpdater, UpdaterConfig
from device.sync.uploader import BackoffConfig, Uploader
from shared.errors import ConfigError

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


def _calibrate(settings: DeviceSettings, inference: DeviceInference,
               sampler: UncertaintySampler, batch_size: int,
               adapter_version: int) -> UncertaintySampler:
    """Threshold from the configured quantile of source-domain confidences of the adapter
    version now serving (cached on disk per version)."""
    cfg = sampler.config
    if cfg.mode != "threshold" or cfg.threshold is not None:
        return sampler  # an explicit threshold always wins
    key = {"signal": cfg.signal, "quantile": cfg.calibration_quantile,
           "adapter_version": adapter_version, "n": settings.uplink.calibration_samples}
    path = settings.data_dir / CALIBRATION_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in key} == key:
            return sampler.calibrated_to(float(saved["threshold"]))
    up = settings.uplink
    src = ProceduralInput(["source"], up.calibration_seed, settings.input.media_kind,
                          generator=_generator(inference))
    items = [src.item(i) for i in range(up.calibration_samples)]
    conf = calibration_confidences(inference, sampler, items, batch_size)
    out = sampler.calibrated(conf)
    path.write_text(json.dumps({"threshold": out.config.threshold, **key}))
    log.info("calibrated upload threshold", extra={"threshold": out.config.threshold,
                                                   "samples": len(conf),
                                                   "adapter_version": adapter_version})
    return out


def _generator(inference: DeviceInference):  # noqa: ANN202 - shared.media GeneratorConfig
    pc = inference.student.processor.config
    return generator_for(pc.image_size, pc.num_frames)


@contextmanager
def build_agent(settings: DeviceSettings, stop: threading.Event) -> Iterator[Agent]:
    """Everything `run` needs; closes the channel and the outbox on exit."""
    if settings.model is None:
        raise ConfigError("field `model`: missing; `run` needs [model] checkpoint_dir")
    m = settings.model
    creds = Credentials.load(settings.data_dir)
    student = load_student(StudentConfig(
        m.checkpoint_dir, m.quantization, m.adapter_dir, m.lora_r, m.lora_alpha, m.lora_targets))
    encoder = None
    if m.onnx_vision is not None:
        from device.runtime.onnx_vision import OnnxVisionEncoder

        encoder = OnnxVisionEncoder(m.onnx_vision, student.model)
    inference = DeviceInference(
        student, COMPRESSORS.build(settings.compressor, settings.compressor_config()),
        m.max_new_tokens, encoder, m.feature_space, m.original_positions)
    sampler = SAMPLERS.build(settings.sampler, settings.sampler_options)
    if not isinstance(sampler, UncertaintySampler):
        raise ConfigError(f"field `sampler`: {settings.sampler!r} is not a UTS sampler")
    hf: Any = student.model.get_base_model()
    sampler.dim = int(hf.config.get_text_config().hidden_size)
    up = settings.uplink
    transport = GrpcTransport(open_channel(settings), settings.rpc_timeout_s, creds)
    metrics: DeviceMetrics | None = None
    outbox = Outbox(settings.data_dir / "outbox.sqlite3",
                    OutboxConfig(up.outbox_max_bytes, up.full_policy, up.batch_samples))
    try:
        upd = settings.updates
        gen = _generator(inference)
        probe_src = ProceduralInput([upd.probe_domain], upd.probe_seed, settings.input.media_kind,
                                    generator=gen)
        probe_items: list[InputItem] = [probe_src.item(i) for i in range(upd.probe_samples)]
        if upd.probe_folder is not None:
            probe_items = [it for _, it in FolderInput(upd.probe_folder).iterate(0)]
            if any(it.answer is None for it in probe_items):
                raise ConfigError(f"field `updates.probe_folder`: every line of "
                                  f"{upd.probe_folder}/questions.jsonl needs an \"answer\"")
        updater = AdapterUpdater(
            student.model, AdapterStore(settings.data_dir / "adapters"),
            UpdaterConfig(upd.rollback_margin, upd.max_update_bytes), settings.device_id,
            creds.cloud_public_key, creds.base_model_hash,
            probe=lambda: probe_accuracy(inference, probe_items, m.batch_size))
        raw_sampler = sampler
        sampler = _calibrate(settings, inference, raw_sampler, m.batch_size, updater.version)

        def recalibrate() -> UncertaintySampler:
            return _calibrate(settings, inference, raw_sampler, m.batch_size, updater.version)

        inp = settings.input
        source = (FolderInput(inp.folder, inp.limit) if inp.kind == "folder" and inp.folder
                  else ProceduralInput(inp.domains, inp.seed, inp.media_kind, inp.limit, gen))
        if inp.kind == "folder" and inp.folder is None:
            raise ConfigError("field `input.folder`: missing; required when input.kind = folder")
        uploader = Uploader(outbox, transport, BackoffConfig(up.retry_base_s, up.retry_max_s),
                            stop)
        round_size = (sampler.config.round_size if sampler.config.mode == "budget"
                      else m.batch_size)
        options = AgentOptions(m.batch_size, up.payload, round_size, upd.poll_interval_s,
                               up.drain_timeout_s, progress=settings.progress)
        if settings.metrics_address is not None:
            metrics = DeviceMetrics(settings.metrics_address)
        yield Agent(inference, sampler, outbox, source,
                    settings.answers_path or settings.data_dir / "answers.jsonl",
                    settings.data_dir / "status.json", options, transport, uploader,
                    updater if upd.enabled else None,
                    on_status=metrics.update if metrics is not None else None,
                    recalibrate=recalibrate if up.recalibrate else None)
    finally:
        transport.close()
        outbox.close()
        if metrics is not None:
            metrics.close()
