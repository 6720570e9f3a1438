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
from thinwire.secagg import MASKED, STAGES, SecAggClient, SecureRound, quantize
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


def _masked(config, state, values):
    q, _ = quantize(values, config.privacy.secagg_clip_range, config.privacy.secagg_quantization,
                    np.random.default_rng(state.cid))
    masked = state.mask(q).astype(np.uint32).view(np.int32)
    payload = Payload(tensors={MASKED: torch.from_numpy(masked.copy())},
                      scalars={"layout": json.dumps([["w", [values.size], "torch.float32"]]), "scalars": "{}",
                               "clipped": 0})
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
        uploads[cid], quantized[cid] = _masked(config, states[cid], v)
        server.check(uploads[cid])
        # what reaches the server is not the client's quantised update
        assert not np.array_equal(uploads[cid].tensors[MASKED].numpy().view(np.uint32), quantized[cid])
    mean, metrics = server.unmask(uploads)
    assert metrics == {"secagg_unmasked": 3.0, "secagg_dropped": 1.0, "secagg_clipped": 0.0}
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
                              "privacy.secagg_quantization=2147483648": "below 2\\^32"}.items():
        with pytest.raises(UsageError, match=message):
            smoke_config(*SECAGG, override)


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
    for up in seen:
        payload = Payload.decode(up)
        assert set(payload.tensors) == {MASKED}
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
