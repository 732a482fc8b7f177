"""Byte framing shared by every delta codec (no pickle; every field is checked on read).

Payload layout (all integers little-endian):

    offset 0   4 bytes   magic b"CDU1"
    offset 4   1 byte    format version (FORMAT_VERSION)
    offset 5   8 bytes   u64 length of the decompressed body
    offset 13  ...       exactly one zstd frame holding the body

Body layout:

    offset 0   4 bytes   u32 length H of the header
    offset 4   H bytes   UTF-8 JSON object: {"codec": str, ...codec fields, and the tensors
                         as "tensors": [{name, shape, ...}] or, compact, "base": layout digest
                         + "t": [[position in sorted(base), ...]]}
    offset 4+H ...       the codec's raw sections, concatenated in the order the header implies;
                         the codec computes every section length from the header and the base,
                         and the sum must equal the body length exactly.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
import zstandard

from shared.errors import WireFormatError

MAGIC = b"CDU1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBQ")  # magic, version, body length
_U32 = struct.Struct("<I")


def body_limit(base: Mapping[str, torch.Tensor]) -> int:
    """Largest body a valid payload for `base` can have: bounds decompression memory."""
    numel = sum(t.numel() for t in base.values())
    # 1 MiB + 1 KiB per tensor of header, and 8 bytes per element covers every section any codec
    # here writes (indices <= 5 B as varints, value <= 2 B, scales 4 B per block).
    return (1 << 20) + 1024 * len(base) + 8 * numel


def pack(header: Mapping[str, Any], sections: list[bytes], zstd_level: int) -> bytes:
    """Frame a header and its sections into one payload."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    body = b"".join([_U32.pack(len(head)), head, *sections])
    frame = zstandard.ZstdCompressor(level=zstd_level).compress(body)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + frame


