"""Reliability: failing and straggling clients, too few replies, hostile updates, robust
aggregation, checkpoint and resume (in process and after SIGKILL), bad input at the CLI."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thinwire.cli import main
from thinwire.errors import UsageError
from thinwire.methods import get_method, robust
from thinwire.methods.base import Upload
from thinwire.methods.fedavg import DeltaClient, DeltaServer
from conftest import crash_in_round
from thinwire.runtime.engine import sample_clients, simulated_faults
from thinwire.runtime.local import resume_local, run_local
from thinwire.runtime.rundir import LOCK_FILE, hold
from thinwire.runtime.upload import stamp
from thinwire.wire import Payload

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "smoke.toml"
# per method: settings under which the tiny model learns in a few rounds (as in test_history.py)
LEARNS = {"fedavg": [], "fedit": ["train.lr=5e-2"], "ferret": [], "fedkseed": []}
TIMING = {"time_s", "wall_s", "peak_rss_mb", "train_s"}


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(value):
    """A run's records without wall-clock figures."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def assert_same_run(a: Path, b: Path):
    assert (a / "final_state.safetensors").read_bytes() == (b / "final_state.safetensors").read_bytes()
    assert _strip(_rounds(a)) == _strip(_rounds(b))
    assert _strip(json.loads((a / "summary.json").read_text())) == _strip(json.loads((b / "summary.json").read_text()))
    assert sorted(p.name for p in b.iterdir()) == ["config.toml", "final_state.safetensors", "metrics.jsonl",
                                                  "predictions.jsonl", "summary.json"]
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()


def _gain(summary):
    return summary["base_eval"]["loss"] - summary["final_eval"]["loss"]


# --- client faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedavg", "fedit", "ferret", "fedkseed"])
def test_runs_complete_with_failing_clients(tmp_path, smoke_config, method):
    base = [f"method.name='{method}'", "federation.rounds=3", "federation.clients_per_round=3",
            "federation.seed=1", "eval.generate=false", "method.fedkseed.local_steps=24", *LEARNS[method]]
    clean = run_local(smoke_config(*base), tmp_path / "clean", quiet=True)
    faulty = run_local(smoke_config(*base, "federation.failure_rate=0.3"), tmp_path / "faulty", quiet=True)
    rounds = _rounds(tmp_path / "faulty")
    failures = [f for r in rounds for f in r["failures"]]
    assert failures and all(f["reason"] == "simulated failure (federation.failure_rate)" for f in failures)
    assert faulty["failures_total"] == len(failures)
    for r in rounds:
        failed = {f["client"] for f in r["failures"]}
        assert {c["client"] for c in r["clients"]}.isdisjoint(failed)
        assert r["clients_ok"] + len(failed) == r["clients_sampled"]
    assert _gain(faulty) > 0
    print(f"\n{method}: loss gain fault-free {_gain(clean):.3f}, failure_rate=0.3 {_gain(faulty):.3f} "
          f"({_gain(faulty) / _gain(clean):.0%} of fault-free; {len(failures)} of 9 client-rounds failed)")


def test_an_upload_that_breaks_validation_costs_only_its_sender(tmp_path, smoke_config, monkeypatch):
    """Validation that fails in an unforeseen way (not a PayloadError) rejects that client, not the round."""
    from thinwire.methods.fedavg import DeltaServer

    original = DeltaServer.check_update

    def check_update(self, reply):
        if reply.client_id == 1:
            int("not a number")  # a method check tripping over hostile content
        original(self, reply)

    monkeypatch.setattr(DeltaServer, "check_update", check_update)
    config = smoke_config("federation.rounds=1", "federation.clients_per_round=3", "eval.generate=false")
    run_local(config, tmp_path / "run", quiet=True)
    (first,) = _rounds(tmp_path / "run")
    assert [r["client"] for r in first["rejected"]] == [1]
    assert first["rejected"][0]["reason"].startswith("ValueError: invalid literal for int()")
    assert [c["client"] for c in first["clients"]] == [0, 2]


