import pytest
import torch

from thinwire.config import MethodConfig
from thinwire.methods.aggregate import weighted_mean
from thinwire.methods.base import Reply, client_weights
from thinwire.methods.server_opt import ServerOptimizer, fedexp_scale
from thinwire.wire import Payload


def _reply(n):
    return Reply(client_id=0, payload=Payload(), num_examples=n)


def test_example_and_equal_weights():
    assert client_weights([_reply(1), _reply(3)], "examples") == [0.25, 0.75]
    assert client_weights([_reply(1), _reply(3)], "equal") == [0.5, 0.5]


def test_weighted_mean_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([[0.0]])}
    mean = weighted_mean([a, b], [0.25, 0.75])
    assert torch.allclose(mean["w"], torch.tensor([2.5, -1.0]))
    assert torch.allclose(mean["b"], torch.tensor([[1.0]]))


def test_plain_server_step():
    w = {"w": torch.tensor([1.0, 1.0])}
    assert ServerOptimizer(MethodConfig(server_lr=0.5)).step(w, {"w": torch.tensor([2.0, -4.0])}) == {}
    assert torch.allclose(w["w"], torch.tensor([0.0, 3.0]))


def test_fedavgm_by_hand():
    w = {"w": torch.tensor([0.0])}
    opt = ServerOptimizer(MethodConfig(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5))
    opt.step(w, {"w": torch.tensor([1.0])})  # m = 1, w = -1
    opt.step(w, {"w": torch.tensor([1.0])})  # m = 1.5, w = -2.5
    assert w["w"].item() == pytest.approx(-2.5)


def test_fedadam_by_hand():
    w = {"w": torch.tensor([0.0])}
    cfg = MethodConfig(server_optimizer="fedadam", server_lr=0.1, server_momentum=0.9, server_beta2=0.99,
                       server_tau=1e-3)
    opt = ServerOptimizer(cfg)
    opt.step(w, {"w": torch.tensor([2.0])})
    m, v = 0.1 * 2.0, 0.01 * 4.0
    assert w["w"].item() == pytest.approx(-0.1 * m / (v ** 0.5 + 1e-3))


def test_fedexp_scale_by_hand():
    basis = [{"w": torch.eye(4)[i]} for i in range(4)]
    mean = weighted_mean(basis, [0.25] * 4)  # ‖Δ̄‖² = 4/16, Σ w‖Δ_i‖² = 1
    assert fedexp_scale(basis, [0.25] * 4, mean, 0.0) == pytest.approx(2.0)
    same = [{"w": torch.tensor([3.0, 4.0])}] * 2  # agreeing clients: no extrapolation
    assert fedexp_scale(same, [0.5, 0.5], same[0], 0.0) == 1.0
    opposed = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-0.5])}]  # mean 0.25, spread 0.625
    assert fedexp_scale(opposed, [0.5, 0.5], {"w": torch.tensor([0.25])}, 0.0) == pytest.approx(0.625 / 0.125)


def test_fedexp_step_applies_server_lr_times_scale():
    basis = [{"w": torch.eye(4)[i]} for i in range(4)]
    w = {"w": torch.zeros(4)}
    opt = ServerOptimizer(MethodConfig(server_optimizer="fedexp", server_lr=0.5, server_tau=0.0))
    metrics = opt.step(w, weighted_mean(basis, [0.25] * 4), basis, [0.25] * 4)
    assert metrics == {"server_lr": pytest.approx(1.0)}
    assert torch.allclose(w["w"], torch.full((4,), -0.25))
    with pytest.raises(ValueError, match="clients' updates"):
        opt.step(w, {"w": torch.ones(4)})


def test_fedit_with_fedexp_steps_by_the_scale_of_its_replies(tmp_path, smoke_config, monkeypatch):
    import json

    from thinwire.methods.fedavg import DeltaClient, DeltaServer
    from thinwire.runtime.local import run_local

    seen = []
    original, fit = DeltaServer.aggregate, DeltaClient.fit

    def opposing_fit(self, rnd, cid, download, examples, state):  # client 0 pulls the other way
        upload = fit(self, rnd, cid, download, examples, state)
        if cid == 0:
            upload.payload.tensors = {k: -t for k, t in upload.payload.tensors.items()}
        return upload

    def aggregate(self, rnd, replies):
        updates = [{k: t.clone() for k, t in r.payload.tensors.items()} for r in replies]
        weights = client_weights(replies, self.config.method.weighting)
        seen.append(fedexp_scale(updates, weights, weighted_mean(updates, weights), self.config.method.server_tau))
        return original(self, rnd, replies)

    monkeypatch.setattr(DeltaServer, "aggregate", aggregate)
    monkeypatch.setattr(DeltaClient, "fit", opposing_fit)
    config = smoke_config("method.name='fedit'", "method.server_optimizer='fedexp'", "method.server_lr=0.5",
                          "federation.clients_per_round=3", "eval.generate=false")
    run_local(config, tmp_path / "run", quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["aggregate"]["server_lr"] for r in rounds]
    assert logged == pytest.approx([0.5 * s for s in seen])
    assert len(seen) == 2 and all(s > 1.0 for s in seen)  # the clients disagree: FedExP extrapolates


def test_cgfedllm_paper_sum_refuses_fedexp(tmp_path, smoke_config):
    from thinwire.errors import UsageError
    from thinwire.runtime.local import run_local

    config = smoke_config("method.name='cgfedllm'", "method.cgfedllm.paper_sum=true",
                          "method.server_optimizer='fedexp'")
    with pytest.raises(UsageError, match="paper_sum .* FedExP"):
        run_local(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["ferret", "fedkseed"])
def test_history_methods_refuse_a_server_optimizer(tmp_path, smoke_config, method):
    from thinwire.errors import UsageError
    from thinwire.runtime.local import run_local

    config = smoke_config(f"method.name='{method}'", "method.server_optimizer='fedexp'")
    with pytest.raises(UsageError, match="does not apply to"):
        run_local(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_example_weighting_needs_a_bound_on_the_claims(smoke_config):
    """Example counts are bounded by the partitions the server knows; knowing none, it weights equally
    and says why (an unbounded claim would take all the weight)."""
    from thinwire.methods.base import Reply, RunContext, Workbench
    from thinwire.methods.fedavg import DeltaServer
    from thinwire.wire import Payload

    config = smoke_config()
    replies = [Reply(0, Payload(), 30), Reply(1, Payload(), 10)]
    known = DeltaServer(RunContext(config, Workbench(config), partition_sizes=[30, 10, 20]))
    assert known.example_cap() == 30 and known.aggregation_weights(replies) == [0.75, 0.25]
    blind = DeltaServer(RunContext(config, Workbench(config)))
    assert blind.example_cap() is None and blind.aggregation_weights(replies) == [0.5, 0.5]
    assert len(blind.ctx.warnings) == 1 and "federation.max_examples" in blind.ctx.warnings[0]
    config.federation.max_examples = 25
    assert blind.example_cap() == 25 and blind.aggregation_weights(replies) == [0.75, 0.25]
