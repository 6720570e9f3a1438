"""Fuzzing the server's intake: >10,000 random and mutated uploads of every method go through
`Payload.decode` and `server.validate`. Nothing may crash (only PayloadError), validation may not
change the server (hash of its complete state before and after), and whatever validation accepts
must aggregate without error into finite weights."""

import hashlib
import json
import math
import random
import struct

import pytest
import torch

from thinwire.data import build_federation
from thinwire.methods import get_method
from thinwire.methods.base import ClientState, Reply, RunContext, Workbench
from thinwire.wire import Payload, PayloadError

CASES_PER_METHOD = 2100
METHODS = {
    "fedavg": [],
    "fedit": [],
    "ferret": ["method.ferret.k_max=40"],
    "fedkseed": ["method.fedkseed.local_steps=6"],
    "fedkseed-pro": ["method.fedkseed.local_steps=6"],
    "cgfedllm": ["federation.rounds=3", "method.cgfedllm.tgap_rounds=1", "method.cgfedllm.tgap_snapshots=2"],
    "fedpt": ["method.fedpt.kd_steps=1", "method.fedpt.kd_examples=2"],
}


def _state_hash(server) -> str:
    return hashlib.sha256(server.state_dict().encode()).hexdigest()


def _setup(smoke_config, method):
    config = smoke_config(f"method.name='{method}'", "data.examples_per_client=8", "train.local_steps=2",
                          *METHODS[method])
    ctx = RunContext(config, Workbench(config))
    spec = get_method(method)
    server, client = spec.server(ctx), spec.client(ctx)
    server.setup()
    federation = build_federation(config)
    uploads = []
    for cid in (0, 1):
        down = Payload.decode(server.download(1, cid).encode())
        up = client.fit(1, cid, down, federation.clients[cid], ClientState())
        uploads.append((cid, up.payload.encode(), up.num_examples, up.metrics))
    # a norm bound 10× above the honest uploads, so that "huge" mutants are rejected by it
    norm = max(server.update_norm(Reply(c, Payload.decode(b), n, m)) for c, b, n, m in uploads)
    config.method.max_update_norm = 10 * norm
    return server, uploads


def _reencode(data: bytes, edit) -> bytes:
    """Decode honestly, let `edit(tensors, scalars)` change the content, encode again (valid bytes)."""
    payload = Payload.decode(data)
    tensors = {k: t.clone() for k, t in payload.tensors.items()}
    scalars = dict(payload.scalars)
    edit(tensors, scalars)
    return Payload(tensors=tensors, scalars=scalars).encode()