def test_faults_are_seeded_per_round(smoke_config):
    config = smoke_config("federation.failure_rate=0.4", "federation.straggler_rate=0.3",
                          "federation.clients=10", "federation.clients_per_round=10")
    draws = [simulated_faults(config, r, sample_clients(config, r)) for r in range(1, 200)]
    assert draws == [simulated_faults(config, r, sample_clients(config, r)) for r in range(1, 200)]
    kinds = [k for d in draws for k in d.values()]
    assert abs(kinds.count("failure") / (199 * 10) - 0.4) < 0.03
    assert abs(kinds.count("straggler") / (199 * 10) - 0.6 * 0.3) < 0.03
    assert sample_clients(config, 3, 1) == sorted(sample_clients(config, 3, 1))  # retries draw their own sample


def test_a_crashing_client_costs_only_its_update_and_keeps_its_state(tmp_path, smoke_config, monkeypatch):
    seen = []
    original = DeltaClient.fit

    def fit(self, rnd, cid, download, examples, state):
        seen.append((rnd, cid, dict(state.scalars)))
        upload = original(self, rnd, cid, download, examples, state)
        state.scalars["rounds_done"] = state.scalars.get("rounds_done", 0) + 1
        if cid == 1 and rnd == 1:
            state.scalars["half_updated"] = 1
            raise RuntimeError("disk full on client 1")
        return upload

    monkeypatch.setattr(DeltaClient, "fit", fit)
    config = smoke_config("federation.rounds=2", "federation.clients_per_round=3", "eval.generate=false")
    run_local(config, tmp_path / "run", quiet=True)
    first, second = _rounds(tmp_path / "run")
    assert first["failures"] == [{"client": 1, "downlink_bytes": first["clients"][0]["downlink_bytes"],
                                  "reason": "RuntimeError: disk full on client 1"}]
    assert [c["client"] for c in first["clients"]] == [0, 2] and second["clients_ok"] == 3
    # the failed fit's changes to its state were thrown away; the others' were kept
    states_in_round_2 = {cid: s for rnd, cid, s in seen if rnd == 2}
    assert states_in_round_2 == {0: {"rounds_done": 1}, 1: {}, 2: {"rounds_done": 1}}


@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_too_few_replies_skip_or_retry(tmp_path, smoke_config, policy):
    config = smoke_config("federation.failure_rate=0.6", "federation.min_replies=2", "federation.rounds=4",
                          f"federation.on_too_few='{policy}'", "federation.max_retries=3", "eval.generate=false",
                          "train.local_steps=2")
    summary = run_local(config, tmp_path / "run", quiet=True)
    rounds = _rounds(tmp_path / "run")
    for r in rounds:
        assert r["skipped"] == (r["clients_ok"] < 2)
        if r["skipped"]:
            assert r["aggregate"] == {} and r["clients"] == []
    if policy == "skip":
        assert any(r["skipped"] for r in rounds) and summary["skipped_rounds"] > 0
        assert all(r["retries"] == 0 for r in rounds)
    else:
        assert summary["retries_total"] > 0
        assert all(r["retries"] <= 3 for r in rounds)
        assert all(r["skipped"] == (r["retries"] == 3 and r["clients_ok"] < 2) for r in rounds)


def test_stragglers_simulated_and_real(tmp_path, smoke_config):
    config = smoke_config("federation.straggler_rate=0.5", "federation.rounds=3", "eval.generate=false",
                          "train.local_steps=2")
    run_local(config, tmp_path / "sim", quiet=True)
    late = [f for r in _rounds(tmp_path / "sim") for f in r["failures"]]
    assert late and all("simulated straggler" in f["reason"] and f["downlink_bytes"] > 0 for f in late)
    # a deadline nobody meets: every round is skipped and the global model never moves
    config = smoke_config("federation.round_timeout_s=0.001", "eval.generate=false", "train.local_steps=2")
    summary = run_local(config, tmp_path / "real", quiet=True)
    rounds = _rounds(tmp_path / "real")
    assert all(r["skipped"] and r["clients_ok"] == 0 for r in rounds)
    assert all("no reply within 0.001 s" in f["reason"] for r in rounds for f in r["failures"])
    assert summary["final_eval"] == summary["base_eval"]


