"""Secure aggregation (SecAgg+ from Flower's primitives): masks cancel only in the sum, dropped
clients are unmasked from their shares, the server never holds an individual update, and the
final model equals the plain run's within the stated quantisation step, on every runtime."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thinwire.errors import UsageError
from thinwire.runtime import flower
from thinwire.runtime.local import InProcess, run_local
from thinwire.secagg import MASKED, SecAggClient, SecureRound, byte_tensor, mask_stream, quantize
from thinwire.wire import Payload, PayloadError

SECAGG = ("privacy.secagg=true", "eval.generate=false")


def _federation():
    """SecAgg clients answering a server's control messages directly, their state stored as bytes
    between messages (what a Flower node keeps in Context.state)."""
    states: dict[int, SecAggClient] = {}
    calls: list[str] = []

    def control(stage, messages):
        calls.extend(stage for _ in messages)
        replies = {}
        for cid, message in messages.items():
            state = SecAggClient(cid) if stage == "setup" else SecAggClient.decode(states[cid].encode())
            replies[cid] = state.step(stage, message)
            states[cid] = state
        return replies

    return states, control, calls


def _round(config, control, clients, rnd=1, directory=None, dimension=50):
    server = SecureRound(config, rnd, 0, control, dimension, {} if directory is None else directory)
    assert server.setup(clients) == {}
    return server


def _masked(config, state, roster, values, clipped=0):
    """A masked upload of `values` as `masked_upload` makes it: the quantised values, then the
    clip count, masked; the encrypted shares and commitments beside."""
    state.join(roster)
    q, _ = quantize(values, config.privacy.secagg_clip_range, config.privacy.secagg_quantization,
                    np.random.default_rng(state.cid))
    masked, blobs = state.mask(np.append(q, clipped))
    state_bytes = state.encode()  # a Flower node stores it after its upload
    state.__dict__.update(SecAggClient.decode(state_bytes).__dict__)
    payload = Payload(tensors={MASKED: torch.from_numpy(masked.astype(np.uint32).view(np.int32).copy()),
                               **{name: byte_tensor(blob) for name, blob in blobs.items()}},
                      scalars={"layout": json.dumps([["w", [values.size], "torch.float32"]]), "scalars": "{}"})
    return payload, q


def test_masks_cancel_in_the_sum_even_when_a_member_drops_after_the_roster(smoke_config):
    config = smoke_config("method.name='fedavg'", *SECAGG)
    states, control, _ = _federation()
    server = _round(config, control, [0, 1, 2, 3])
    assert server.threshold == 3
    roster = server.roster()
    rng = np.random.default_rng(0)
    values = {cid: rng.normal(0, 0.5, 50) for cid in (0, 1, 3)}  # member 2 got the roster, then dropped
    uploads, quantized = {}, {}
    for cid, v in values.items():
        uploads[cid], quantized[cid] = _masked(config, states[cid], roster, v, clipped=cid)
        server.check(cid, uploads[cid])
        # what reaches the server is not the client's quantised update, nor its clip count
        assert not np.array_equal(uploads[cid].tensors[MASKED].numpy().view(np.uint32)[:-1], quantized[cid])
    mean, metrics = server.unmask(uploads)
    assert metrics == {"secagg_unmasked": 3.0, "secagg_dropped": 1.0, "secagg_clipped": 4.0,  # 0 + 1 + 3
                       "secagg_corrupt_shares": 0.0}
    c, levels = config.privacy.secagg_clip_range, config.privacy.secagg_quantization
    exact = sum(quantized.values()) * (2 * c / levels) / 3 - c  # the quantised updates' mean, unmasked exactly
    assert torch.equal(mean.tensors["w"], torch.from_numpy(exact.astype(np.float32)))
    plain = sum(values.values()) / 3
    assert np.abs(exact - plain).max() < 2 * c / levels  # within one quantisation step of the plain mean


def test_keys_are_made_once_per_run_and_a_round_costs_one_control_message(smoke_config):
    """Round 1 sets up every member's keys; round 2, with the run's directory, sends only the unmask
    message. The pairwise round keys differ between rounds, so revealing one for a dropped member
    reveals nothing of another round's masks."""
    config = smoke_config("method.name='fedavg'", *SECAGG)
    states, control, calls = _federation()
    directory: dict = {}
    keys_by_round = []
    for rnd in (1, 2):
        calls.clear()
        server = _round(config, control, [0, 1, 2], rnd=rnd, directory=directory, dimension=5)
        roster = server.roster()
        uploads = {cid: _masked(config, states[cid], roster, np.zeros(5))[0] for cid in (0, 1, 2)}
        for cid, payload in uploads.items():
            server.check(cid, payload)
        server.unmask(uploads)
        assert calls == (["setup"] * 3 if rnd == 1 else []) + ["unmask"] * 3
        keys_by_round.append(states[0].round_key(1))
    assert set(directory) == {0, 1, 2} and keys_by_round[0] != keys_by_round[1]


