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


def _run(smoke_config, monkeypatch, tmp_path, method, behaviour, rounds=None, *extra):
    """One round (or `rounds`) with clients 0, 1 and 2, client 1 answering with `behaviour(upload)`."""
    spec = get_method(method)
    fit = spec.client.fit

    def hostile_fit(self, rnd, cid, download, examples, state):
        upload = fit(self, rnd, cid, download, examples, state)
        if cid == ATTACKER:
            upload.payload, upload.num_examples = behaviour(upload)
        return upload

    with monkeypatch.context() as patch:
        patch.setattr(spec.client, "fit", hostile_fit)
        if rounds is None:
            rounds = 2 if method == "cgfedllm" else 1  # CG-FedLLM: its uncompressed TGAP round, then one FAF round
        config = smoke_config(*FUZZ_SETTINGS[method], "federation.clients_per_round=3", f"federation.rounds={rounds}",
                              "eval.generate=false", *extra)
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


# --- the round as a whole: bounded values, bounded influence, a model the server can use ----------

FLOAT32_MAX = torch.finfo(torch.float32).max


def _extreme(up):
    """Every floating value of the upload at ±float32 max: finite, and overflowing once summed."""
    tensors = {k: torch.where(t < 0, -FLOAT32_MAX, FLOAT32_MAX).to(t.dtype) if t.is_floating_point() else t
               for k, t in up.payload.tensors.items()}
    return Payload(tensors=tensors, scalars=dict(up.payload.scalars)), up.num_examples


def _scaled(factor):
    def behaviour(up):
        tensors = {k: t * factor if t.is_floating_point() else t for k, t in up.payload.tensors.items()}
        return Payload(tensors=tensors, scalars=dict(up.payload.scalars)), up.num_examples

    return behaviour


def _final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_state.safetensors"))


@pytest.mark.parametrize("method", list(FUZZ_SETTINGS))
def test_extreme_finite_values_are_rejected_and_the_run_ends(smoke_config, monkeypatch, tmp_path, method):
    """Values at the float32 maximum pass a NaN/Inf check; they must not reach the model."""
    rounds = _run(smoke_config, monkeypatch, tmp_path / "run", method, _extreme, 3 if method == "cgfedllm" else 2)
    for record in rounds:
        assert [r["client"] for r in record["rejected"]] == [ATTACKER]
        reason = record["rejected"][0]["reason"]  # Ferret's float16 wire rounds float32 max to inf
        assert "max_update_value" in reason or "non-finite" in reason
        assert ATTACKER not in [c["client"] for c in record["clients"]] and record["clients"]
    assert all(bool(torch.isfinite(t).all()) for t in _final_state(tmp_path / "run").values() if t.is_floating_point())
    assert torch.isfinite(torch.tensor(rounds[-1]["eval"]["loss"]))


@pytest.mark.parametrize("method", ["fedavg", "fedkseed"])
def test_a_scaled_update_weighs_no_more_than_one_at_the_adaptive_bound(smoke_config, monkeypatch, tmp_path, method):
    """Default aggregation (bounded-mean): ×100 and ×10⁴ are both clipped to the round's bound, so
    scaling further buys the attacker nothing."""
    runs = {f: _run(smoke_config, monkeypatch, tmp_path / str(f), method, _scaled(f), 2) for f in (100, 10_000)}
    for factor, rounds in runs.items():
        for record in rounds:
            bound = record["aggregate"]["norm_bound"]
            attacker = next(c for c in record["clients"] if c["client"] == ATTACKER)
            honest = sorted(c["update_norm"] for c in record["clients"] if c["client"] != ATTACKER)
            assert bound == pytest.approx(3 * honest[-1])  # lower median of 3: the larger honest norm
            assert attacker["update_norm"] > bound and attacker["clip_factor"] == pytest.approx(
                bound / attacker["update_norm"])
            assert record["aggregate"]["clipped"] == 1
    assert runs[100][-1]["eval"]["loss"] == pytest.approx(runs[10_000][-1]["eval"]["loss"], abs=1e-3)


def _unchecked(monkeypatch):
    """Validation off: what reaches aggregation is whatever the attacker sent."""
    from thinwire.methods.base import ServerSide

    monkeypatch.setattr(ServerSide, "validate", lambda self, reply: None)


