"""Structure-aware mutations of encoded payloads: what a hostile or broken client might send.

Used by the fuzz test (tests/test_fuzz.py) and the fuzz benchmark (benchmarks/fuzz.py): each call
of `mutant` turns an honest upload's bytes into one mutated upload, in many flavours (bit flips,
truncation, header edits including structural attacks, re-encoded content edits).
"""

from __future__ import annotations

import json
import math
import random
import struct

import torch

from thinwire.config import Config
from thinwire.wire import Payload

# per method: overrides of the smoke config that keep its honest uploads small and quick to make
# (each method's list starts with COMMON)
COMMON = ["data.examples_per_client=8", "train.local_steps=2"]
FUZZ_SETTINGS = {
    "fedavg": [],
    "fedit": [],
    "ferret": ["method.ferret.k_max=40"],
    "fedkseed": ["method.fedkseed.local_steps=6"],
    "fedkseed-pro": ["method.fedkseed.local_steps=6"],
    "cgfedllm": ["federation.rounds=3", "method.cgfedllm.tgap_rounds=1", "method.cgfedllm.tgap_snapshots=2"],
    "fedpt": ["method.fedpt.kd_steps=1", "method.fedpt.kd_examples=2"],
}
FUZZ_SETTINGS = {name: [f"method.name='{name}'", *COMMON, *extra] for name, extra in FUZZ_SETTINGS.items()}


def target(config: Config):
    """(server after setup, [(client, honest upload bytes, examples, metrics)] of clients 0 and 1 in
    round 1), with a norm bound 10× above the honest uploads so that "huge" mutants meet it."""
    from thinwire.data import build_federation
    from thinwire.methods import get_method
    from thinwire.methods.base import ClientState, Reply, RunContext, Workbench

    ctx = RunContext(config, Workbench(config))
    spec = get_method(config.method.name)
    server, client = spec.server(ctx), spec.client(ctx)
    server.setup()
    federation = build_federation(config)
    uploads = []
    for cid in (0, 1):
        down = Payload.decode(server.download(1, cid).encode())
        up = client.fit(1, cid, down, federation.clients[cid], ClientState())
        uploads.append((cid, up.payload.encode(), up.num_examples, up.metrics))
    norm = max(server.update_norm(Reply(c, Payload.decode(b), n, m)) for c, b, n, m in uploads)
    config.method.max_update_norm = 10 * norm
    return server, uploads


def reencode(data: bytes, edit) -> bytes:
    """Decode honestly, let `edit(tensors, scalars)` change the content, encode again (valid bytes)."""
    payload = Payload.decode(data)
    tensors = {k: t.clone() for k, t in payload.tensors.items()}
    scalars = dict(payload.scalars)
    edit(tensors, scalars)
    return Payload(tensors=tensors, scalars=scalars).encode()


def header_edit(data: bytes, rng: random.Random) -> bytes:
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


def tensor_edit(method, rng: random.Random):
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


def mutant(data: bytes, method: str, rng: random.Random):
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
        return header_edit(data, rng)
    if kind == 4:
        return rng.randbytes(rng.randint(0, 256))
    return reencode(data, tensor_edit(method, rng))
