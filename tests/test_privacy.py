"""Client-level differential privacy: clipping and noise in each method's update space, the
guarantee's preconditions as usage errors, and ε equal to dp-accounting's own computation."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from thinwire.errors import UsageError
from thinwire.methods.base import Reply
from thinwire.privacy import clip_and_noise, privatize_round, update_view, with_update
from thinwire.runtime.local import run_local
from thinwire.wire import Payload


def test_the_settings_whose_guarantee_would_not_hold_are_usage_errors(smoke_config):
    assert smoke_config("privacy.dp='central'").method.weighting == "equal"  # DP's default
    assert smoke_config().method.weighting == "examples"
    cases = {
        "method.name='fedkseed-pro'": "does not support method 'fedkseed-pro'",
        "method.weighting='examples'": "needs method.weighting = 'equal'",
        "method.aggregation='median'": "needs method.aggregation = 'mean'",
        "method.clip_update_norm=1.0": "needs method.clip_update_norm = 0",
        "method.max_update_norm=5.0": "needs method.max_update_norm = 0",
    }
    for override, message in cases.items():
        with pytest.raises(UsageError, match=message):
            smoke_config("privacy.dp='local'", override)


def test_clip_scales_into_the_ball_and_noise_has_the_stated_std():
    view, norm = clip_and_noise({"a": torch.tensor([3.0, 4.0])}, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert norm == 5.0 and torch.equal(view["a"], torch.tensor([0.6, 0.8]))
    view, norm = clip_and_noise({"a": torch.tensor([0.3, 0.4])}, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(view["a"], torch.tensor([0.3, 0.4]))  # inside the ball: untouched
    noisy, _ = clip_and_noise({"a": torch.zeros(200_000)}, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert float(noisy["a"].std()) == pytest.approx(0.5, rel=0.01)


def test_ferret_coordinates_are_padded_to_k_max_and_round_trip():
    from thinwire.compress.projection import pack, unpack

    coords = [torch.tensor([1.0, -2.0]), torch.zeros(0), torch.tensor([0.5, 0.25, 4.0])]
    values, counts = pack(coords, torch.float16)
    payload = Payload(tensors={"values": values, "counts": counts}, scalars={"basis_round": 3})
    view = update_view("ferret", payload, k_max=4)
    assert [v.tolist() for v in view.values()] == [[1, -2, 0, 0], [0, 0, 0, 0], [0.5, 0.25, 4, 0]]
    back = with_update("ferret", payload, view, torch.float16)
    assert back.tensors["counts"].tolist() == [4, 4, 4] and back.scalars == {"basis_round": 3}
    assert [c.tolist() for c in unpack(back.tensors["values"], back.tensors["counts"])] == \
           [v.tolist() for v in view.values()]


def test_central_noise_shares_add_up_to_the_noise_on_the_sum(smoke_config):
    """r replies of zero updates: the mean of their noised shares has std z·C / r."""
    config = smoke_config("method.name='fedavg'", "privacy.dp='central'", "privacy.clip_norm=2.0",
                          "privacy.noise_multiplier=1.5")
    replies = [Reply(cid, Payload(tensors={"w": torch.zeros(100_000)}), 1, {}) for cid in range(4)]
    noised, metrics = privatize_round(config, 1, replies)
    mean = sum(r.payload.tensors["w"] for r in noised) / len(noised)
    assert float(mean.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert metrics["dp_clipped"] == 0
    # the shares are independent: no two clients draw the same noise
    assert not torch.equal(noised[0].payload.tensors["w"], noised[1].payload.tensors["w"])


def _epsilons(out):
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["epsilon"] for r in rounds], json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["fedavg", "ferret", "fedkseed"])
def test_without_noise_and_clipping_central_dp_is_the_equal_weight_run(tmp_path, smoke_config, method):
    """The DP path (update view, float32 shares, with_update) changes nothing else: with z = 0 and a
    bound no update reaches, the weights are bit-identical to the equal-weight run's."""
    base = (f"method.name='{method}'", "eval.generate=false", "method.weighting='equal'")
    run_local(smoke_config(*base, "method.aggregation='mean'"), tmp_path / "plain", quiet=True)  # DP's rule
    run_local(smoke_config(*base, "privacy.dp='central'", "privacy.clip_norm=1e9"), tmp_path / "dp", quiet=True)
    assert (tmp_path / "plain" / "final_state.safetensors").read_bytes() == \
           (tmp_path / "dp" / "final_state.safetensors").read_bytes()
    epsilons, summary = _epsilons(tmp_path / "dp")
    # metrics.jsonl is strict JSON, which has no Infinity: ε = ∞ is written as null there
    assert epsilons == [None, None] and summary["privacy"]["epsilon"] == math.inf