def test_the_protocol_refuses_what_would_unmask_one_client(smoke_config):
    from thinwire.secagg import pack

    config = smoke_config("method.name='fedavg'", *SECAGG)
    states, control, _ = _federation()
    server = _round(config, control, [0, 1, 2], dimension=4)
    roster = server.roster()
    with pytest.raises(PayloadError, match="at stage 'joined'"):  # no unmask before an upload
        states[0].join(roster)
        states[0].step("unmask", pack({}, round=1, attempt=0, active=[0, 1, 2], dropped=[]))
    for cid in (0, 1, 2):
        _masked(config, states[cid], roster, np.zeros(4))
    with pytest.raises(PayloadError, match="names a member twice"):  # b's shares and round key of one member
        states[0].step("unmask", pack({}, round=1, attempt=0, active=[0, 1, 2], dropped=[1]))
    with pytest.raises(PayloadError, match="fewer than the threshold"):
        states[1].step("unmask", pack({}, round=1, attempt=0, active=[1], dropped=[0, 2]))
    with pytest.raises(PayloadError, match="another round"):
        states[2].step("unmask", pack({}, round=2, attempt=0, active=[0, 1, 2], dropped=[]))
    with pytest.raises(PayloadError, match="does not hold this client's keys"):
        SecAggClient(5).join(roster)
    with pytest.raises(PayloadError, match="where an update has 4"):
        fresh_states, fresh_control, _ = _federation()
        fresh = _round(config, fresh_control, [0, 1], dimension=4)
        fresh.check(0, _masked(config, fresh_states[0], fresh.roster(), np.zeros(5))[0])


def test_usage_errors_and_defaults(smoke_config):
    assert smoke_config(*SECAGG).method.weighting == "equal"
    for override, message in {"privacy.dp='central'": "privacy.dp = 'local' or 'none'",
                              "method.name='cgfedllm'": "does not support method 'cgfedllm'",
                              "method.weighting='examples'": "method.weighting = 'equal'",
                              "privacy.secagg_quantization=2147483648": "below 2\\^32",
                              "method.server_optimizer='fedexp'": "reads each client's update",
                              "privacy.secagg_threshold=0.5": "secagg_threshold above 0.5"}.items():
        with pytest.raises(UsageError, match=message):
            smoke_config(*SECAGG, override)
    assert smoke_config(*SECAGG, "privacy.secagg_threshold=0.5", "privacy.secagg_allow_low_threshold=true")


def test_the_mask_stream_depends_on_every_bit_of_its_256_bit_key():
    """Flower's generator kept 32 bits of the seed; ours is ChaCha20 under the whole key."""
    key = bytes(range(32))
    stream = mask_stream(key, 8)
    assert stream.min() >= 0 and stream.max() < 2**32
    for bit in range(256):
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not np.array_equal(mask_stream(bytes(flipped), 8), stream), bit
    # uniform over [0, 2^32): mean near 2^31
    assert abs(mask_stream(key, 100_000).mean() / 2**32 - 0.5) < 0.01