def test_a_client_whose_fit_never_returns_costs_its_update_not_the_run(tmp_path, smoke_config, monkeypatch):
    """In process, the deadline holds even when fit blocks forever: the client is abandoned after
    the deadline and a grace, the round aggregates the others, and the next round runs."""
    import threading

    from thinwire.runtime.local import grace_s

    release = threading.Event()
    original = DeltaClient.fit

    def fit(self, rnd, cid, *args):
        if (rnd, cid) == (1, hung):
            release.wait()  # never returns while the run lasts
            raise RuntimeError("released after the run")
        return original(self, rnd, cid, *args)

    monkeypatch.setattr(DeltaClient, "fit", fit)
    config = smoke_config("federation.round_timeout_s=0.5", "eval.generate=false", "train.local_steps=2")
    hung = sample_clients(config, 1)[0]
    try:
        run_local(config, tmp_path / "run", quiet=True)  # before the fix: never returns
    finally:
        release.set()
    first, second = _rounds(tmp_path / "run")
    assert [f["client"] for f in first["failures"]] == [hung]
    assert f"within a further {grace_s(0.5):g} s: abandoned" in first["failures"][0]["reason"]
    assert first["clients_ok"] == 1 and not first["skipped"]
    assert second["clients_ok"] == 2 and not second["failures"]


def test_a_client_past_the_deadline_stops_at_its_next_step(tmp_path, smoke_config, monkeypatch):
    """A client still training at the deadline is stopped at its next step (within the grace),
    not awaited to the end of its local steps."""
    from thinwire.train import first_order

    original = first_order.train_local
    steps = []

    def slow(model, params, batches, train, on_step=None):
        def stepping():
            steps.append(1)
            time.sleep(0.2)
            on_step()
        return original(model, params, batches, train, stepping)

    monkeypatch.setattr("thinwire.methods.base.train_local", slow)
    config = smoke_config("federation.round_timeout_s=0.3", "eval.generate=false", "train.local_steps=200",
                          "federation.rounds=1")
    run_local(config, tmp_path / "run", quiet=True)
    (first,) = _rounds(tmp_path / "run")
    assert first["skipped"] and len(first["failures"]) == 2
    assert all(re.fullmatch(r"no reply within 0.3 s \(stopped at \d+\.\d s\)", f["reason"]) for f in first["failures"])
    assert len(steps) < 2 * 200 // 4  # each stopped a few steps past its deadline, far from its 200


