"""Client-level differential privacy: clipping and noise in each method's update space, the
guarantee's preconditions as usage errors, ε equal to dp-accounting's own computation over every
release, and the attacks that worked when the noise came from the run seed."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from safetensors.torch import load_file

from thinwire import secret
from thinwire.errors import UsageError
from thinwire.methods.base import ClientState, Reply
from thinwire.privacy import CLIENT_KEY, LEDGER, CentralDP, clip_and_noise, privatize_upload, update_space
from thinwire.runtime.local import resume_local, run_local
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
        "method.name='fedpt'": "distilled on the server one by one",
    }
    for override, message in cases.items():
        with pytest.raises(UsageError, match=message):
            smoke_config("privacy.dp='local'", override)


def test_a_server_step_that_reads_single_updates_is_refused_under_central_dp(smoke_config):
    """FedExP's step reads every client's update: under central DP the released model would depend
    on more than the noised sum. Under local DP it reads noised uploads: post-processing."""
    with pytest.raises(UsageError, match="reads each client's update"):
        smoke_config("privacy.dp='central'", "method.server_optimizer='fedexp'")
    assert smoke_config("privacy.dp='local'", "method.server_optimizer='fedexp'")


KEY = bytes(range(32))


def test_clip_scales_into_the_ball_and_noise_has_the_stated_std():
    view = clip_and_noise({"a": torch.tensor([3.0, 4.0])}, 1.0, 0.0, KEY)
    assert torch.equal(view["a"], torch.tensor([0.6, 0.8]))
    view = clip_and_noise({"a": torch.tensor([0.3, 0.4])}, 1.0, 0.0, KEY)
    assert torch.equal(view["a"], torch.tensor([0.3, 0.4]))  # inside the ball: untouched
    noisy = clip_and_noise({"a": torch.zeros(200_000)}, 1.0, 0.5, KEY)
    assert float(noisy["a"].mean()) == pytest.approx(0.0, abs=0.005)
    assert float(noisy["a"].std()) == pytest.approx(0.5, rel=0.01)
    # a diverged update is the zero vector: what leaves is noise alone, whatever the client's data did
    nan = clip_and_noise({"a": torch.tensor([float("nan"), 1.0]), "b": torch.tensor([1e38])}, 1.0, 0.0, KEY)
    assert nan["a"].tolist() == [0.0, 0.0] and nan["b"].tolist() == [0.0]


def test_secret_normals_are_standard_and_depend_on_key_and_labels():
    z = secret.normal(KEY, (400_000,), "x")
    assert float(z.mean()) == pytest.approx(0.0, abs=0.005) and float(z.std()) == pytest.approx(1.0, rel=0.005)
    assert float((z.abs() > 3).float().mean()) == pytest.approx(0.0027, rel=0.1)  # the Gaussian tail
    assert torch.equal(secret.normal(KEY, (5,), "x"), z[:5])  # a stream: the same key and labels, the same draws
    assert not torch.equal(secret.normal(KEY, (5,), "y"), z[:5])
    assert not torch.equal(secret.normal(bytes(32), (5,), "x"), z[:5])
    assert len(secret.new_key()) == 32 and secret.new_key() != secret.new_key()


def test_ferret_coordinates_are_padded_to_k_max_and_round_trip(smoke_config):
    from thinwire.compress.projection import pack, unpack

    space = update_space(smoke_config("method.name='ferret'", "method.ferret.k_max=4"))
    coords = [torch.tensor([1.0, -2.0]), torch.zeros(0), torch.tensor([0.5, 0.25, 4.0])]
    values, counts = pack(coords, torch.float16)
    payload = Payload(tensors={"values": values, "counts": counts}, scalars={"basis_round": 3})
    view = space.view(payload)
    assert [v.tolist() for v in view.values()] == [[1, -2, 0, 0], [0, 0, 0, 0], [0.5, 0.25, 4, 0]]
    back = space.rebuild(payload, view)
    assert back.tensors["counts"].tolist() == [4, 4, 4] and back.scalars == {"basis_round": 3}
    assert [c.tolist() for c in unpack(back.tensors["values"], back.tensors["counts"])] == \
           [v.tolist() for v in view.values()]


def test_central_noise_shares_add_up_to_the_noise_on_the_sum(smoke_config):
    """r replies of zero updates: the mean of their noised shares has std z·C / r."""
    config = smoke_config("method.name='fedavg'", "privacy.dp='central'", "privacy.clip_norm=2.0",
                          "privacy.noise_multiplier=1.5")
    replies = [Reply(cid, Payload(tensors={"w": torch.zeros(100_000)}), 1, {}) for cid in range(4)]
    noised, metrics = CentralDP(config, KEY).privatize(1, replies, 100_000)
    mean = sum(r.payload.tensors["w"] for r in noised) / len(noised)
    assert float(mean.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    # only public figures: nothing about any client's update (no norms, no clip counts)
    assert metrics == {"dp_dimension": 100_000.0, "dp_noise_to_clip": 1.5 * math.sqrt(100_000) / 4}
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


def _releases(out):
    """client -> downloads the server sent it, from the published round records."""
    counts: dict[int, int] = {}
    for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
        for c in [*r["clients"], *r["failures"], *r["rejected"]]:
            if "downlink_bytes" in c:
                counts[c["client"]] = counts.get(c["client"], 0) + 1
    return counts


def _gaussian_epsilon(z, compositions, delta):
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(z / 2), compositions)
    return accountant.get_epsilon(delta)


def test_central_epsilon_is_the_accountants_own(tmp_path, smoke_config):
    """Each release is a Gaussian mechanism of multiplier z/2 (sensitivity 2C), composed over the
    rounds that sent the most exposed client a download; no amplification by the public sample."""
    config = smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=3",
                          "privacy.dp='central'", "privacy.clip_norm=0.05", "privacy.noise_multiplier=1.2",
                          "privacy.delta=1e-4")
    summary = run_local(config, tmp_path / "run", quiet=True)
    epsilons, _ = _epsilons(tmp_path / "run")
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen: dict[int, int] = {}
    for r, eps in zip(rounds, epsilons):
        for c in r["clients"]:
            seen[c["client"]] = seen.get(c["client"], 0) + 1
        assert eps == _gaussian_epsilon(1.2, max(seen.values()), 1e-4)
    assert summary["privacy"]["epsilon"] == epsilons[-1] and summary["privacy"]["releases_max"] == max(seen.values())
    assert summary["privacy"]["update_space"] == "weight delta"
    # no per-client figure is published: neither the clients' reports nor the norms DP saw
    for r in rounds:
        assert r["train_loss"] is None and set(r["aggregate"]) & {"dp_clipped", "dp_update_norm_median"} == set()
        assert all(c["metrics"] == {} and c["examples"] is None for c in r["clients"])
    # the noise (z·C = 0.06 on the sum, per weight) moved the model off the noiseless run's path
    run_local(smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=3",
                           "privacy.dp='central'", "privacy.clip_norm=0.05"), tmp_path / "quiet", quiet=True)
    assert (tmp_path / "run" / "final_state.safetensors").read_bytes() != \
           (tmp_path / "quiet" / "final_state.safetensors").read_bytes()


def test_the_published_files_do_not_determine_the_noise(tmp_path, smoke_config):
    """The attack of the last round: with the noise drawn from the run seed, anyone holding
    config.toml could regenerate and subtract it. Now two runs of one config and seed draw
    different noise, and the key is nowhere in the published files."""
    config = smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=1",
                          "privacy.dp='central'", "privacy.clip_norm=0.05", "privacy.noise_multiplier=1.0")
    for name in ("a", "b"):
        run_local(config, tmp_path / name, quiet=True)
    first, second = (load_file(tmp_path / name / "final_state.safetensors") for name in ("a", "b"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    published = b"".join(p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert b"server_key" not in published and not (tmp_path / "a" / "checkpoint").exists()


def test_local_dp_noises_every_upload_and_counts_the_busiest_client(tmp_path, smoke_config):
    """Ferret with local DP: each upload carries k_max noised coordinates in every block, and ε
    composes the Gaussian mechanism over the most downloads any one client was sent."""
    config = smoke_config("method.name='ferret'", "eval.generate=false", "federation.rounds=3",
                          "privacy.dp='local'", "privacy.clip_norm=1.0", "privacy.noise_multiplier=4.0",
                          "method.ferret.k_max=8")
    run_local(config, tmp_path / "run", quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epsilons, summary = _epsilons(tmp_path / "run")
    expected = _gaussian_epsilon(4.0, max(_releases(tmp_path / "run").values()), 1e-5)
    assert summary["privacy"]["epsilon"] == epsilons[-1] == expected
    # every block is full and the upload is the same size for every client: k_max float16 per block
    ups = {c["uplink_bytes"] for r in rounds for c in r["clients"]}
    assert len(ups) == 1


def test_a_client_keeps_its_own_noise_key_and_the_server_cannot_rebuild_it(smoke_config):
    config = smoke_config("method.name='fedavg'", "privacy.dp='local'", "privacy.noise_multiplier=1.0")
    update = Payload(tensors={"w": torch.zeros(1000)})
    state, other = ClientState(), ClientState()
    first = privatize_upload(config, 1, update, state)
    assert state.tensors[CLIENT_KEY].numel() == 32  # 256 bits of OS entropy, made on the first upload
    assert torch.equal(privatize_upload(config, 1, update, state).tensors["w"], first.tensors["w"])  # resumable
    assert not torch.equal(privatize_upload(config, 2, update, state).tensors["w"], first.tensors["w"])
    assert not torch.equal(privatize_upload(config, 1, update, other).tensors["w"], first.tensors["w"])


def test_a_resumed_local_dp_run_counts_the_uploads_of_the_round_it_lost(tmp_path, smoke_config, monkeypatch):
    """Round 2's clients uploaded, then the server died before its checkpoint: the rerun of round 2
    draws fresh noise, so both uploads count. The ledger was written before the downloads left."""
    from conftest import crash_in_round

    config = smoke_config("method.name='fedavg'", "eval.generate=false", "federation.rounds=3",
                          "privacy.dp='local'", "privacy.clip_norm=1.0", "privacy.noise_multiplier=2.0")
    restore = crash_in_round(monkeypatch, "fedavg", 2, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_local(config, tmp_path / "run", quiet=True)
    restore()
    summary = resume_local(tmp_path / "run", quiet=True)
    published = _releases(tmp_path / "run")  # rounds 1, 2 (rerun) and 3: the lost round is not in them
    ledger = [json.loads(line) for line in (tmp_path / "run" / LEDGER).read_text().splitlines()]
    assert [(e["round"], e["attempt"]) for e in ledger] == [(1, 0), (2, 0), (2, 0), (3, 0)]
    spent: dict[int, int] = {}
    for entry in ledger:
        for cid in entry["clients"]:
            spent[cid] = spent.get(cid, 0) + 1
    assert sum(spent.values()) == sum(published.values()) + len(ledger[1]["clients"])
    assert summary["privacy"]["epsilon"] == _gaussian_epsilon(2.0, max(spent.values()), 1e-5)
    assert summary["privacy"]["epsilon"] > _gaussian_epsilon(2.0, max(published.values()), 1e-5)


def test_a_diverged_client_is_not_singled_out_under_central_dp(tmp_path, smoke_config, monkeypatch):
    """A NaN update (and a NaN training loss) is neither rejected nor logged: the round aggregates
    it as the zero update, so the records cannot tell which client's data made training diverge."""
    from thinwire.methods import get_method

    client_cls = get_method("fedavg").client
    fit = client_cls.fit

    def diverging(self, rnd, cid, *args, **kwargs):
        upload = fit(self, rnd, cid, *args, **kwargs)
        if cid == 1:
            upload.payload.tensors = {k: torch.full_like(t, float("nan")) for k, t in upload.payload.tensors.items()}
            upload.metrics["train_loss"] = float("nan")
        return upload

    monkeypatch.setattr(client_cls, "fit", diverging)
    config = smoke_config("method.name='fedavg'", "eval.generate=false", "federation.clients_per_round=3",
                          "privacy.dp='central'", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5")
    summary = run_local(config, tmp_path / "run", quiet=True)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients_ok"] == 3 and not r["rejected"] for r in rounds)
    assert math.isfinite(summary["final_eval"]["loss"])


def test_fedkseed_sums_become_one_dense_vector_over_the_pool_and_round_trip(smoke_config):
    space = update_space(smoke_config("method.name='fedkseed'", "method.fedkseed.pool_size=8"))
    payload = Payload(tensors={"seeds": torch.tensor([5, 1], dtype=torch.int32),
                               "values": torch.tensor([0.5, -2.0])})
    view = space.view(payload)
    assert view["sums"].tolist() == [0, -2.0, 0, 0, 0, 0.5, 0, 0]
    back = space.rebuild(payload, view)
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