SETTINGS = {"fedavg": [], "fedit": [], "ferret": [],
            "fedkseed": ["method.fedkseed.local_steps=8", "privacy.secagg_clip_range=64"]}


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_one_round_equals_the_plain_mean_within_one_quantisation_step(tmp_path, smoke_config, method, monkeypatch):
    """The server's aggregate under SecAgg is the plain run's within 2c/T per value, and every
    upload that reached it was a masked vector, uniform over [0, 2^32) (a real update is not)."""
    base = (f"method.name='{method}'", "eval.generate=false", "federation.rounds=1", "method.weighting='equal'",
            *SETTINGS[method])
    run_local(smoke_config(*base, "method.aggregation='mean'"), tmp_path / "plain", quiet=True)  # SecAgg's rule
    seen: list[bytes] = []
    exchange = InProcess.exchange

    def spy(self, rnd, downloads):
        arrivals, took = exchange(self, rnd, downloads)
        seen.extend(a.up for a in arrivals.values() if a.up is not None)
        return arrivals, took

    monkeypatch.setattr(InProcess, "exchange", spy)
    config = smoke_config(*base, "privacy.secagg=true")
    summary = run_local(config, tmp_path / "secure", quiet=True)
    record = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["clients_ok"] == 2 and record["aggregate"]["secagg_unmasked"] == 2
    assert record["aggregate"]["secagg_clipped"] == 0
    assert record["secagg_downlink_bytes"] > 0 and record["secagg_uplink_bytes"] > 0
    assert summary["secagg_uplink_bytes_total"] == record["secagg_uplink_bytes"]
    assert record["uplink_bytes"] == sum(len(up) for up in seen)
    # nothing per client in the clear: no example count, loss, tokens or timings, no own clip count
    assert record["client_reports"] == "withheld (privacy)" and record["train_loss"] is None
    assert all(c["examples"] is None and c["metrics"] == {} for c in record["clients"])
    for up in seen:
        payload = Payload.decode(up)
        others = [c["client"] for c in record["clients"] if c["client"] != payload.scalars["thinwire.client"]]
        assert set(payload.tensors) == {MASKED, "commit", *(f"ct/{c}" for c in others)}  # and one share per member
        assert set(payload.scalars) == {"layout", "scalars", "thinwire.round", "thinwire.client"}
        words = payload.tensors[MASKED].numpy().view(np.uint32).astype(np.float64)
        assert abs(words.mean() / 2**32 - 0.5) < 0.05  # masked: uniform; a quantised update sits near 2^21
    plain, secure = (load_file(tmp_path / d / "final_state.safetensors") for d in ("plain", "secure"))
    step = 2 * config.privacy.secagg_clip_range / config.privacy.secagg_quantization
    gap = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    assert gap <= 1.01 * step * config.method.server_lr + 1e-6


def test_a_client_that_crashes_after_sharing_its_keys_is_unmasked_from_the_others(tmp_path, smoke_config,
                                                                                   monkeypatch):
    """Client 1 shares its keys, then its training raises: the others' masks with it are rebuilt
    from their shares of its key, and the round's mean is that of the clients that uploaded."""
    from thinwire.methods import get_method

    client_cls = get_method("fedavg").client
    fit = client_cls.fit

    def crashing(self, rnd, cid, *args, **kwargs):
        if cid == 1:
            raise RuntimeError("power cut")
        return fit(self, rnd, cid, *args, **kwargs)

    monkeypatch.setattr(client_cls, "fit", crashing)
    base = ("eval.generate=false", "federation.rounds=1", "federation.clients_per_round=3",
            "method.weighting='equal'")
    run_local(smoke_config(*base), tmp_path / "plain", quiet=True)
    run_local(smoke_config(*base, "privacy.secagg=true"), tmp_path / "secure", quiet=True)
    record = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["aggregate"]["secagg_dropped"] == 1 and record["aggregate"]["secagg_unmasked"] == 2
    assert [f["client"] for f in record["failures"]] == [1]
    plain, secure = (load_file(tmp_path / d / "final_state.safetensors") for d in ("plain", "secure"))
    assert max(float((plain[k] - secure[k]).abs().max()) for k in plain) < 4e-6


