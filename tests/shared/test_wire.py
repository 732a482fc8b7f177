"""Tensor encoding, chunking and SampleBatch conversion: round trips and precise rejections."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from shared.errors import WireFormatError
from shared.types import SampleBatch, UploadSample, VisualTokens
from shared.wire import chunking, convert
from shared.wire.tensors import WireTensor, decode_array, encode_array


def _sample(i: int = 0, k: int = 5, d: int = 8) -> UploadSample:
    rng = np.random.default_rng(i)
    return UploadSample(
        sample_id=f"s{i}",
        media_kind="video",
        question="what colour appears last?",
        device_answer="red",
        confidence=0.4,
        tokens=VisualTokens(
            values=rng.standard_normal((k, d)).astype(np.float16),
            positions=np.sort(rng.choice(4 * 3 * 3, k, replace=False)).astype(np.int64),
            grid=(4, 3, 3),
            feature_space="llava_onevision/projected",
        ),
        meta={"domain": "lowlight"},
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int8", "uint8", "bool"])
def test_tensor_round_trip(dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    w = encode_array(a)
    assert w.dtype == dtype and w.shape == (2, 3, 4)
    np.testing.assert_array_equal(decode_array(w, field="t"), a)


def test_big_endian_input_is_normalised() -> None:
    a = np.arange(6, dtype=">f4")
    np.testing.assert_array_equal(decode_array(encode_array(a), field="t"), a.astype("<f4"))


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (WireTensor("complex64", (1,), b"\0" * 8), "dtype"),
        (WireTensor("float32", (2, 2), b"\0" * 12), "data"),
        (WireTensor("float32", (-1, 4), b""), "negative"),
        (WireTensor("float32", (2**40, 2**40), b""), "elements"),
        # empty, but numpy cannot even describe it: found by tests/fuzz (hypothesis)
        (WireTensor("float32", (0, 2350, 234564, 4183121840), b""), "elements"),
        (WireTensor("float32", (1,), np.array([np.nan], "<f4").tobytes()), "NaN"),
    ],
)
def test_bad_tensors_name_the_problem(tensor: WireTensor, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_array(tensor, field="x.values")


def test_chunking_reassembles_and_bounds_chunks() -> None:
    payload = bytes(range(256)) * 9000  # 2.3 MB -> 3 chunks
    chunks = list(chunking.split(payload))
    assert len(chunks) == 3 and all(len(c[2]) <= chunking.CHUNK_BYTES for c in chunks)
    r = chunking.Reassembler(max_bytes=10**7)
    for i, (index, count, data) in enumerate(chunks):
        r.add(index, count, data, len(payload) if i == 0 else 0,
              hashlib.sha256(payload).digest() if i == 0 else b"")
    assert r.finish() == payload


def test_reordered_chunk_is_rejected() -> None:
    payload = b"x" * (chunking.CHUNK_BYTES + 10)
    chunks = list(chunking.split(payload))
    r = chunking.Reassembler(max_bytes=10**7)
    with pytest.raises(WireFormatError, match="index"):
        r.add(*chunks[1])


def test_oversized_upload_is_rejected_before_reading_it() -> None:
    r = chunking.Reassembler(max_bytes=100)
    with pytest.raises(WireFormatError, match="total_bytes"):
        r.add(0, 1, b"x", total_bytes=101, sha256=b"\0" * 32)


def test_sample_batch_round_trip_through_upload_chunks() -> None:
    batch = SampleBatch(3, (_sample(0), _sample(1)))
    payload = convert.encode_sample_batch(batch)
    upload_id, got = convert.reassemble_upload(convert.upload_chunks("u-1", payload), 10**7)
    assert upload_id == "u-1" and got == payload
    back = convert.decode_sample_batch(got, convert.UploadLimits())
    assert back.adapter_version == 3
    for a, b in zip(batch.samples, back.samples, strict=True):
        assert (a.sample_id, a.question, a.meta) == (b.sample_id, b.question, b.meta)
        assert a.tokens is not None and b.tokens is not None
        np.testing.assert_array_equal(a.tokens.values, b.tokens.values)
        np.testing.assert_array_equal(a.tokens.positions, b.tokens.positions)


def _mutated(**changes: object) -> bytes:
    s = _sample()
    fields = {f: getattr(s, f) for f in s.__dataclass_fields__}
    fields.update(changes)
    return convert.encode_sample_batch(SampleBatch(0, (UploadSample(**fields),)))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\xff\xff\xff", "not a valid SampleBatch"),
        (_mutated(media_kind="audio"), "media_kind"),
        (_mutated(confidence=1.5), "confidence"),
        (_mutated(sample_id=""), "sample_id"),
        (_mutated(tokens=None), "tokens"),
        (_mutated(tokens=VisualTokens(np.zeros((2, 4), np.float32), np.array([0, 1]), (1, 1, 2),
                                      "x")), "dtype"),
        (_mutated(tokens=VisualTokens(np.zeros((2, 4), np.float16), np.array([1, 0]), (1, 1, 2),
                                      "x")), "ascending"),
        (_mutated(tokens=VisualTokens(np.zeros((2, 4), np.int8), np.array([0, 1]), (1, 1, 2),
                                      "x")), "scales"),
        (_mutated(question="q" * 5000), "question"),
    ],
)
def test_invalid_batches_are_rejected_with_the_field(payload: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        convert.decode_sample_batch(payload, convert.UploadLimits())


def test_invalid_utf8_is_rejected() -> None:
    # Field 3 (question) of Sample inside field 2 of SampleBatch, with a lone 0xff byte.
    sample = b"\x0a\x02s0" + b"\x12\x05video" + b"\x1a\x01\xff"
    payload = b"\x12" + bytes([len(sample)]) + sample
    with pytest.raises(WireFormatError):
        convert.decode_sample_batch(payload, convert.UploadLimits())