def unpack(payload: bytes, limit: int) -> tuple[dict[str, Any], memoryview]:
    """Return (header dict, raw sections) after checking magic, version and sizes."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise WireFormatError(f"payload: expected bytes, got {type(payload).__name__}")
    if len(payload) < _PREFIX.size:
        raise WireFormatError(f"payload: {len(payload)} bytes, expected at least {_PREFIX.size}")
    magic, version, body_len = _PREFIX.unpack_from(payload, 0)
    if magic != MAGIC:
        raise WireFormatError(f"payload magic: got {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise WireFormatError(f"payload format version: got {version}, expected {FORMAT_VERSION}")
    if body_len > limit:
        raise WireFormatError(
            f"payload body length: got {body_len}, expected <= {limit} for this base"
        )
    try:
        # stream_reader never trusts the frame's declared content size: output is capped at
        # body_len + 1 however the frame is forged.
        frame = io.BytesIO(bytes(payload[_PREFIX.size:]))
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        body = reader.read(body_len + 1)
        trailing = reader.read(1)
    except zstandard.ZstdError as e:
        raise WireFormatError(f"payload zstd frame: corrupt ({e})") from None
    if len(body) != body_len or trailing:
        raise WireFormatError(
            f"payload body length: decompressed {len(body)}{'+' if trailing else ''} bytes, "
            f"expected {body_len}"
        )
    if body_len < _U32.size:
        raise WireFormatError(f"payload body length: got {body_len}, expected >= {_U32.size}")
    (head_len,) = _U32.unpack_from(body, 0)
    if head_len > body_len - _U32.size:
        raise WireFormatError(
            f"header length: got {head_len}, expected <= {body_len - _U32.size}"
        )
    try:
        header = json.loads(body[_U32.size:_U32.size + head_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireFormatError(f"header: not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireFormatError(f"header: expected a JSON object, got {type(header).__name__}")
    return header, memoryview(body)[_U32.size + head_len:]


def field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """`obj[key]` checked to be of `kind` (bool is never accepted as int)."""
    if key not in obj:
        raise WireFormatError(f"{where}.{key}: missing")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise WireFormatError(
            f"{where}.{key}: got {type(value).__name__} {str(value)[:40]!r}, "
            f"expected {kind.__name__}"
        )
    return value


def int_field(obj: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    """Integer field within [lo, hi]."""
    value = field(obj, key, int, where)
    if not lo <= value <= hi:
        raise WireFormatError(f"{where}.{key}: got {value}, expected {lo}..{hi}")
    return int(value)


def tensor_entries(
    header: Mapping[str, Any], codec: str, base: Mapping[str, torch.Tensor],
) -> list[tuple[dict[str, Any], str]]:
    """Check the codec name and the tensors list (known names, no repeats, shapes match base)."""
    got = field(header, "codec", str, "header")
    if got != codec:
        raise WireFormatError(f"header.codec: got {got[:40]!r}, expected {codec!r}")
    entries = field(header, "tensors", list, "header")
    if len(entries) > len(base):
        raise WireFormatError(f"header.tensors: {len(entries)} entries, expected <= {len(base)}")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(entries):
        where = f"header.tensors[{i}]"
        if not isinstance(entry, dict):
            raise WireFormatError(f"{where}: got {type(entry).__name__}, expected object")
        name = field(entry, "name", str, where)
        if name not in base:
            raise WireFormatError(f"{where}.name: {name[:80]!r} is not a tensor of the base")
        if name in seen:
            raise WireFormatError(f"{where}.name: {name[:80]!r} appears twice")
        seen.add(name)
        shape = field(entry, "shape", list, where)
        expected = list(base[name].shape)
        if shape != expected:
            raise WireFormatError(f"{where}.shape: got {shape[:8]}, expected {expected}")
        out.append((entry, name))
    return out


def layout_digest(shapes: Mapping[str, Any]) -> str:
    """16 hex digits naming a tensor layout: sorted names and shapes (`shapes`: name -> shape).

    Codecs that address tensors by their position in `sorted(base)` put it in the header, so a
    payload encoded against another adapter layout is refused instead of misapplied.
    """
    import hashlib

    text = json.dumps([[k, list(shapes[k])] for k in sorted(shapes)], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def indexed_entries(
    header: Mapping[str, Any], codec: str, base: Mapping[str, torch.Tensor], width: int,
) -> list[tuple[list[int], str]]:
    """Check a compact tensor table: header["t"] rows [id, ...] of `width` ints, `id` the
    position in `sorted(base)`, ids strictly increasing; header["base"] the layout digest."""
    got = field(header, "codec", str, "header")
    if got != codec:
        raise WireFormatError(f"header.codec: got {got[:40]!r}, expected {codec!r}")
    digest, want = field(header, "base", str, "header"), layout_digest(
        {k: v.shape for k, v in base.items()})
    if digest != want:
        raise WireFormatError(f"header.base: got {digest[:20]!r}, expected {want!r} "
                              "(encoded against another tensor layout)")
    rows = field(header, "t", list, "header")
    names = sorted(base)
    if len(rows) > len(names):
        raise WireFormatError(f"header.t: {len(rows)} rows, expected <= {len(names)}")
    out, last = [], -1
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == width
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row)):
            raise WireFormatError(f"header.t[{i}]: expected a list of {width} integers")
        if not last < row[0] < len(names):
            raise WireFormatError(f"header.t[{i}][0]: tensor id {row[0]}, expected "
                                  f"{last + 1}..{len(names) - 1} (ascending, no repeats)")
        last = row[0]
        out.append((row, names[row[0]]))
    return out


class SectionReader:
    """Consumes the raw sections in order; every take is length-checked."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> memoryview:
        """Next `n` bytes, or WireFormatError naming the section."""
        if n > len(self._data) - self._pos:
            raise WireFormatError(
                f"section {what}: needs {n} bytes, {len(self._data) - self._pos} left"
            )
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def finish(self) -> None:
        """Raise if bytes are left over."""
        if self._pos != len(self._data):
            raise WireFormatError(
                f"sections: {len(self._data) - self._pos} trailing bytes, expected 0"
            )