@pytest.mark.slow
def test_flower_sim_computes_the_same_secure_mean_as_the_local_runtime(tmp_path, smoke_config):
    config = smoke_config("method.name='ferret'", *SECAGG, "federation.rounds=2")
    local = run_local(config, tmp_path / "local", quiet=True)
    sim = flower.run_flower_sim(config, tmp_path / "sim", quiet=True, num_cpus=1)
    assert sim["final_eval"] == local["final_eval"]
    assert (tmp_path / "local" / "final_state.safetensors").read_bytes() == \
           (tmp_path / "sim" / "final_state.safetensors").read_bytes()
    rounds = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aggregate"]["secagg_unmasked"] == 2 for r in rounds)
    assert all(r["flower_control_bytes"] > r["secagg_downlink_bytes"] + r["secagg_uplink_bytes"] for r in rounds)


def _unmasked_round(config, tamper_upload=None, tamper_unmask=None, upload=(0, 1, 2, 3)):
    """Four members, those in `upload` upload; `tamper_upload(cid, words)` edits a masked vector
    (uint32 view), `tamper_unmask(cid, reply)` a member's unmask reply. Returns (server, mean or the
    PayloadError, the exact mean of the quantised updates)."""
    states, control, _ = _federation()

    def hostile(stage, messages):
        replies = control(stage, messages)
        return {cid: tamper_unmask(cid, r) if stage == "unmask" and tamper_unmask else r for cid, r in replies.items()}

    server = _round(config, hostile, [0, 1, 2, 3], dimension=20)
    roster = server.roster()
    rng = np.random.default_rng(1)
    uploads, quantized = {}, {}
    for cid in upload:
        uploads[cid], quantized[cid] = _masked(config, states[cid], roster, rng.normal(0, 0.5, 20))
        if tamper_upload:
            tamper_upload(cid, uploads[cid].tensors[MASKED].numpy().view(np.uint32))
        server.check(cid, uploads[cid])
    c, levels = config.privacy.secagg_clip_range, config.privacy.secagg_quantization
    exact = sum(quantized.values()) * (2 * c / levels) / len(upload) - c
    try:
        return server, server.unmask(uploads)[0], exact
    except PayloadError as exc:
        return server, exc, exact


def test_an_offset_on_a_masked_upload_fails_the_round_saying_so(smoke_config):
    """Adding 2^30 to every masked value moves the unmasked sum out of [0, n·T]: detected, not averaged."""
    config = smoke_config("method.name='fedavg'", *SECAGG)

    def offset(cid, words):
        if cid == 2:
            words += np.uint32(1 << 30)

    _, outcome, _ = _unmasked_round(config, tamper_upload=offset)
    assert isinstance(outcome, PayloadError) and "leaves the honest range" in str(outcome)


def _garbled(reply, prefix):
    from thinwire.secagg import pack, unpack

    blobs, _ = unpack(reply)
    return pack({name: value[:4] + bytes(b ^ 0x5A for b in value[4:]) if name.startswith(prefix) else value
                 for name, value in blobs.items()})


def test_corrupt_shares_are_named_and_the_round_unmasks_from_the_others(smoke_config):
    """Member 1 answers the unmask message with garbage shares: the server finds three shares that
    rebuild each committed seed, names member 1, and the mean is exact."""
    config = smoke_config("method.name='fedavg'", *SECAGG)
    server, mean, exact = _unmasked_round(config, tamper_unmask=lambda cid, r: _garbled(r, "b/") if cid == 1 else r)
    assert server.corrupt == [1]
    assert torch.equal(mean.tensors["w"], torch.from_numpy(exact.astype(np.float32)))


def test_a_wrong_round_key_for_a_dropped_member_is_caught_by_its_commitment(smoke_config):
    config = smoke_config("method.name='fedavg'", *SECAGG)
    _, outcome, _ = _unmasked_round(config, tamper_unmask=lambda cid, r: _garbled(r, "key/") if cid == 3 else r,
                                    upload=(0, 1, 3))
    assert isinstance(outcome, PayloadError) and "member 3 gave no valid round key with dropped member 2" in str(outcome)