def test_every_byte_sent_is_counted_whatever_became_of_the_client(tmp_path, smoke_config, monkeypatch):
    """Failures, stragglers, a crash, rejected uploads and retried rounds: each round's traffic is
    exactly the sum of the payloads encoded for it (every attempt), the accepted figures are the
    aggregated clients' alone, and the summary's totals and per-client-round figures follow."""
    spec = get_method("fedavg")
    download, fit = spec.server.download, spec.client.fit
    sent = {"down": {}, "up": {}}  # round -> encoded sizes

    def counted_download(self, rnd, cid):
        payload = download(self, rnd, cid)
        sent["down"].setdefault(rnd, []).append(len(payload.encode()))
        return payload

    def counted_fit(self, rnd, cid, *args):
        if (rnd, cid) == (2, sample_clients(config, 2)[0]):
            raise RuntimeError("client crashed")
        upload = fit(self, rnd, cid, *args)
        if cid == 0:  # every upload of client 0 is rejected
            upload = Upload(_hostile(upload.payload, "fedavg", "nan"), upload.num_examples, upload.metrics)
        stamped = Payload(tensors=upload.payload.tensors, scalars=stamp(upload.payload.scalars, rnd, cid))
        sent["up"].setdefault(rnd, []).append(len(stamped.encode()))
        return upload

    monkeypatch.setattr(spec.server, "download", counted_download)
    monkeypatch.setattr(spec.client, "fit", counted_fit)
    config = smoke_config("federation.failure_rate=0.25", "federation.straggler_rate=0.25", "federation.rounds=4",
                          "federation.clients=4", "federation.clients_per_round=3", "federation.min_replies=2",
                          "federation.on_too_few='retry'", "federation.max_retries=2", "federation.seed=3",
                          "eval.generate=false", "train.local_steps=1")
    summary = run_local(config, tmp_path / "run", quiet=True)
    rounds = _rounds(tmp_path / "run")
    reasons = " ".join(f["reason"] for r in rounds for f in r["failures"])
    for kind in ("simulated failure", "simulated straggler", "client crashed", "reply discarded"):
        assert kind in reasons, kind  # the seed above exercises every fault
    assert any(r["rejected"] for r in rounds) and summary["retries_total"] > 0
    for r in rounds:
        assert r["downlink_bytes"] == sum(sent["down"].get(r["round"], []))
        assert r["uplink_bytes"] == sum(sent["up"].get(r["round"], []))
        assert r["clients_contacted"] == len(sent["down"].get(r["round"], []))
        assert r["uplink_bytes_accepted"] == sum(c["uplink_bytes"] for c in r["clients"])
        assert r["downlink_bytes_accepted"] == sum(c["downlink_bytes"] for c in r["clients"])
    everything = {d: sum(sum(sizes) for sizes in sent[d].values()) for d in ("down", "up")}
    assert summary["downlink_bytes_total"] == everything["down"] > summary["downlink_bytes_accepted_total"]
    assert summary["uplink_bytes_total"] == everything["up"] > summary["uplink_bytes_accepted_total"]
    assert summary["uplink_bytes_accepted_total"] == sum(r["uplink_bytes_accepted"] for r in rounds)
    downloads = sum(len(sizes) for sizes in sent["down"].values())
    assert summary["client_rounds"] == downloads
    assert summary["client_rounds_accepted"] == sum(r["clients_ok"] for r in rounds)
    assert summary["downlink_bytes_per_client_round"] == everything["down"] / downloads
    assert summary["uplink_bytes_per_client_round"] == everything["up"] / downloads
    assert summary["uplink_bytes_per_accepted_client_round"] == \
        summary["uplink_bytes_accepted_total"] / summary["client_rounds_accepted"]


# --- hostile updates ---------------------------------------------------------------------------


def _hostile(payload: Payload, method: str, kind: str) -> Payload:
    tensors = {k: t.clone() for k, t in payload.tensors.items()}
    key = {"fedavg": sorted(tensors)[0], "ferret": "values", "fedkseed": "values"}[method]
    if kind == "nan":
        tensors[key].view(-1)[0] = float("nan")
    elif kind == "huge":  # ×1000 on Ferret's float16 coordinates stays finite
        tensors[key] = tensors[key] * (1e3 if method == "ferret" else 1e4)
    elif kind == "index":
        if method == "ferret":
            tensors["counts"][0] += 1
        elif method == "fedkseed":
            tensors["seeds"][0] = 10**6
        else:
            tensors[key] = tensors[key][:1]
    return Payload(tensors=tensors, scalars=dict(payload.scalars))


@pytest.mark.parametrize("method", ["fedavg", "ferret", "fedkseed"])
def test_hostile_updates_are_rejected_and_never_touch_the_model(tmp_path, smoke_config, monkeypatch, method):
    """Client 0 sends a NaN, a huge (×10³ or ×10⁴) and a malformed update; the run ends exactly as
    if client 0 had crashed every round (rejected = absent)."""
    spec = get_method(method)
    original = spec.client.fit
    mode = {"value": "hostile"}

    def fit(self, rnd, cid, download, examples, state):
        upload = original(self, rnd, cid, download, examples, state)
        if cid != 0:
            return upload
        if mode["value"] == "crash":
            raise RuntimeError("client 0 is down")
        kind = ["nan", "huge", "index"][(rnd - 1) % 3]
        return Upload(_hostile(upload.payload, method, kind), upload.num_examples, upload.metrics)

    monkeypatch.setattr(spec.client, "fit", fit)
    base = [f"method.name='{method}'", "federation.rounds=3", "federation.clients_per_round=3",
            "eval.generate=false", "method.fedkseed.local_steps=10", *LEARNS[method]]
    # a norm bound well above honest updates (measured on this config: ~3.7, ~62, 5-25) and far below
    # the huge ones
    bound = {"fedavg": 50.0, "ferret": 200.0, "fedkseed": 1000.0}[method]
    run_local(smoke_config(*base, f"method.max_update_norm={bound}"), tmp_path / "hostile", quiet=True)
    rounds = _rounds(tmp_path / "hostile")
    reasons = [r["rejected"][0]["reason"] for r in rounds]
    assert all(len(r["rejected"]) == 1 and r["rejected"][0]["client"] == 0 for r in rounds)
    assert "non-finite" in reasons[0] and "exceeds method.max_update_norm" in reasons[1]
    assert any(word in reasons[2] for word in ("shape", "add up", "outside"))
    mode["value"] = "crash"
    run_local(smoke_config(*base, f"method.max_update_norm={bound}"), tmp_path / "absent", quiet=True)
    assert (tmp_path / "hostile/final_state.safetensors").read_bytes() == \
        (tmp_path / "absent/final_state.safetensors").read_bytes()