@pytest.mark.parametrize("method", ["fedavg", "fedkseed", "fedpt"])
def test_an_aggregate_that_is_not_finite_is_never_committed(smoke_config, monkeypatch, tmp_path, method):
    """Past validation (here: switched off), a NaN update poisons the aggregate: the server restores
    its state, drops the client and commits the round from the others, bit-identically to the run
    where that client was absent."""
    _unchecked(monkeypatch)
    hostile = _run(smoke_config, monkeypatch, tmp_path / "hostile", method, ATTACKS["nan"], 2)
    absent = _run(smoke_config, monkeypatch, tmp_path / "absent", method, _absent, 2)
    for record in hostile:
        assert [r["client"] for r in record["rejected"]] == [ATTACKER]
        assert record["rejected"][0]["reason"].startswith("aggregate not applied")
        assert [c["client"] for c in record["clients"]] == [0, 2]
    assert (tmp_path / "hostile" / "final_state.safetensors").read_bytes() == \
        (tmp_path / "absent" / "final_state.safetensors").read_bytes()


# --- records: what a client claims stays a claim ---------------------------------------------------

FORGED = {"process-age-s": float("nan"), "import-s": -float("inf"), "setup-s": 1e300}
COERCIBLE = {0: True, 1: 24.9, 2: "24"}  # round -> a num-examples Flower used to coerce (True -> 1, 24.9 -> 24)


def _forging_client_app(forger: int, miscounter: int):
    """thinwire's ClientApp, except that `forger` reports impossible timings in round 1 and
    `miscounter` a num-examples of the wrong type (round r: COERCIBLE[r - 1]); defined in a
    function so Ray ships it to its actors by value."""
    from flwr.clientapp import ClientApp

    from thinwire.runtime import flower

    app = ClientApp()

    @app.query("thinwire_hello")
    def hello(message, context):
        return flower._hello(message, context)

    @app.train("thinwire_fit")
    def fit(message, context):
        meta = message.content["thinwire"]
        cid, rnd = int(meta["client"]), int(meta["round"])
        reply = flower._fit(message, context)
        if cid == forger and rnd == 1:
            for key, value in FORGED.items():
                reply.content["thinwire"][key] = value
        if cid == miscounter:
            reply.content["thinwire"]["num-examples"] = COERCIBLE[rnd - 1]
        return reply

    return app


def test_flower_client_claims_stay_claims(smoke_config, tmp_path):
    """Forged timings (NaN, -inf, 1e300) reject the forger's reply instead of landing in the record as
    measured fields, metrics.jsonl stays strict JSON, and num-examples of the wrong type (True, 24.9,
    "24") is refused as the in-process runtime refuses it."""
    from thinwire.runtime import flower

    config = smoke_config("federation.clients_per_round=3", "federation.rounds=3", "eval.generate=false")
    flower.run_flower_sim(config, tmp_path / "run", quiet=True, num_cpus=1,
                          client_app=_forging_client_app(forger=0, miscounter=2))

    def strict(constant):
        raise ValueError(f"metrics.jsonl holds {constant}")

    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    rounds = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
    rejected = [{r["client"]: r["reason"] for r in record["rejected"]} for record in rounds]
    failed = [{r["client"]: r["reason"] for r in record["failures"]} for record in rounds]
    assert list(rejected[0]) == [0] and "is not a finite number" in rejected[0][0]
    assert rejected[1:] == [{}, {}]
    assert [list(f) for f in failed] == [[2], [2], [2]]  # refused as it arrives, as a malformed reply
    assert all("example count" in f[2] and "is not a positive integer" in f[2] for f in failed)
    for record in rounds:
        for client in record["clients"]:
            assert not {"clientapp_age_s", "import_s", "setup_s"} & set(client)  # never a measured field
            assert client["metrics"]["setup_s"] >= 0 and client["metrics"]["clientapp_age_s"] >= -1


@pytest.mark.parametrize("claim", [True, 24.9, "24"])
def test_an_example_count_of_the_wrong_type_is_refused_in_process(smoke_config, monkeypatch, tmp_path, claim):
    rounds = _run(smoke_config, monkeypatch, tmp_path / "run", "fedavg", lambda up: (up.payload, claim))
    assert [r["client"] for r in rounds[0]["rejected"]] == [ATTACKER]
    assert "example count" in rounds[0]["rejected"][0]["reason"]


def test_one_client_cannot_set_the_rounds_train_loss(smoke_config, monkeypatch, tmp_path):
    """The round's train_loss is the median of the clients' claims: a claim of -330 does not move it
    outside the honest claims."""
    from thinwire.methods.fedavg import DeltaClient

    fit = DeltaClient.fit

    def lying_fit(self, rnd, cid, download, examples, state):
        upload = fit(self, rnd, cid, download, examples, state)
        if cid == ATTACKER:
            upload.metrics["train_loss"] = -330.0
        return upload

    monkeypatch.setattr(DeltaClient, "fit", lying_fit)
    config = smoke_config("federation.clients_per_round=3", "federation.rounds=1", "eval.generate=false")
    run_local(config, tmp_path / "run", quiet=True)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    honest = sorted(c["metrics"]["train_loss"] for c in record["clients"] if c["client"] != ATTACKER)
    assert honest[0] <= record["train_loss"] <= honest[-1]
