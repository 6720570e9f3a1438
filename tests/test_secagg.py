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
from thinwire.secagg import MASKED, STAGES, SecAggClient, SecureRound, mask_stream, quantize
from thinwire.wire import Payload, PayloadError

SECAGG = ("privacy.secagg=true", "eval.generate=false")


def _federation(rnd=1):
    """SecAgg clients answering a SecureRound directly, their state stored as bytes between stages
    (what a Flower node keeps in Context.state)."""
    states: dict[int, SecAggClient] = {}

    def control(stage, messages):
        replies = {}
        for cid, message in messages.items():
            state = SecAggClient(cid, rnd) if stage == STAGES[0] else SecAggClient.decode(states[cid].encode())
            replies[cid] = state.step(stage, message)
            states[cid] = state
        return replies

    return states, control


def _masked(config, state, values, clipped=0):
    """A masked upload of `values` as `masked_upload` makes it: the quantised values, then the clip count."""
    q, _ = quantize(values, config.privacy.secagg_clip_range, config.privacy.secagg_quantization,
                    np.random.default_rng(state.cid))
    masked = state.mask(np.append(q, clipped)).astype(np.uint32).view(np.int32)
    payload = Payload(tensors={MASKED: torch.from_numpy(masked.copy())},
                      scalars={"layout": json.dumps([["w", [values.size], "torch.float32"]]), "scalars": "{}"})
    return payload, q


def test_masks_cancel_in_the_sum_even_when_a_client_drops_after_sharing(smoke_config):
    config = smoke_config("method.name='fedavg'", *SECAGG)
    states, control = _federation()
    server = SecureRound(config, 1, control, dimension=50)
    assert server.setup([0, 1, 2, 3]) == {} and server.threshold == 3
    rng = np.random.default_rng(0)
    values = {cid: rng.normal(0, 0.5, 50) for cid in (0, 1, 3)}  # client 2 shared its keys, then dropped
    uploads, quantized = {}, {}
    for cid, v in values.items():
        uploads[cid], quantized[cid] = _masked(config, states[cid], v, clipped=cid)
        server.check(uploads[cid])
        # what reaches the server is not the client's quantised update, nor its clip count
        assert not np.array_equal(uploads[cid].tensors[MASKED].numpy().view(np.uint32)[:-1], quantized[cid])
        assert set(uploads[cid].scalars) == {"layout", "scalars"}
    mean, metrics = server.unmask(uploads)
    assert metrics == {"secagg_unmasked": 3.0, "secagg_dropped": 1.0, "secagg_clipped": 4.0,  # 0 + 1 + 3
                       "secagg_corrupt_shares": 0.0}
    c, levels = config.privacy.secagg_clip_range, config.privacy.secagg_quantization
    exact = sum(quantized.values()) * (2 * c / levels) / 3 - c  # the quantised updates' mean, unmasked exactly
    assert torch.equal(mean.tensors["w"], torch.from_numpy(exact.astype(np.float32)))
    plain = sum(values.values()) / 3
    assert np.abs(exact - plain).max() < 2 * c / levels  # within one quantisation step of the plain mean


def test_the_protocol_refuses_what_would_unmask_one_client(smoke_config):
    config = smoke_config("method.name='fedavg'", *SECAGG)
    states, control = _federation()
    server = SecureRound(config, 1, control, dimension=4)
    server.setup([0, 1, 2])
    from thinwire.secagg import pack

    with pytest.raises(PayloadError, match="names a client twice"):  # both shares of client 1: its update
        states[0].step("unmask", pack({}, active=[0, 1, 2], dropped=[1]))
    with pytest.raises(PayloadError, match="fewer than the threshold"):
        states[1].step("unmask", pack({}, active=[1], dropped=[]))
    with pytest.raises(PayloadError, match="'forward' where 'setup' was due"):
        SecAggClient(0, 1).step("forward", pack({}))
    with pytest.raises(PayloadError, match="where an update has 4"):
        server.check(_masked(config, states[0], np.zeros(5))[0])


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
    run_local(smoke_config(*base), tmp_path / "plain", quiet=True)
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
        assert set(payload.tensors) == {MASKED}
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


def _unmasked_round(config, tamper_upload=None, tamper_unmask=None):
    """Four clients, all upload; `tamper_upload(cid, words)` edits a masked vector (uint32 view),
    `tamper_unmask(cid, reply)` a client's unmask reply. Returns (server, mean or exception, plain mean)."""

    states, control = _federation()

    def hostile(stage, messages):
        replies = control(stage, messages)
        return {cid: tamper_unmask(cid, r) if stage == "unmask" and tamper_unmask else r for cid, r in replies.items()}

    server = SecureRound(config, 1, hostile, dimension=20)
    server.setup([0, 1, 2, 3])
    rng = np.random.default_rng(1)
    uploads, quantized = {}, {}
    for cid in range(4):
        uploads[cid], quantized[cid] = _masked(config, states[cid], rng.normal(0, 0.5, 20))
        if tamper_upload:
            tamper_upload(cid, uploads[cid].tensors[MASKED].numpy().view(np.uint32))
    c, levels = config.privacy.secagg_clip_range, config.privacy.secagg_quantization
    exact = sum(quantized.values()) * (2 * c / levels) / 4 - c
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


def test_corrupt_shares_are_named_and_the_round_unmasks_from_the_others(smoke_config):
    """Client 1 answers the unmask stage with garbage shares (wrong values, one with broken
    padding): the server finds three shares that rebuild each committed seed, names client 1, and
    the mean is exact."""
    from thinwire.secagg import pack, unpack

    config = smoke_config("method.name='fedavg'", *SECAGG)

    def corrupt(cid, reply):
        if cid != 1:
            return reply
        blobs, _ = unpack(reply)
        return pack({name: share[:4] + bytes(b ^ 0x5A for b in share[4:]) for name, share in blobs.items()})

    server, mean, exact = _unmasked_round(config, tamper_unmask=corrupt)
    assert server.corrupt == [1]
    assert torch.equal(mean.tensors["w"], torch.from_numpy(exact.astype(np.float32)))