def _header_edit(data: bytes, rng: random.Random) -> bytes:
    """Change the safetensors header JSON (dtype, shape, offsets, names, metadata) and re-frame it."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(11)
    if choice == 0 and names:
        header[rng.choice(names)]["dtype"] = rng.choice(["F64", "F16", "I32", "I8", "BOOL", "U8", "Q4", 7])
    elif choice == 1 and names:
        entry = header[rng.choice(names)]
        entry["shape"] = rng.choice([[], [0], [-1], [2**40], [1, 2, 3], entry["shape"][::-1], "x", [1.5]])
    elif choice == 2 and names:
        entry = header[rng.choice(names)]
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 8], [a - 1, b], [0, 2**62], [a], None])
    elif choice == 3 and names:
        header[rng.choice(names) + "x"] = header.pop(rng.choice(names))
    elif choice == 4:
        meta = json.loads(header["__metadata__"]["thinwire"])
        meta["format"] = rng.choice(["0", "2", 1, None])
        header["__metadata__"]["thinwire"] = json.dumps(meta)
    elif choice == 5:
        meta = json.loads(header["__metadata__"]["thinwire"])
        key = rng.choice(["version", "basis_round", "since", "x"])
        meta["scalars"][key] = rng.choice([-1, 1, 10**30, "NaN", 1.5, True, None, [1], {"a": 1}, float("inf")])
        header["__metadata__"]["thinwire"] = json.dumps(meta)
    elif choice == 6:
        header["__metadata__"] = rng.choice([None, {}, {"thinwire": "{"}, {"thinwire": "[]"}, "x"])
    elif choice == 7:
        header = rng.choice([[], "x", 3, None, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}])
    elif choice == 9:  # structural: nesting deeper than the JSON parser recurses, in the header or metadata
        deep = "[" * rng.choice([2_000, 100_000])
        if rng.random() < 0.5:
            return struct.pack("<Q", len(deep)) + deep.encode() + body
        header["__metadata__"]["thinwire"] = deep
    elif choice == 10:  # structural: integers longer than Python parses from text
        digits = rng.choice(["9" * 5000, "1" + "0" * 5000])
        raw = json.dumps(header).replace('"data_offsets": [', f'"data_offsets": [{digits}, ', 1).encode()
        return struct.pack("<Q", len(raw)) + raw + body
    else:
        header["extra"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        return struct.pack("<Q", n) + raw + body  # a length prefix that lies
    return struct.pack("<Q", len(raw)) + raw + body


def _tensor_edit(method, rng: random.Random):
    """A content mutation that keeps the bytes well formed."""
    def nan(tensors, scalars):
        floats = [k for k, t in tensors.items() if t.is_floating_point() and t.numel()]
        if floats:
            t = tensors[rng.choice(sorted(floats))].view(-1)
            t[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])

    def huge(tensors, scalars):
        for k, t in tensors.items():
            if t.is_floating_point():
                tensors[k] = t * rng.choice([1e3, 1e6, 1e30])

    def dtype(tensors, scalars):
        k = rng.choice(sorted(tensors))
        tensors[k] = tensors[k].to(rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                               torch.int32, torch.uint8, torch.bool]))

    def shape(tensors, scalars):
        k = rng.choice(sorted(tensors))
        t = tensors[k].reshape(-1)
        tensors[k] = rng.choice([t, t[:-1], torch.cat([t, t[:1]]) if t.numel() else t, t.reshape(1, -1),
                                 t[:0]])

    def names(tensors, scalars):
        k = rng.choice(sorted(tensors))
        choice = rng.randrange(3)
        if choice == 0:
            del tensors[k]
        elif choice == 1:
            tensors[k + ".evil"] = tensors.pop(k)
        else:
            tensors["extra"] = torch.ones(3)

    def indices(tensors, scalars):
        if "counts" in tensors:  # Ferret: counts vs blocks and k_max
            c = tensors["counts"]
            i = rng.randrange(c.numel())
            c[i] = rng.choice([-1, 41, 2**31 - 1, int(c[i]) + 1])
        elif "seeds" in tensors:  # FedKSeed: seed indices in the pool
            key = rng.choice([k for k in ("seeds", "step_seeds") if k in tensors])
            s = tensors[key]
            if s.numel():
                s[rng.randrange(s.numel())] = rng.choice([-1, 4096, 2**31 - 1, int(s[0])])
        else:
            shape(tensors, scalars)

    def scalar(tensors, scalars):
        key = rng.choice(["version", "basis_round", "since", "zzz"])
        scalars[key] = rng.choice([-1, 1, 2, 10**12, "0", 0.5])

    return rng.choice([nan, huge, dtype, shape, names, indices, scalar])


def _mutants(data: bytes, method: str, rng: random.Random):
    """One mutated upload (bytes) per call, in many flavours."""
    kind = rng.randrange(10)
    if kind == 0:  # bit flips anywhere
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 1:  # bit flips in the tensor body (values stay well framed)
        (n,) = struct.unpack("<Q", data[:8])
        buf = bytearray(data)
        if len(buf) > 8 + n:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(8 + n, len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 2:  # truncation / extension
        return data[:rng.randrange(len(data))] if rng.random() < 0.7 else data + rng.randbytes(rng.randint(1, 64))
    if kind == 3:
        return _header_edit(data, rng)
    if kind == 4:
        return rng.randbytes(rng.randint(0, 256))
    return _reencode(data, _tensor_edit(method, rng))


@pytest.mark.parametrize("method", list(METHODS))
def test_fuzzed_uploads_never_crash_nor_touch_the_server(smoke_config, method):
    server, uploads = _setup(smoke_config, method)
    saved = Payload.decode(server.state_dict().encode())  # state_dict() holds live tensors: freeze it
    before = _state_hash(server)
    rng = random.Random(f"fuzz-{method}")
    cap = server.max_upload_bytes() + (1 << 20)
    outcomes = {"accepted": 0, "rejected": 0}
    crashes, accepted = [], []
    for i in range(CASES_PER_METHOD):
        cid, data, examples, metrics = uploads[i % len(uploads)]
        mutant = _mutants(data, method, rng)
        examples_sent, metrics_sent = examples, metrics
        if rng.random() < 0.03:
            examples_sent = rng.choice([0, -3, 10**9])
        if rng.random() < 0.03:
            metrics_sent = {**metrics, "train_loss": rng.choice([math.nan, math.inf, "x"])}
        try:
            reply = Reply(cid, Payload.decode(mutant, max_bytes=cap), examples_sent, metrics_sent)
            server.validate(reply)
        except PayloadError:
            outcomes["rejected"] += 1
        except Exception as exc:  # anything else is a bug in decoding or validation
            crashes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes["accepted"] += 1
            if len(accepted) < 4 and mutant != data:
                accepted.append(reply)
    assert not crashes, crashes[:5]
    assert _state_hash(server) == before
    assert outcomes["rejected"] > CASES_PER_METHOD * 0.5
    print(f"\n{method}: {CASES_PER_METHOD} mutants, {outcomes['rejected']} rejected, {outcomes['accepted']} "
          "accepted (valid after mutation), 0 crashes, server state unchanged")

    # whatever validation lets through aggregates without error into finite weights
    honest = Reply(uploads[1][0], Payload.decode(uploads[1][1]), uploads[1][2], uploads[1][3])
    for reply in accepted:
        server.load_state_dict(saved)
        server.validate(honest)
        server.aggregate(1, sorted([reply, honest], key=lambda r: r.client_id))
        assert all(bool(torch.isfinite(w).all()) for w in server.weights.values())
    server.load_state_dict(saved)
    assert _state_hash(server) == before


def test_random_bytes_only_ever_raise_payload_error():
    rng = random.Random("garbage")
    for _ in range(600):
        size = rng.choice([0, 7, 8, 9, 64, 1000])
        data = rng.randbytes(size)
        if size >= 8 and rng.random() < 0.5:  # a plausible length prefix and a JSON-ish header
            text = rng.choice([b"{}", b"{\"a\":", b"[1,2]", b"{\"__metadata__\":{\"thinwire\":\"{}\"}}", b"\xff\xfe"])
            data = struct.pack("<Q", len(text)) + text + data[8:]
        with pytest.raises(PayloadError):
            Payload.decode(data)
