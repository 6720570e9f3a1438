"""Fuzzing the server's intake: >10,000 random and mutated uploads of every method go through
`Payload.decode` and `server.validate`. Nothing may crash (only PayloadError), validation may not
change the server (hash of its complete state before and after), and whatever validation accepts
must aggregate without error into finite weights."""

import hashlib
import math
import random
import struct

import pytest
import torch

from thinwire.methods.base import Reply
from thinwire.fuzz import FUZZ_SETTINGS, mutant, target
from thinwire.wire import Payload, PayloadError

CASES_PER_METHOD = 2100


def _state_hash(server) -> str:
    return hashlib.sha256(server.state_dict().encode()).hexdigest()


def _setup(smoke_config, method):
    return target(smoke_config(*FUZZ_SETTINGS[method]))


@pytest.mark.parametrize("method", list(FUZZ_SETTINGS))
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
        mutated = mutant(data, method, rng)
        examples_sent, metrics_sent = examples, metrics
        if rng.random() < 0.03:
            examples_sent = rng.choice([0, -3, 10**9])
        if rng.random() < 0.03:
            metrics_sent = {**metrics, "train_loss": rng.choice([math.nan, math.inf, "x"])}
        try:
            reply = Reply(cid, Payload.decode(mutated, max_bytes=cap), examples_sent, metrics_sent)
            server.validate(reply)
        except PayloadError:
            outcomes["rejected"] += 1
        except Exception as exc:  # anything else is a bug in decoding or validation
            crashes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes["accepted"] += 1
            if len(accepted) < 4 and mutated != data:
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
