import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwire.wire import Payload, PayloadError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]

names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)
scalars = st.dictionaries(names, st.one_of(st.integers(-2**53, 2**53), st.floats(allow_nan=False, allow_infinity=False),
                                          st.text(max_size=20)), max_size=4)


@st.composite
def payloads(draw):
    tensors = {}
    for name in draw(st.lists(names, max_size=4, unique=True)):
        shape = draw(shapes)
        dtype = draw(st.sampled_from(DTYPES))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        tensors[name] = (torch.rand(shape, generator=gen) * 100).to(dtype)
    return Payload(tensors=tensors, scalars=draw(scalars))


@settings(max_examples=150, deadline=None)
@given(payloads())
def test_round_trip(payload):
    data = payload.encode()
    back = Payload.decode(data)
    assert back.scalars == payload.scalars
    assert set(back.tensors) == set(payload.tensors)
    for name, t in payload.tensors.items():
        assert back.tensors[name].dtype == t.dtype
        assert torch.equal(back.tensors[name], t)
    assert back.encode() == data


@settings(max_examples=100, deadline=None)
@given(payloads())
def test_a_streamed_payload_decodes_to_the_same_payload(payload):
    """`write` (checkpoints: one tensor at a time) gives bytes that decode like `encode`'s, and
    reports their true size and SHA-256."""
    import hashlib
    import io

    buffer = io.BytesIO()
    size, digest = payload.write(buffer)
    data = buffer.getvalue()
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    back = Payload.decode(data)
    assert back.scalars == payload.scalars and set(back.tensors) == set(payload.tensors)
    for name, t in payload.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)
    assert back.encode() == payload.encode()


@settings(max_examples=300, deadline=None)
@given(payloads(), st.data())
def test_mutated_bytes_never_crash(payload, data):
    raw = bytearray(payload.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        Payload.decode(bytes(raw))
    except PayloadError:
        pass


def test_truncated_and_garbage_rejected():
    data = Payload(tensors={"w": torch.ones(3, 3)}, scalars={"round": 1}).encode()
    for bad in (b"", data[:7], data[:-1], data + b"x", b"\xff" * 64):
        with pytest.raises(PayloadError):
            Payload.decode(bad)


def _rewrite_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def test_version_shape_and_dtype_checked():
    data = Payload(tensors={"w": torch.ones(2, 2)}).encode()

    def version(h):
        h["__metadata__"]["thinwire"] = json.dumps({"format": "0", "scalars": {}})

    def shape(h):
        h["w"]["shape"] = [4, 4]

    def dtype(h):
        h["w"]["dtype"] = "F8_E4M3"

    for edit, words in ((version, "format version"), (shape, "do not match"), (dtype, "unsupported dtype")):
        with pytest.raises(PayloadError, match=words):
            Payload.decode(_rewrite_header(data, edit))


def test_size_cap_and_non_finite_scalars():
    data = Payload(tensors={"w": torch.ones(100)}).encode()
    with pytest.raises(PayloadError, match="exceeds the cap"):
        Payload.decode(data, max_bytes=100)
    with pytest.raises(ValueError):
        Payload(scalars={"x": float("nan")}).encode()


def test_size_is_header_plus_raw_bytes():
    payload = Payload(tensors={"a": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float16)})
    data = payload.encode()
    (header,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + header + 1000 * 4 + 10 * 2


def _raw(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


META = {"thinwire": json.dumps({"format": "1", "scalars": {}})}


@pytest.mark.parametrize("attack", [
    _raw(b"[" * 100_000),  # nesting deeper than the JSON parser recurses
    _raw(b'{"a":' * 100_000),
    _raw(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4),
    _raw(json.dumps({"__metadata__": {"thinwire": "[" * 100_000}}).encode()),
    _raw(json.dumps({"__metadata__": {"thinwire": '{"format": "1", "scalars": {"a": ' + "9" * 5000 + "}}"}}).encode()),
    _raw(json.dumps({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "__metadata__": META}).encode(),
         b"\0" * 4),
    _raw(json.dumps({"x": {"dtype": "F32", "shape": [2 ** 70], "data_offsets": [0, 4]}, "__metadata__": META}).encode(),
         b"\0" * 4),
], ids=["deep-array", "deep-object", "long-int-shape", "deep-metadata", "long-int-scalar", "bool-shape", "huge-shape"])
def test_structural_attacks_are_payload_errors(attack):
    with pytest.raises(PayloadError):
        Payload.decode(attack)
