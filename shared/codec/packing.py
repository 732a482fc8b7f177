"""Vectorised bit packing for sparse deltas: LEB128 gap varints, bitmaps and int4 nibbles."""

from __future__ import annotations

import numpy as np

from shared.errors import WireFormatError

_MAX_VARINT_BYTES = 5  # gaps < 2**35 >= MAX_TENSOR_NUMEL


def _gaps(indices: np.ndarray) -> np.ndarray:
    """(K,) sorted unique indices -> (K,) first index, then distance to the previous minus one."""
    return np.diff(indices.astype(np.int64), prepend=-1) - 1


def varint_gaps_encode(indices: np.ndarray) -> bytes:
    """Sorted unique flat indices (K,) -> LEB128 of gaps (first index, then diff - 1)."""
    if indices.size == 0:
        return b""
    gaps = _gaps(indices)  # (K,)
    nbytes = np.ones(gaps.shape, dtype=np.int64)  # (K,) bytes per varint
    for j in range(1, _MAX_VARINT_BYTES):
        nbytes += gaps >= (1 << (7 * j))
    starts = np.cumsum(nbytes) - nbytes  # (K,) offset of each varint
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        live = nbytes > j
        byte = (gaps[live] >> (7 * j)) & 0x7F
        byte |= np.where(nbytes[live] > j + 1, 0x80, 0)
        out[starts[live] + j] = byte
    return out.tobytes()


def varint_gaps_size(indices: np.ndarray) -> int:
    """Byte length `varint_gaps_encode` would produce."""
    if indices.size == 0:
        return 0
    gaps = _gaps(indices)  # (K,)
    return int(sum(int((gaps >= (1 << (7 * j))).sum()) for j in range(1, _MAX_VARINT_BYTES))
               + gaps.size)


def varint_gaps_decode(data: bytes | memoryview, count: int, numel: int, where: str) -> np.ndarray:
    """Inverse of `varint_gaps_encode`, checking count, varint length and index range."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if raw.size:
            raise WireFormatError(f"{where}: {raw.size} index bytes for 0 entries, expected 0")
        return np.zeros(0, dtype=np.int64)
    end = (raw & 0x80) == 0  # (B,) last byte of a varint
    if raw.size == 0 or not end[-1]:
        raise WireFormatError(f"{where}: index varints truncated (last byte has continuation bit)")
    ends = np.flatnonzero(end)  # (K,)
    if ends.size != count:
        raise WireFormatError(f"{where}: {ends.size} index varints, expected {count}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise WireFormatError(
            f"{where}: index varint of {int(lengths.max())} bytes, expected <= {_MAX_VARINT_BYTES}"
        )
    owner = np.repeat(np.arange(count), lengths)  # (B,) which varint each byte belongs to
    shift = 7 * (np.arange(raw.size) - starts[owner])  # (B,)
    gaps = np.zeros(count, dtype=np.int64)
    np.add.at(gaps, owner, (raw & 0x7F).astype(np.int64) << shift)
    if int(gaps.max()) >= numel:
        raise WireFormatError(f"{where}: index gap {int(gaps.max())}, expected < numel {numel}")
    idx = np.cumsum(gaps + 1) - 1  # (K,) strictly increasing by construction
    if int(idx[-1]) >= numel:
        raise WireFormatError(f"{where}: index {int(idx[-1])} out of range, expected < {numel}")
    return idx


def bitmap_encode(indices: np.ndarray, numel: int) -> bytes:
    """Flat indices -> little-endian bitmap of ceil(numel / 8) bytes."""
    bits = np.zeros(numel, dtype=np.uint8)
    bits[indices] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def bitmap_decode(data: bytes | memoryview, count: int, numel: int, where: str) -> np.ndarray:
    """Inverse of `bitmap_encode`, checking the popcount and zero padding bits."""
    raw = np.frombuffer(data, dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")  # (8 * ceil(numel / 8),)
    if bits[numel:].any():
        raise WireFormatError(f"{where}: bitmap padding bits set, expected zero past numel {numel}")
    idx = np.flatnonzero(bits[:numel])
    if idx.size != count:
        raise WireFormatError(f"{where}: bitmap has {idx.size} entries, expected {count}")
    return idx.astype(np.int64)


def int4_pack(q: np.ndarray) -> bytes:
    """Values in [-7, 7] (K,) -> nibbles q + 8 (never 0), two per byte, low nibble first."""
    nib = (q.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate((nib, np.zeros(1, dtype=np.uint8)))
    return (nib[0::2] | (nib[1::2] << 4)).tobytes()


def int4_unpack(data: bytes | memoryview, count: int, where: str) -> np.ndarray:
    """Inverse of `int4_pack`: (count,) int8 in [-7, 7]."""
    raw = np.frombuffer(data, dtype=np.uint8)
    nib = np.empty(raw.size * 2, dtype=np.uint8)
    nib[0::2] = raw & 0x0F
    nib[1::2] = raw >> 4
    if nib[count:].any():
        raise WireFormatError(f"{where}: int4 padding nibble set, expected 0")
    nib = nib[:count]
    if (nib == 0).any():
        raise WireFormatError(f"{where}: int4 value -8, expected -7..7")
    return nib.astype(np.int8) - 8
