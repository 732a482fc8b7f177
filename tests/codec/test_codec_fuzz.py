"""Hostile payloads: every malformed input must raise WireFormatError, nothing else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import CODECS, container, packing
from shared.errors import WireFormatError

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = {"a.lora_A.weight": torch.randn(8, 16), "a.lora_B.weight": torch.randn(16, 8),
        "norm.weight": torch.ones(5)}
NEW = {k: v + 0.1 * torch.randn(v.shape) for k, v in BASE.items()}
PAYLOADS = {
    "dwc8": CODECS.build("dwc", {"energy_share": 0.8}).encode(NEW, BASE).payload,
    "dwc4": CODECS.build("dwc", {"energy_share": 0.99, "bits": 4, "block_size": 7})
    .encode(NEW, BASE).payload,
    "dwc-all": CODECS.build("dwc", {"energy_share": 1.0}).encode(NEW, BASE).payload,
    "dense-fp16": CODECS.build("dense-fp16").encode(NEW, BASE).payload,
}


def _codec_for(key: str):
    return CODECS.build("dense-fp16" if key == "dense-fp16" else "dwc")


def _decode_or_wire_error(key: str, payload: bytes) -> None:
    try:
        out = _codec_for(key).decode(payload, BASE)
    except WireFormatError:
        return
    # a mutation that still decodes must give finite tensors of the base's shapes and dtypes
    for name, t in out.items():
        assert t.shape == BASE[name].shape and t.dtype == BASE[name].dtype
        assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("key", sorted(PAYLOADS))
def test_valid_payloads_decode(key) -> None:
    out = _codec_for(key).decode(PAYLOADS[key], BASE)
    assert set(out) == set(BASE)


@_SETTINGS
@given(data=st.binary(max_size=600))
def test_random_bytes(data) -> None:
    for key in ("dwc8", "dense-fp16"):
        with pytest.raises(WireFormatError):
            _codec_for(key).decode(data, BASE)


@_SETTINGS
@given(key=st.sampled_from(sorted(PAYLOADS)), cut=st.integers(0, 10_000))
def test_truncated(key, cut) -> None:
    payload = PAYLOADS[key]
    cut = cut % len(payload)
    with pytest.raises(WireFormatError):
        _codec_for(key).decode(payload[:cut], BASE)


@_SETTINGS
@given(key=st.sampled_from(sorted(PAYLOADS)), flips=st.lists(st.integers(0, 10**6), min_size=1,
                                                             max_size=4))
def test_bit_flips(key, flips) -> None:
    raw = bytearray(PAYLOADS[key])
    for f in flips:
        raw[(f // 8) % len(raw)] ^= 1 << (f % 8)
    _decode_or_wire_error(key, bytes(raw))


def _dwc_payload(header: dict, sections: list[bytes]) -> bytes:
    return container.pack(header, sections, zstd_level=3)


DIGEST = container.layout_digest({k: v.shape for k, v in BASE.items()})
_NORM = sorted(BASE).index("norm.weight")


def _head(rows: object = None, **over) -> dict:
    """A DWC header with rows [tensor id, count, index mode (0 all, 1 bitmap, 2 varint),
    index bytes]; default: 2 varint-indexed entries of norm.weight."""
    header = {"codec": "dwc", "bits": 8, "block": 64, "base": DIGEST,
              "t": [[_NORM, 2, 2, 2]] if rows is None else rows}
    header.update(over)
    return header


GOOD_SECTIONS = [bytes([1, 0]), struct.pack("<f", 0.1), bytes([5, 251])]  # indices 1, 2


@pytest.mark.parametrize(("header", "sections", "match"), [
    (_head(), GOOD_SECTIONS, None),
    (_head([], codec="dense-fp16"), [], "header.codec"),
    (_head([], bits=3), [], "header.bits"),
    (_head([], bits=True), [], "header.bits"),
    (_head([], block=0), [], "header.block"),
    (_head({}), [], "header.t"),
    (_head([], base="0" * 16), [], "header.base"),
    (_head([[3, 2, 2, 2]]), GOOD_SECTIONS, "tensor id"),
    (_head([[_NORM, 2, 2, 2]] * 2), GOOD_SECTIONS * 2, "tensor id"),
    (_head([[_NORM, 2, 2]]), GOOD_SECTIONS, "4 integers"),
    (_head([[_NORM, 2, 2, True]]), GOOD_SECTIONS, "4 integers"),
    (_head([[_NORM, 6, 2, 2]]), GOOD_SECTIONS, "count"),
    (_head([[_NORM, 2, 5, 2]]), GOOD_SECTIONS, "index mode"),
    (_head([[_NORM, 2, 1, 2]]), GOOD_SECTIONS, "index bytes"),
    (_head(), [bytes([4, 0]), *GOOD_SECTIONS[1:]], "out of range"),
    (_head(), [bytes([0x81, 0]), *GOOD_SECTIONS[1:]], "index varints"),
    (_head(), [GOOD_SECTIONS[0], struct.pack("<f", -1.0), GOOD_SECTIONS[2]], "scales"),
    (_head(), [GOOD_SECTIONS[0], struct.pack("<f", float("nan")), GOOD_SECTIONS[2]], "scales"),
    (_head(), [GOOD_SECTIONS[0], struct.pack("<f", 3e38), GOOD_SECTIONS[2]], "not finite"),
    (_head(), [*GOOD_SECTIONS[:2], bytes([5, 128])], "-128"),
    (_head(), [*GOOD_SECTIONS, b"x"], "trailing"),
    (_head(), GOOD_SECTIONS[:2], "values"),
    (_head(bits=4), [*GOOD_SECTIONS[:2], bytes([0x08])], "int4 value -8"),
    (_head([[_NORM, 1, 2, 1]], bits=4), [bytes([1]), GOOD_SECTIONS[1], bytes([0x99])],
     "padding"),
])
def test_crafted_headers(header, sections, match) -> None:
    payload = _dwc_payload(header, sections)
    codec = CODECS.build("dwc")
    if match is None:
        out = codec.decode(payload, BASE)
        assert torch.allclose(out["norm.weight"], torch.tensor([1.0, 1.5, 0.5, 1.0, 1.0]))
        return
    with pytest.raises(WireFormatError, match=match):
        codec.decode(payload, BASE)


def test_decompression_bomb_is_capped() -> None:
    """A frame that inflates past the declared size, or a declared size past the base's limit."""
    body = b"\0" * (64 << 20)
    frame = zstandard.ZstdCompressor(level=3).compress(body)
    lying = container._PREFIX.pack(container.MAGIC, container.FORMAT_VERSION, 100) + frame
    with pytest.raises(WireFormatError, match="body length"):
        CODECS.build("dwc").decode(lying, BASE)
    huge = container._PREFIX.pack(container.MAGIC, container.FORMAT_VERSION, len(body)) + frame
    with pytest.raises(WireFormatError, match="expected <="):
        CODECS.build("dwc").decode(huge, BASE)


def test_deeply_nested_json_header() -> None:
    head = b"[" * 100_000
    body = struct.pack("<I", len(head)) + head
    frame = zstandard.ZstdCompressor().compress(body)
    payload = container._PREFIX.pack(container.MAGIC, container.FORMAT_VERSION, len(body)) + frame
    with pytest.raises(WireFormatError, match="header"):
        CODECS.build("dwc").decode(payload, {"w": torch.zeros(200_000)})


def test_varint_and_bitmap_packers_round_trip() -> None:
    rng = np.random.default_rng(0)
    for numel in (1, 7, 8, 1000, 300_000):
        for k in (0, 1, numel // 3, numel):
            idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
            raw = packing.varint_gaps_encode(idx)
            assert len(raw) == packing.varint_gaps_size(idx)
            assert np.array_equal(packing.varint_gaps_decode(raw, k, numel, "t"), idx)
            bm = packing.bitmap_encode(idx, numel)
            assert np.array_equal(packing.bitmap_decode(bm, k, numel, "t"), idx)
