"""Hostile input on the wire conversion and chunk reassembly: only WireFormatError, ever.

Case counts add up towards the suite's >= 10,000 fuzz cases (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import WireFormatError
from shared.pb.v1 import sync_pb2 as pb
from shared.types import SampleBatch, UploadSample, VisualTokens
from shared.wire import chunking, convert
from shared.wire.tensors import DTYPES, WireTensor, decode_array

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
LIMITS = convert.UploadLimits(max_payload_bytes=1 << 20, max_tokens=512, max_dim=256)


def _valid_payload() -> bytes:
    tokens = VisualTokens(np.ones((3, 4), np.float16), np.array([0, 2, 5]), (1, 2, 3), "x")
    s = UploadSample("s0", "video", "which way?", "left", 0.3, tokens=tokens)
    return convert.encode_sample_batch(SampleBatch(1, (s,)))


VALID = _valid_payload()


@settings(FAST, max_examples=3000)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_batch_decoder(data: bytes) -> None:
    try:
        convert.decode_sample_batch(data, LIMITS)
    except WireFormatError:
        pass


@settings(FAST, max_examples=2000)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(0, len(VALID)))
def test_mutated_valid_payloads_decode_or_fail_cleanly(pos: int, byte: int, cut: int) -> None:
    data = bytearray(VALID)
    data[pos] = byte
    try:
        convert.decode_sample_batch(bytes(data[:cut]), LIMITS)
    except WireFormatError:
        pass


@settings(FAST, max_examples=2000)
@given(
    st.sampled_from([*DTYPES, "float64", "", "int4"]),
    st.lists(st.integers(-(2**62), 2**62), max_size=10),
    st.binary(max_size=256),
)
def test_tensor_headers_with_overflowing_shapes_are_rejected(
    dtype: str, shape: list[int], data: bytes
) -> None:
    tracemalloc.start()
    try:
        array = decode_array(WireTensor(dtype, tuple(shape), data), field="t")
        assert array.nbytes == len(data)
    except WireFormatError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1 << 20  # bounded memory: never allocate from a claimed shape


@settings(FAST, max_examples=2000)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=4), st.integers(0, 5), st.integers(0, 5), st.binary(max_size=64),
            st.integers(0, 1 << 40), st.binary(max_size=40),
        ),
        max_size=6,
    )
)
def test_random_chunk_streams_never_crash_reassembly(chunks: list[tuple]) -> None:
    stream = [
        pb.UploadChunk(upload_id=u, index=i, count=c, data=d, total_bytes=t, sha256=h)
        for u, i, c, d, t, h in chunks
    ]
    try:
        convert.reassemble_upload(stream, max_bytes=1 << 16)
    except WireFormatError:
        pass


@settings(FAST, max_examples=1000)
@given(st.binary(min_size=1, max_size=3 * 1024), st.data())
def test_shuffled_or_truncated_chunks_are_rejected(payload: bytes, data: st.DataObject) -> None:
    size = 1024
    parts = list(chunking.split(payload, size))
    order = data.draw(st.permutations(range(len(parts))))
    keep = data.draw(st.integers(1, len(parts)))
    r = chunking.Reassembler(1 << 20, chunk_bytes=size)
    digest = hashlib.sha256(payload).digest()
    try:
        for i in order[:keep]:
            index, count, chunk = parts[i]
            r.add(index, count, chunk, len(payload), digest)
        assert r.finish() == payload
        assert list(order[:keep]) == list(range(len(parts)))  # only the intact stream succeeds
    except WireFormatError:
        assert list(order[:keep]) != list(range(len(parts)))
