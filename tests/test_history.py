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


@pytest.mark.parametrize("method", ["fedkseed", "fedkseed-pro"])
def test_fedkseed_catch_up_never_exceeds_the_k_accumulated_scalars(smoke_config, method):
    """A small pool (K = 8) and 6 steps per client: two missed rounds already carry more than K
    scalars, so the download becomes the K float64 sums, and the client lands on the server's
    model up to float32 rounding (from the base model, and from a shared replica ahead of it)."""
    from thinwire.methods.fedkseed import MERGED

    config = smoke_config(f"method.name='{method}'", "method.fedkseed.pool_size=8", "method.fedkseed.local_steps=6",
                          "data.examples_per_client=8")
    spec = get_method(method)
    federation = build_federation(config)
    ctx = RunContext(config, Workbench(config))
    server, shared = spec.server(ctx), spec.client(ctx)
    server.setup()
    states = {cid: ClientState() for cid in range(3)}
    for rnd, cids in enumerate([[1, 2], [1], [2], [2]], start=1):
        replies = []
        for cid in cids:
            upload = shared.fit(rnd, cid, Payload.decode(server.download(rnd, cid).encode()),
                                federation.clients[cid], states[cid])
            replies.append(Reply(cid, Payload.decode(upload.payload.encode()), upload.num_examples))
        server.aggregate(rnd, replies)
    nested_bytes = sum(t.numel() * t.element_size() for u in server.history for t in u.tensors.values())
    download = server.download(5, 0)  # client 0 never took part: 4 rounds to catch up
    assert set(download.tensors) - {"probabilities"} == {MERGED} and nested_bytes > 8 * 8
    probabilities = 2 * 8 if method == "fedkseed-pro" else 0  # FedKSeed-Pro's float16 sampling law
    assert sum(t.numel() * t.element_size() for t in download.tensors.values()) == 8 * 8 + probabilities
    ahead = server.download(5, 1)  # client 1 synced at version 1; the shared replica is at 3, the server at 4
    assert shared._replica_version == 3 and MERGED in ahead.tensors
    base = dict(Workbench(config).model.named_parameters())
    assert any(not torch.equal(weight, base[name]) for name, weight in server.weights.items())
    for client, data in ((_fresh(config, spec), download), (shared, ahead)):
        client.sync(Payload.decode(data.encode()), ClientState())
        for name, weight in server.weights.items():
            assert torch.allclose(client._replica[name], weight, rtol=1e-6, atol=1e-6), name


@pytest.mark.parametrize("method", ["ferret", "fedkseed", "fedkseed-pro"])
def test_compact_methods_bound_uploads_by_what_they_can_send(first_upload, method):
    """Every honest upload fits the method's bound, and the bound is far below FedAvg's generic one."""
    server, payload, _ = first_upload(f"method.name='{method}'", "method.fedkseed.local_steps=6",
                                      "data.examples_per_client=8")
    sent = sum(t.numel() * t.element_size() for t in payload.tensors.values())
    assert 0 < sent <= server.max_upload_bytes() < server.trainable_parameters()


def test_fedkseed_pro_refuses_step_records_that_do_not_add_up(first_upload):
    from thinwire.wire import PayloadError

    server, honest, examples = first_upload("method.name='fedkseed-pro'", "method.fedkseed.local_steps=6",
                                            "data.examples_per_client=8")
    server.validate(Reply(0, honest, examples))
    skewed = dict(honest.tensors, step_g=honest.tensors["step_g"] * torch.tensor([100.0] + [1.0] * 5))
    with pytest.raises(PayloadError, match="do not add up"):
        server.validate(Reply(0, Payload(tensors=skewed, scalars=honest.scalars), examples))


@pytest.mark.parametrize(("method", "own_key"), [("ferret", "method.ferret.server_lr"),
                                                 ("fedkseed", "method.fedkseed.global_lr_scale"),
                                                 ("fedkseed-pro", "method.fedkseed.global_lr_scale")])
def test_server_lr_names_the_methods_own_server_step(smoke_config, method, own_key):
    """`method.server_lr` is the server optimizer's step; these methods size theirs with their own key."""
    from thinwire.errors import UsageError

    config = smoke_config(f"method.name='{method}'", "method.server_lr=0.5")
    with pytest.raises(UsageError, match=own_key.replace(".", r"\.")):
        get_method(method).server(RunContext(config, Workbench(config))).setup()


@pytest.mark.parametrize(("method", "own_key", "attribute"), [
    ("ferret", "method.ferret.server_lr=0.25", lambda server: server.server_lr(1)),
    ("fedkseed", "method.fedkseed.global_lr_scale=0.25", lambda server: server.step_lr() / server.options.lr)])
def test_the_methods_own_server_step_applies(smoke_config, method, own_key, attribute):
    config = smoke_config(f"method.name='{method}'", own_key)
    server = get_method(method).server(RunContext(config, Workbench(config)))
    server.setup()
    assert attribute(server) == pytest.approx(0.25)
