"""Methods whose downlink is per-round updates: catch-up, shared replica, bytes that grow with missed rounds."""

import pytest
import torch

from thinwire.data import build_federation
from thinwire.methods import get_method
from thinwire.methods.base import ClientState, Reply, RunContext, Workbench
from thinwire.wire import Payload

# label → settings under which the tiny model learns in a few rounds (the method is the label's first word)
SETTINGS = {"fedkseed": [], "fedkseed-pro": [], "ferret": [],
            "ferret sketch": ["method.ferret.basis='sketch'"]}
HISTORY_METHODS = list(SETTINGS)


def _settings(label):
    return [f"method.name='{label.split()[0]}'", *SETTINGS[label]]


def _fresh(config, spec):
    return spec.client(RunContext(config, Workbench(config)))


@pytest.mark.parametrize("method", HISTORY_METHODS)
def test_catch_up_is_bit_identical_to_the_server(smoke_config, method):
    config = smoke_config(*_settings(method), "method.fedkseed.local_steps=6", "data.examples_per_client=8")
    spec = get_method(method.split()[0])
    federation = build_federation(config)
    ctx = RunContext(config, Workbench(config))
    server, shared = spec.server(ctx), spec.client(ctx)
    server.setup()
    states = {cid: ClientState() for cid in range(3)}
    schedule = [[0, 1], [1], [2], [1, 2]]  # client 0 misses rounds 2-4, client 2 misses rounds 1-2
    down_sizes = {}
    for rnd, cids in enumerate(schedule, start=1):
        replies = []
        for cid in cids:
            data = server.download(rnd, cid).encode()
            down_sizes[(rnd, cid)] = len(data)
            upload = shared.fit(rnd, cid, Payload.decode(data), federation.clients[cid], states[cid])
            replies.append(Reply(cid, Payload.decode(upload.payload.encode()), upload.num_examples))
        server.aggregate(rnd, replies)

    # a client that never took part rebuilds the current global model from the downlink alone
    private = _fresh(config, spec)
    data = server.download(len(schedule) + 1, 0).encode()
    private.sync(Payload.decode(data), states[0])
    assert set(private._replica) == set(server.weights)
    for name, weight in server.weights.items():
        assert torch.equal(private._replica[name], weight), name
    # and the shared replica, caught up the same way, is the same model
    shared.sync(Payload.decode(data), ClientState())
    for name, weight in server.weights.items():
        assert torch.equal(shared._replica[name], weight), name
    # catch-up bytes grow with the rounds missed: client 0 missed 3 rounds, client 2 one (round 3 → 4)
    assert len(data) > down_sizes[(4, 2)] > down_sizes[(1, 0)]


@pytest.mark.parametrize("method", HISTORY_METHODS)
def test_end_to_end_reduces_loss_and_counts_bytes(tmp_path, smoke_config, method):
    import json

    from thinwire.runtime.local import run_local

    config = smoke_config(*_settings(method), "federation.rounds=3")
    summary = run_local(config, tmp_path / "r", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - 0.1
    rounds = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert summary["uplink_bytes_total"] == sum(c["uplink_bytes"] for r in rounds for c in r["clients"])
    assert summary["uplink_bytes_per_client_round"] + summary["downlink_bytes_per_client_round"] < 18_000