# --- robust aggregation ------------------------------------------------------------------------


def test_robust_rules_by_hand():
    stack = torch.tensor([[1.0, -2.0], [3.0, 100.0], [2.0, 0.0], [-50.0, 1.0]])
    assert robust.reduce_stack(stack, "median").tolist() == [1.5, 0.5]
    assert robust.reduce_stack(stack[:3], "median").tolist() == [2.0, 0.0]
    assert robust.trim_count(4, 0.2) == 1 and robust.trim_count(10, 0.2) == 2 and robust.trim_count(2, 0.4) == 0
    assert robust.reduce_stack(stack, "trimmed-mean", 0.2).tolist() == [1.5, 0.5]
    assert robust.reduce_stack(stack, "trimmed-mean", 0.0).tolist() == [-11.0, 24.75]
    ragged = robust.combine_ragged([[torch.tensor([1.0, 2.0]), torch.zeros(0)], [torch.tensor([3.0]), torch.zeros(0)],
                                    [torch.tensor([5.0, 4.0, 7.0]), torch.tensor([1.0])]], "median")
    assert [t.tolist() for t in ragged] == [[3.0, 2.0, 0.0], [0.0]]
    assert robust.clip_factor(10.0, 2.0) == 0.2 and robust.clip_factor(1.0, 2.0) == 1.0
    assert robust.l2_norm({"b": torch.tensor([4.0]), "a": torch.tensor([3.0])}) == 5.0


def _attack(spec, kind, factor):
    original = spec.client.fit

    def fit(self, rnd, cid, download, examples, state):
        upload = original(self, rnd, cid, download, examples, state)
        if cid == 0:
            sign = -1.0 if kind == "flip" else 1.0
            upload.payload.tensors = {k: t * (sign * factor) if t.is_floating_point() else t
                                      for k, t in upload.payload.tensors.items()}
        return upload

    return fit


ROBUST = ["federation.clients=5", "federation.clients_per_round=5", "data.partition='iid'",
          "data.examples_per_client=16", "federation.rounds=3", "eval.generate=false"]


