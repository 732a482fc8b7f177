"""Tensors as (dtype name, shape, raw little-endian bytes): the only way arrays cross the wire.

numpy arrays on this side; callers convert to/from torch with `torch.from_numpy` / `.numpy()`.
Decoding checks dtype, shape and size before touching the bytes and never unpickles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import WireFormatError

# torch spelling -> numpy little-endian dtype. bfloat16 travels as float32 (numpy lacks it).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}

MAX_RANK = 8
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as it travels: dtype name, shape and raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode_array(array: np.ndarray) -> WireTensor:
    """Encode a numpy array (any byte order, any strides) as a WireTensor."""
    name = _NAMES.get(array.dtype.newbyteorder("<")) or _NAMES.get(array.dtype)
    if name is None:
        raise WireFormatError(f"dtype {array.dtype} cannot travel; supported: {sorted(DTYPES)}")
    le = np.ascontiguousarray(array, dtype=DTYPES[name])
    return WireTensor(name, tuple(int(d) for d in le.shape), le.tobytes())


def decode_array(
    tensor: WireTensor,
    *,
    field: str,
    dtypes: tuple[str, ...] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    rank: int | None = None,
    finite: bool = True,
) -> np.ndarray:
    """Validate and decode a WireTensor into a (read-only) numpy array.

    Args:
        tensor: the received tensor.
        field: name used in error messages (e.g. "samples[3].tokens.values").
        dtypes: allowed dtype names; None allows all of DTYPES.
        max_elements: upper bound on the element count (checked before any allocation).
        rank: required number of dimensions, if any.
        finite: reject NaN/inf in floating tensors.

    Raises:
        WireFormatError: naming `field`, the offending value and what was expected.
    """
    allowed = dtypes or tuple(DTYPES)
    if tensor.dtype not in allowed:
        raise WireFormatError(f"{field}.dtype: got {tensor.dtype!r}, expected one of {allowed}")
    shape = tensor.shape
    if len(shape) > MAX_RANK or (rank is not None and len(shape) != rank):
        want = rank if rank is not None else f"<= {MAX_RANK}"
        raise WireFormatError(f"{field}.shape: got rank {len(shape)} {shape}, expected {want}")
    count = 1
    span = 1  # product of the non-zero dimensions: a zero cannot hide a huge one
    for d in shape:
        if d < 0:
            raise WireFormatError(f"{field}.shape: negative dimension in {shape}")
        count *= d
        span *= max(d, 1)
        if span > max_elements:  # checked while multiplying: no overflow, no huge allocation
            raise WireFormatError(
                f"{field}.shape: {shape} spans more than {max_elements} elements (the limit)"
            )
    dtype = DTYPES[tensor.dtype]
    if len(tensor.data) != count * dtype.itemsize:
        raise WireFormatError(
            f"{field}.data: got {len(tensor.data)} bytes, expected {count * dtype.itemsize} "
            f"for {tensor.dtype}{list(shape)}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if finite and dtype.kind == "f" and not np.isfinite(array).all():
        raise WireFormatError(f"{field}: contains NaN or infinite values")
    return array