def test_central_epsilon_is_the_accountants_own(tmp_path, smoke_config):
    config = smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=3",
                          "privacy.dp='central'", "privacy.clip_norm=0.05", "privacy.noise_multiplier=1.2",
                          "privacy.delta=1e-4")
    summary = run_local(config, tmp_path / "run", quiet=True)
    epsilons, _ = _epsilons(tmp_path / "run")
    fed = config.federation
    for rounds, eps in enumerate(epsilons, start=1):
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            fed.clients, fed.clients_per_round, dp_accounting.GaussianDpEvent(1.2 / 2)), rounds)
        assert eps == accountant.get_epsilon(1e-4)
    assert epsilons[0] < epsilons[1] < epsilons[2] == summary["privacy"]["epsilon"]
    assert summary["privacy"]["update_space"] == "weight delta"
    # the noise (z·C = 0.06 on the sum, per weight) moved the model off the noiseless run's path
    run_local(smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=3",
                           "privacy.dp='central'", "privacy.clip_norm=0.05"), tmp_path / "quiet", quiet=True)
    assert (tmp_path / "run" / "final_state.safetensors").read_bytes() != \
           (tmp_path / "quiet" / "final_state.safetensors").read_bytes()


def test_local_dp_noises_every_upload_and_counts_the_busiest_client(tmp_path, smoke_config):
    """Ferret with local DP: each upload carries k_max noised coordinates in every block, and ε
    composes the Gaussian mechanism over the most uploads any one client sent."""
    config = smoke_config("method.name='ferret'", "eval.generate=false", "federation.rounds=3",
                          "privacy.dp='local'", "privacy.clip_norm=1.0", "privacy.noise_multiplier=4.0",
                          "method.ferret.k_max=8")
    run_local(config, tmp_path / "run", quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    uploads: dict[int, int] = {}
    for r in rounds:
        for c in r["clients"]:
            uploads[c["client"]] = uploads.get(c["client"], 0) + 1
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(4.0 / 2), max(uploads.values()))
    epsilons, summary = _epsilons(tmp_path / "run")
    assert summary["privacy"]["epsilon"] == epsilons[-1] == accountant.get_epsilon(1e-5)
    # every block is full and the upload is the same size for every client: k_max float16 per block
    ups = {c["uplink_bytes"] for r in rounds for c in r["clients"]}
    assert len(ups) == 1


def test_fedkseed_sums_become_one_dense_vector_over_the_pool_and_round_trip():
    payload = Payload(tensors={"seeds": torch.tensor([5, 1], dtype=torch.int32),
                               "values": torch.tensor([0.5, -2.0])})
    view = update_view("fedkseed", payload, k_max=0, pool_size=8)
    assert view["sums"].tolist() == [0, -2.0, 0, 0, 0, 0.5, 0, 0]
    back = with_update("fedkseed", payload, view, torch.float32)
    assert back.tensors["seeds"].tolist() == list(range(8)) and torch.equal(back.tensors["values"], view["sums"])


def test_fedkseed_under_local_dp_uploads_the_whole_pool_and_is_accepted(tmp_path, smoke_config):
    """A locally noised FedKSeed upload names every seed of the pool; the server's bounds expect it."""
    config = smoke_config("method.name='fedkseed'", "eval.generate=false", "method.fedkseed.pool_size=64",
                          "method.fedkseed.local_steps=4", "privacy.dp='local'", "privacy.clip_norm=1.0",
                          "privacy.noise_multiplier=2.0")
    run_local(config, tmp_path / "run", quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(not r["rejected"] and r["clients"] for r in rounds)
    ups = {c["uplink_bytes"] for r in rounds for c in r["clients"]}
    assert len(ups) == 1 and ups.pop() >= 64 * 8  # an int32 seed and a float32 sum per pool entry