@pytest.mark.parametrize("method, kind, factor, extra", [
    ("fedavg", "scale", 100.0, []),
    ("fedavg", "flip", 10.0, []),
    ("ferret", "scale", 100.0, ["method.ferret.server_lr=0.3"]),
])
def test_robust_aggregation_resists_one_hostile_client(tmp_path, smoke_config, monkeypatch, method, kind, factor,
                                                       extra):
    spec = get_method(method)
    monkeypatch.setattr(spec.client, "fit", _attack(spec, kind, factor))
    gains, norms = {}, {}
    for rule in ("mean", "median", "trimmed-mean"):
        config = smoke_config(f"method.name='{method}'", *ROBUST, *extra, f"method.aggregation='{rule}'")
        summary = run_local(config, tmp_path / rule, quiet=True)
        gains[rule] = _gain(summary)
        norms[rule] = max(r["aggregate"].get("update_norm", 0.0) for r in _rounds(tmp_path / rule))
    print(f"\n{method}, 1 of 5 clients sends {kind} ×{factor:g}: loss gain " +
          ", ".join(f"{rule} {g:+.3f}" for rule, g in gains.items()))
    assert gains["median"] > 0.2 and gains["trimmed-mean"] > 0.2
    assert gains["mean"] < min(gains["median"], gains["trimmed-mean"]) - 0.2


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
def test_fedkseed_per_seed_rules_against_a_scaled_client(smoke_config, rule):
    """Per-seed scalars of 5 clients over a pool of 4, client 0 sending ×100: by hand."""
    from thinwire.methods.base import Reply, RunContext, Workbench

    config = smoke_config("method.name='fedkseed'", "method.fedkseed.pool_size=4", "method.weighting='equal'",
                          f"method.aggregation='{rule}'", "method.trim_fraction=0.2")
    server = get_method("fedkseed").server(RunContext(config, Workbench(config)))
    server.setup()
    honest = [[1.0, 2.0, 0.0, -1.0], [1.5, 1.0, 0.5, -1.0], [0.5, 3.0, 0.0, -2.0], [1.0, 2.0, 1.0, 0.0]]
    rows = [[100 * v for v in honest[0]]] + honest
    replies = []
    for cid, row in enumerate(rows):
        seeds = [i for i, v in enumerate(row) if v]
        payload = Payload(tensors={"seeds": torch.tensor(seeds, dtype=torch.int32),
                                   "values": torch.tensor([row[i] for i in seeds])}, scalars={"version": 0})
        replies.append(Reply(cid, payload, 8))
        server.validate(replies[-1])
    update, _ = server.combine(1, replies)
    dense = torch.zeros(4).index_put_((update.tensors["seeds"].long(),), update.tensors["values"]).tolist()
    expected = {"mean": [104.0 / 5, 208.0 / 5, 1.5 / 5, -104.0 / 5], "median": [1.0, 2.0, 0.0, -1.0],
                "trimmed-mean": [3.5 / 3, 7.0 / 3, 0.5 / 3, -4.0 / 3]}[rule]
    assert dense == pytest.approx(expected, rel=1e-6)


def test_clipping_bounds_a_scaled_client(tmp_path, smoke_config, monkeypatch):
    monkeypatch.setattr(DeltaClient, "fit", _attack(get_method("fedavg"), "scale", 100.0))
    config = smoke_config(*ROBUST, "method.clip_update_norm=5.0")
    summary = run_local(config, tmp_path / "clip", quiet=True)
    rounds = _rounds(tmp_path / "clip")
    assert all(r["aggregate"]["clipped"] >= 1 and r["aggregate"]["update_norm"] <= 5.0 + 1e-4 for r in rounds)
    assert _gain(summary) > 0.2


