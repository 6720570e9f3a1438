"""The attack suite: a hostile client's upload is dropped and logged, the run goes on, and the global
model is bit-identical to the run where that client simply did not answer."""

import json
import struct

import pytest
import torch

from thinwire.fuzz import FUZZ_SETTINGS
from thinwire.methods import get_method
from thinwire.runtime.local import run_local
from thinwire.runtime.upload import CLIENT, ROUND
from thinwire.wire import Payload

ATTACKER = 1


class RawBytes(Payload):
    """An upload that encodes to bytes the attacker chose."""

    def __init__(self, raw: bytes):
        super().__init__()
        self.raw = raw

    def encode(self) -> bytes:
        return self.raw


def _deep_nesting(honest: bytes) -> bytes:
    header = b"[" * 100_000
    return struct.pack("<Q", len(header)) + header


def _nan(payload: Payload) -> Payload:
    tensors = {k: t.clone() for k, t in payload.tensors.items()}
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel())
    tensors[name].view(-1)[0] = float("nan")
    return Payload(tensors=tensors, scalars=dict(payload.scalars))


def _renamed(payload: Payload) -> Payload:
    return Payload(tensors={k + ".evil": t for k, t in payload.tensors.items()}, scalars=dict(payload.scalars))


def _stamped(payload: Payload, rnd: int, cid: int) -> RawBytes:
    """The upload as a client would send it for round `rnd` as client `cid` (runtime/upload.py)."""
    return RawBytes(Payload(tensors=payload.tensors, scalars={**payload.scalars, ROUND: rnd, CLIENT: cid}).encode())


# attack -> how the attacker's honest upload (payload, example count) becomes the hostile one
ATTACKS = {
    "random-bytes": lambda up: (RawBytes(bytes(range(256)) * 4), up.num_examples),
    "truncated": lambda up: (RawBytes(up.payload.encode()[:-7]), up.num_examples),
    "overlong": lambda up: (RawBytes(up.payload.encode() + b"\0" * 64), up.num_examples),
    "deep-nesting": lambda up: (RawBytes(_deep_nesting(up.payload.encode())), up.num_examples),
    "nan": lambda up: (_nan(up.payload), up.num_examples),
    "wrong-names": lambda up: (_renamed(up.payload), up.num_examples),
    "huge-example-count": lambda up: (up.payload, 10 ** 12),
    "replayed-from-an-earlier-round": lambda up: (_stamped(up.payload, 0, ATTACKER), up.num_examples),
    "another-clients-upload": lambda up: (_stamped(up.payload, 1, 0), up.num_examples),
}
FAST = [("fedavg", "deep-nesting"), ("ferret", "nan"), ("fedkseed", "huge-example-count"),
        ("fedit", "replayed-from-an-earlier-round"), ("fedavg", "another-clients-upload")]
CASES = [pytest.param(m, a, marks=[] if (m, a) in FAST else [pytest.mark.slow])
         for m in FUZZ_SETTINGS for a in ATTACKS]


def _run(smoke_config, monkeypatch, tmp_path, method, behaviour):
    """One round with clients 0, 1 and 2, client 1 answering with `behaviour(upload)`."""
    spec = get_method(method)
    fit = spec.client.fit

    def hostile_fit(self, rnd, cid, download, examples, state):
        upload = fit(self, rnd, cid, download, examples, state)
        if cid == ATTACKER:
            upload.payload, upload.num_examples = behaviour(upload)
        return upload

    with monkeypatch.context() as patch:
        patch.setattr(spec.client, "fit", hostile_fit)
        rounds = 2 if method == "cgfedllm" else 1  # CG-FedLLM: its uncompressed TGAP round, then one FAF round
        config = smoke_config(*FUZZ_SETTINGS[method], "federation.clients_per_round=3", f"federation.rounds={rounds}",
                              "eval.generate=false")
        run_local(config, tmp_path, quiet=True)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def _absent(upload):
    raise ConnectionError("client 1 did not answer")


@pytest.mark.parametrize("method, attack", CASES)
def test_a_hostile_upload_is_as_if_the_client_were_absent(smoke_config, monkeypatch, tmp_path, method, attack):
    hostile_rounds = _run(smoke_config, monkeypatch, tmp_path / "hostile", method, ATTACKS[attack])
    absent_rounds = _run(smoke_config, monkeypatch, tmp_path / "absent", method, _absent)
    for hostile, absent in zip(hostile_rounds, absent_rounds, strict=True):
        assert [r["client"] for r in hostile["rejected"]] == [ATTACKER] and hostile["rejected"][0]["reason"]
        assert [c["client"] for c in hostile["clients"]] == [c["client"] for c in absent["clients"]] == [0, 2]
        # the attacker's bytes count: the round's uplink is the honest uploads plus exactly what it sent
        sent = hostile["rejected"][0]["uplink_bytes"]
        assert hostile["uplink_bytes"] == sum(c["uplink_bytes"] for c in hostile["clients"]) + sent
    assert (tmp_path / "hostile" / "final_state.safetensors").read_bytes() == \
        (tmp_path / "absent" / "final_state.safetensors").read_bytes()
    assert torch.isfinite(torch.tensor(hostile_rounds[-1]["eval"]["loss"]))
