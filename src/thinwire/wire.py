"""Payload: the only thing that crosses the wire, as safetensors bytes with a format version.

Decoding validates the header by hand before safetensors touches the buffer, so malformed or
hostile bytes fail with a `PayloadError` naming the problem; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = "1"
DEFAULT_MAX_BYTES = 1 << 34
MAX_HEADER_BYTES = 1 << 24
Scalar = int | float | str

_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAMES = {dtype: name for name, (dtype, _) in _DTYPES.items()}
_META_KEY = "thinwire"  # one key: safetensors writes metadata keys in hash order


class PayloadError(ValueError):
    """Bytes that are not a valid thinwire payload."""


@dataclass
class Payload:
    """Named tensors plus named scalars; encodes to bytes deterministically."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    def encode(self) -> bytes:
        _check_scalars(self.scalars)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        meta = json.dumps({"format": FORMAT_VERSION, "scalars": self.scalars}, sort_keys=True)
        return st_save(tensors, metadata={_META_KEY: meta})

    def write(self, handle: BinaryIO) -> tuple[int, str]:
        """Stream the payload into an open binary file, one tensor at a time, so a model-sized
        payload (a checkpoint) never exists twice in memory; returns (bytes written, SHA-256).

        The bytes are a valid payload (`decode` reads them back) with tensors in name order; they
        need not equal `encode()`'s, whose layout safetensors chooses."""
        _check_scalars(self.scalars)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        header: dict[str, object] = {"__metadata__": {_META_KEY: json.dumps(
            {"format": FORMAT_VERSION, "scalars": self.scalars}, sort_keys=True)}}
        offset = 0
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        digest = hashlib.sha256()
        for chunk in (struct.pack("<Q", len(text)), text):
            handle.write(chunk)
            digest.update(chunk)
        for tensor in tensors.values():
            raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            handle.write(raw)
            digest.update(raw)
        return 8 + len(text) + offset, digest.hexdigest()

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
        """Any bytes give a Payload or a `PayloadError`, never another exception: a hostile upload
        (100,000 nested brackets, a 5,000-digit integer, a lying length) costs only its sender."""
        try:
            header, scalars = _check_header(data, max_bytes)
            loaded = st_load(bytes(data)) if header else {}
        except PayloadError:
            raise
        except Exception as exc:  # the parsers' own errors: recursion depth, integer length, ...
            raise PayloadError(f"malformed payload ({type(exc).__name__}: {str(exc)[:200]})") from None
        return cls(tensors={name: loaded[name] for name in sorted(loaded)}, scalars=scalars)


def _check_scalars(scalars: dict[str, Scalar]) -> None:
    for key, value in scalars.items():
        if not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise TypeError(f"scalar {key!r} must be int, float or str, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"scalar {key!r} is not finite")


def _check_header(data: bytes, max_bytes: int) -> tuple[dict, dict[str, Scalar]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, not {type(data).__name__}")
    size = len(data)
    if size > max_bytes:
        raise PayloadError(f"payload of {size} bytes exceeds the cap of {max_bytes} bytes")
    if size < 8:
        raise PayloadError(f"payload of {size} bytes is too short for a header")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise PayloadError(f"header length {header_len} does not fit a {size}-byte payload")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("header is not a JSON object")
    scalars = _parse_meta(header.pop("__metadata__", None))
    body = size - 8 - header_len
    spans = [_check_entry(name, info, body) for name, info in header.items()]
    spans.sort()
    cursor = 0
    for start, end, name in spans:
        if start != cursor:
            raise PayloadError(f"tensor {name!r} leaves a gap or overlaps at byte {start}")
        cursor = end
    if cursor != body:
        raise PayloadError(f"tensor data covers {cursor} of {body} body bytes")
    return header, scalars


def _check_entry(name: str, info: object, body: int) -> tuple[int, int, str]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise PayloadError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise PayloadError(f"tensor {name!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise PayloadError(f"tensor {name!r} has invalid data offsets")
    start, end = offsets
    if not 0 <= start <= end <= body:
        raise PayloadError(f"tensor {name!r} data [{start}, {end}) lies outside the {body}-byte body")
    if end - start != math.prod(shape) * _DTYPES[dtype][1]:
        raise PayloadError(f"tensor {name!r}: {end - start} bytes do not match shape {shape} of {dtype}")
    return start, end, name


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _parse_meta(metadata: object) -> dict[str, Scalar]:
    try:
        meta = json.loads(metadata.get(_META_KEY, "null")) if isinstance(metadata, dict) else None
    except (json.JSONDecodeError, TypeError) as exc:
        raise PayloadError(f"payload metadata is not valid JSON: {exc}") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format version {found!r}; expected {FORMAT_VERSION!r}")
    scalars = meta.get("scalars")
    if not isinstance(scalars, dict):
        raise PayloadError("scalars must be a JSON object")
    for key, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise PayloadError(f"scalar {key!r} has unsupported type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PayloadError(f"scalar {key!r} is not finite")
    return scalars