# --- checkpoint and resume ---------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("method, extra", [
    ("fedavg", ["method.server_optimizer='fedadam'", "method.server_lr=0.01"]),
    ("fedit", ["federation.failure_rate=0.3"]),
    ("ferret", ["method.ferret.fixed_bases=true", "method.ferret.momentum=0.5", "method.ferret.server_lr=0.2"]),
    ("fedkseed-pro", ["method.fedkseed.local_steps=10"]),
])
def test_resume_after_a_crash_is_bit_identical(tmp_path, smoke_config, monkeypatch, method, extra):
    config = smoke_config(f"method.name='{method}'", "federation.rounds=4", "eval.generate=false", *extra)
    run_local(config, tmp_path / "whole", quiet=True)
    restore = crash_in_round(monkeypatch, method, 3, Crash("power cut"))
    with pytest.raises(Crash):
        run_local(config, tmp_path / "cut", quiet=True)
    partial = tmp_path / "cut.partial"
    assert json.loads((partial / "checkpoint" / "state.json").read_text())["round"] == 2
    restore()
    resume_local(partial, quiet=True)
    assert not partial.exists()
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_resume_without_a_checkpoint_starts_over_and_bad_checkpoints_are_refused(tmp_path, smoke_config,
                                                                                 monkeypatch, capsys):
    config = smoke_config("eval.generate=false", "train.local_steps=2")
    run_local(config, tmp_path / "whole", quiet=True)
    original = DeltaServer.aggregate
    monkeypatch.setattr(DeltaServer, "aggregate", lambda self, rnd, replies: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        run_local(config, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(DeltaServer, "aggregate", original)
    capsys.readouterr()
    resume_local(tmp_path / "cut", quiet=True)  # killed in round 1: no checkpoint, starts over, and says so
    assert f"{tmp_path / 'cut.partial'} holds no checkpoint" in capsys.readouterr().err
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    with pytest.raises(UsageError, match="already finished"):
        resume_local(tmp_path / "cut")
    with pytest.raises(UsageError, match="nothing to resume"):
        resume_local(tmp_path / "never")

    # a corrupted checkpoint is refused with a one-line reason, and left in place
    monkeypatch.setattr(DeltaServer, "aggregate", lambda self, rnd, replies: (
        original(self, rnd, replies) if rnd == 1 else (_ for _ in ()).throw(Crash())))
    with pytest.raises(Crash):
        run_local(config, tmp_path / "bad", quiet=True)
    state = next((tmp_path / "bad.partial/checkpoint").glob("server-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[-1] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="corrupt"):
        resume_local(tmp_path / "bad.partial")
    assert state.exists()


def test_a_state_json_that_is_json_but_not_a_checkpoint_is_a_clear_error(tmp_path, smoke_config, monkeypatch):
    config = smoke_config("eval.generate=false", "train.local_steps=2", "federation.rounds=3")
    restore = crash_in_round(monkeypatch, "fedavg", 2, Crash())
    with pytest.raises(Crash):
        run_local(config, tmp_path / "cut", quiet=True)
    restore()
    path = tmp_path / "cut.partial/checkpoint/state.json"
    good = json.loads(path.read_text())
    server_file = good["files"]["server"]["name"]
    broken = {"round": {k: v for k, v in good.items() if k != "round"},
              "files.server.bytes": {**good, "files": {**good["files"], "server": {"name": server_file}}},
              "elapsed_s": {**good, "elapsed_s": "soon"},
              "files.states": {**good, "files": {**good["files"], "states": None}}}
    for key, record in broken.items():
        path.write_text(json.dumps(record))
        with pytest.raises(UsageError, match=f"lacks a valid '{key}'"):
            resume_local(tmp_path / "cut", quiet=True)
    path.write_text(json.dumps({**good, "files": {**good["files"], "server": {**good["files"]["server"],
                                                                              "name": "../../config.toml"}}}))
    with pytest.raises(UsageError, match="names a file outside its directory"):
        resume_local(tmp_path / "cut", quiet=True)
    path.write_text(json.dumps(good))
    resume_local(tmp_path / "cut", quiet=True)
    assert (tmp_path / "cut" / "summary.json").is_file()


def test_a_second_writer_of_one_run_is_refused_and_the_first_ones_files_are_kept(tmp_path, smoke_config, capsys):
    """Two processes on one output (the same command twice, a compare beside a resume): whichever
    comes second stops with a one-line error naming the first, fresh, resumed or --force, and the
    first one's files are untouched; a finished run keeps no lock file."""
    config = smoke_config("eval.generate=false", "train.local_steps=2", "federation.rounds=1")
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text("{}\n")
    first = hold(partial)  # flock: a second open file of the lock conflicts, in this process too
    busy = rf"another thinwire process \(pid {os.getpid()}\) is writing {partial}"
    with pytest.raises(UsageError, match=busy):
        run_local(config, out, quiet=True)
    with pytest.raises(UsageError, match=busy):
        run_local(config, out, quiet=True, resume=True)
    args = ["run", str(SMOKE), "--quiet", "--force", "--out", str(out)]
    assert main([*args, *(a for s in ("eval.generate=false", "federation.rounds=1") for a in ("--set", s))]) == 2
    assert "another thinwire process" in capsys.readouterr().err
    assert (partial / "metrics.jsonl").read_text() == "{}\n" and not out.exists()
    first.close()  # the first process ends: the run is an interrupted one again
    with pytest.raises(UsageError, match="an interrupted run is in"):
        run_local(config, out, quiet=True)
    run_local(config, tmp_path / "other", quiet=True)
    assert (tmp_path / "other" / "summary.json").is_file() and not (tmp_path / "other" / LOCK_FILE).exists()


def _cli(*args):
    return [sys.executable, "-m", "thinwire.cli", "run", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("method, extra", [
    ("fedavg", []),
    ("ferret", ["method.ferret.server_lr=0.3"]),
])
def test_sigkill_then_resume_is_bit_identical(tmp_path, smoke_config, method, extra):
    """A real `thinwire run` process killed with SIGKILL at a seeded random moment after round k
    is logged, then `thinwire run --resume`, ends exactly like an uninterrupted run."""
    sets = [f"method.name='{method}'", "federation.rounds=4", "eval.generate=false", "train.local_steps=4", *extra]
    run_local(smoke_config(*sets), tmp_path / "whole", quiet=True)  # torch threads = 1, as in the processes
    rng = random.Random(f"sigkill-{method}")
    k, delay = rng.randint(1, 2), rng.uniform(0.0, 0.5)
    out = tmp_path / "killed"
    args = [str(SMOKE), "--quiet", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= k:
                break
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = json.loads((tmp_path / "killed.partial/checkpoint/state.json").read_text())["round"]
    print(f"\n{method}: killed {delay:.2f} s after round {k} was logged; last checkpoint: round {done}")
    resumed = subprocess.run(_cli("--resume", str(out), "--quiet"), env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "whole", out)


# --- bad input -----------------------------------------------------------------------------------


def _one_line_error(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        status = main(argv)
        raise SystemExit(status)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("thinwire: error:") and "\n" not in err and "Traceback" not in err, err
    assert words in err, err


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["run", "--bogus"], "unrecognized arguments"),
        (["run", "--runtime", "cloud"], "invalid choice"),
        (["run", "--resume"], "expected one argument"),
        (["run", str(SMOKE), "--set", "train.lr=nan"], "not a finite number"),
        (["run", str(SMOKE), "--set", "federation.failure_rate=1.5"], "above its maximum"),
        (["run", str(SMOKE), "--set", "federation.on_too_few='wait'"], "is not one of"),
        (["run", str(SMOKE), "--set", "federation.min_replies=3"], "exceeds federation.clients_per_round"),
        (["run", str(SMOKE), "--set", "method.aggregation='mode'"], "is not one of"),
        (["run", str(tmp_path)], "does not exist"),
        (["run", "--resume", str(tmp_path / "none")], "nothing to resume"),
        (["run", str(SMOKE), "--resume", str(tmp_path / "none")], "drop CONFIG, --set and --out"),
        (["run", str(SMOKE), "--out", str(out), "--set", "model.name='./no-such-model'"], "not a model directory"),
        (["run", str(SMOKE), "--out", str(out), "--set", "method.name='ferret'", "--set",
          "method.ferret.momentum=0.5"], "fixed_bases"),
        (["run", str(SMOKE), "--out", str(out), "--set", f"data.source='{tmp_path / 'missing.jsonl'}'"],
         "does not exist"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"instruction\": ")
    cases.append((["run", str(SMOKE), "--out", str(out), "--set", f"data.source='{bad}'"], "not valid JSON"))
    for argv, words in cases:
        _one_line_error(capsys, argv, words)
        assert not out.exists() and not (tmp_path / "run.partial").exists(), argv


def test_a_claimed_example_count_is_bounded(tmp_path, smoke_config, monkeypatch):
    """With example weighting a claim of 10^12 examples would take all the weight: it is rejected."""
    original = DeltaClient.fit

    def fit(self, rnd, cid, download, examples, state):
        upload = original(self, rnd, cid, download, examples, state)
        if cid == 1:
            upload.num_examples = 10 ** 12
        return upload

    monkeypatch.setattr(DeltaClient, "fit", fit)
    config = smoke_config("federation.rounds=1", "federation.clients_per_round=3", "eval.generate=false")
    run_local(config, tmp_path / "run", quiet=True)
    (first,) = _rounds(tmp_path / "run")
    assert [r["client"] for r in first["rejected"]] == [1] and "exceeds the 24" in first["rejected"][0]["reason"]
    config = smoke_config("federation.rounds=1", "federation.clients_per_round=3", "eval.generate=false",
                          "federation.max_examples=10")
    run_local(config, tmp_path / "capped", quiet=True)
    assert len(_rounds(tmp_path / "capped")[0]["rejected"]) == 3  # each honest client holds 24 > 10
