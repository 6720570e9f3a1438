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


# --- bounded-mean, the default: the adaptive bound and the round commit ---------------------------


def test_adaptive_bound_by_hand():
    from thinwire.methods.robust import adaptive_bound

    assert adaptive_bound([1.0, 100.0, 2.0], 3.0) == 6.0  # the median of three
    assert adaptive_bound([4.0, 1e30], 3.0) == 12.0  # of two: the smaller, so one cannot raise it
    assert adaptive_bound([5.0, 1.0, 1e9, 2.0], 2.0) == 4.0  # the lower of the two middle values
    assert adaptive_bound([], 3.0) == 0.0


def test_the_default_aggregation_resolves_per_run(smoke_config):
    """bounded-mean without privacy; the plain mean where DP or SecAgg needs it (check_privacy)."""
    assert smoke_config().method.aggregation == "bounded-mean"
    assert smoke_config("privacy.dp='central'").method.aggregation == "mean"
    assert smoke_config("privacy.dp='local'").method.aggregation == "mean"
    assert smoke_config("privacy.secagg=true").method.aggregation == "mean"
    assert smoke_config("method.aggregation='mean'").method.aggregation == "mean"


def _fedavg_replies(first_upload, *extra):
    server, payload, n = first_upload("method.name='fedavg'", "method.weighting='equal'", *extra)
    honest = [Reply(cid, Payload(tensors={k: t * (1 + cid / 10) for k, t in payload.tensors.items()}), n)
              for cid in range(3)]
    return server, honest


def test_bounded_mean_clips_only_beyond_the_bound(first_upload):
    server, replies = _fedavg_replies(first_upload)
    replies[1] = Reply(1, Payload(tensors={k: t * 50 for k, t in replies[1].payload.tensors.items()}), 8)
    norms = server.bound_round(replies)
    assert server.round_norm_bound == pytest.approx(3 * norms[2])  # the median norm: client 2's (×1.2)
    assert [server.clip_factor(r) for r in (replies[0], replies[2])] == [1.0, 1.0]
    assert server.clip_factor(replies[1]) == pytest.approx(server.round_norm_bound / norms[1])
    server.round_norm_bound = 0.0  # a round whose median update is zero: everything clips to nothing
    assert server.clip_factor(replies[0]) == 0.0


@pytest.mark.parametrize("rule", ["bounded-mean", "mean"])
def test_commit_drops_what_poisons_the_model_and_reraises_a_fault(first_upload, rule):
    from thinwire.runtime.commit import commit_round

    server, replies = _fedavg_replies(first_upload, f"method.aggregation='{rule}'")
    before = {k: t.clone() for k, t in server.weights.items()}
    poisoned = Payload(tensors={k: t.clone() for k, t in replies[1].payload.tensors.items()})
    next(iter(poisoned.tensors.values())).view(-1)[0] = float("inf")
    committed = commit_round(server, 1, [replies[0], Reply(1, poisoned, 8), replies[2]])
    assert [d["client"] for d in committed.dropped] == [1] and "non-finite" in committed.dropped[0]["reason"]
    assert [r.client_id for r in committed.replies] == [0, 2]
    fresh, _ = _fedavg_replies(first_upload, f"method.aggregation='{rule}'")
    fresh.weights = before
    fresh.bound_round([replies[0], replies[2]])
    fresh.aggregate(1, [replies[0], replies[2]])
    assert all(torch.equal(server.weights[k], fresh.weights[k]) for k in before)

    def power_cut(rnd, replies):
        raise RuntimeError("power cut")

    server.aggregate = power_cut
    with pytest.raises(RuntimeError, match="power cut"):
        commit_round(server, 2, replies)


def test_extreme_values_and_claims_fail_validation(first_upload):
    from thinwire.methods.validate import check_magnitude, check_metric
    from thinwire.wire import PayloadError

    check_magnitude(Payload(tensors={"v": torch.tensor([1e6, -1e6])}, scalars={"x": 2.0}), 1e6)
    with pytest.raises(PayloadError, match="max_update_value"):
        check_magnitude(Payload(tensors={"v": torch.tensor([0.0, -3e38])}), 1e6)
    with pytest.raises(PayloadError, match="scalar 'x'"):
        check_magnitude(Payload(scalars={"x": 1e38}), 1e6)
    check_magnitude(Payload(tensors={"v": torch.tensor([1e30])}), 0)  # 0: off
    check_metric("train_loss", 4.5)
    check_metric("clientapp_age_s", -1.0)
    for key, value in [("train_loss", 1e300), ("import_s", -5.0), ("setup_s", 1e9), ("tokens", float("nan"))]:
        with pytest.raises(PayloadError):
            check_metric(key, value)
