import json

import pytest
import torch

from thinwire.errors import UsageError
from thinwire.evaluate import by_task, exact_match, rouge_l, split_metrics, summarise
from thinwire.methods.base import Workbench
from thinwire.methods.fedavg import DeltaClient
from thinwire.runtime.engine import sample_clients
from thinwire.runtime.local import run_local
from thinwire.runtime.upload import stamp
from thinwire.wire import Payload


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, lr, drop", [("fedavg", "3e-3", 0.5), ("fedit", "5e-2", 0.1)])
def test_end_to_end_learns_and_counts_bytes(tmp_path, smoke_config, method, lr, drop):
    config = smoke_config(f"method.name='{method}'", f"train.lr={lr}", "federation.rounds=3")
    summary = run_local(config, tmp_path / "run", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"] - drop

    # what crosses the wire each way is exactly one payload of the trainable tensors
    _, params = Workbench(config).trainable(lora=method == "fedit")
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    expected = len(Payload(tensors=zeros).encode())
    assert summary["trainable_parameters"] == sum(p.numel() for p in params.values())
    rounds = _rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        for c in r["clients"]:  # up: the same tensors, stamped with (round, client)
            assert c["uplink_bytes"] == len(Payload(tensors=zeros, scalars=stamp({}, r["round"], c["client"])).encode())
            assert c["downlink_bytes"] == expected
        assert r["uplink_bytes"] == sum(c["uplink_bytes"] for c in r["clients"])
        assert r["downlink_bytes"] == expected * r["clients_ok"]
        assert set(r["time_s"]) >= {"local", "aggregate", "total"} and r["eval"]["loss"] > 0
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in rounds)
    assert summary["downlink_bytes_per_client_round"] == expected
    assert summary["uplink_bytes_per_client_round"] == summary["uplink_bytes_total"] / summary["client_rounds"]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["config.toml", "final_state.safetensors", "metrics.jsonl", "predictions.jsonl", "summary.json"]

    # predictions.jsonl is the final evaluation, example by example
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == config.eval.max_examples
    assert split_metrics(records) == pytest.approx(summary["final_eval"])
    for r in records:
        assert r["exact_match"] == exact_match(r["prediction"], r["reference"])
        assert r["rougeL"] == rouge_l(r["prediction"], r["reference"]) and r["tokens"] > 0
    assert set(by_task(records)) == set(config.data.tasks)


def test_scores_by_task_are_token_weighted():
    records = [{"split": "", "task": "a", "loss_sum": 3.0, "tokens": 1, "prediction": "x", "exact_match": 1.0,
                "rougeL": 1.0},
               {"split": "", "task": "a", "loss_sum": 3.0, "tokens": 3, "prediction": "y", "exact_match": 0.0,
                "rougeL": 0.5},
               {"split": "", "task": "b", "loss_sum": 8.0, "tokens": 2, "prediction": "z", "exact_match": 0.0,
                "rougeL": 0.0},
               {"split": "heldout_", "task": "c", "loss_sum": 1.0, "tokens": 1, "prediction": "w",
                "exact_match": 1.0, "rougeL": 1.0}]
    assert by_task(records) == {"a": {"n": 2.0, "loss": 1.5, "rougeL": 0.75, "exact_match": 0.5},
                                "b": {"n": 1.0, "loss": 4.0, "rougeL": 0.0, "exact_match": 0.0}}
    assert summarise(records[:3]) == {"loss": 14 / 6, "rougeL": 0.5, "exact_match": 1 / 3}
    assert split_metrics(records) == {"loss": 14 / 6, "rougeL": 0.5, "exact_match": 1 / 3, "heldout_loss": 1.0,
                                      "heldout_rougeL": 1.0, "heldout_exact_match": 1.0}


def test_same_seed_same_weights_and_metrics(tmp_path, smoke_config):
    config = smoke_config("method.name='fedit'", "federation.rounds=2")
    run_local(config, tmp_path / "a", quiet=True)
    run_local(config, tmp_path / "b", quiet=True)
    assert (tmp_path / "a/final_state.safetensors").read_bytes() == (tmp_path / "b/final_state.safetensors").read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_s", "clients")} for r in rs]  # noqa: E731
    assert strip(_rounds(tmp_path / "a")) == strip(_rounds(tmp_path / "b"))
    other = smoke_config("method.name='fedit'", "federation.rounds=2", "federation.seed=1")
    run_local(other, tmp_path / "c", quiet=True)
    assert (tmp_path / "a/final_state.safetensors").read_bytes() != (tmp_path / "c/final_state.safetensors").read_bytes()


def test_sampling_is_seeded_and_without_replacement(smoke_config):
    config = smoke_config("federation.clients=3", "federation.clients_per_round=2")
    draws = [sample_clients(config, r) for r in range(1, 30)]
    assert all(len(set(d)) == 2 and all(0 <= c < 3 for c in d) for d in draws)
    assert draws == [sample_clients(config, r) for r in range(1, 30)]
    assert len({tuple(d) for d in draws}) == 3


def test_failed_run_leaves_no_run_directory(tmp_path, smoke_config, monkeypatch):
    calls = []

    def boom(self, *args):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("client crashed")
        return original(self, *args)

    original = DeltaClient.fit
    monkeypatch.setattr(DeltaClient, "fit", boom)
    with pytest.raises(RuntimeError):
        run_local(smoke_config(), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    assert len(_rounds(tmp_path / "run.partial")) == 1


def test_existing_output_is_refused(tmp_path, smoke_config):
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        run_local(smoke_config(), tmp_path / "run", quiet=True)


# --- honest records: measured fields, warnings, phases ------------------------------------------


def test_client_metrics_cannot_replace_measured_fields(tmp_path, smoke_config, monkeypatch):
    """A client that reports traffic, its id or its example count in its metrics changes nothing
    measured: its claims stay under `metrics`."""
    original = DeltaClient.fit
    claims = {"uplink_bytes": 1, "downlink_bytes": 2, "client": 77, "examples": 10**6, "train_loss": 0.5}

    def fit(self, *args):
        upload = original(self, *args)
        upload.metrics.update(claims)
        return upload

    monkeypatch.setattr(DeltaClient, "fit", fit)
    config = smoke_config("federation.rounds=1", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    (record,) = _rounds(tmp_path / "run")
    _, params = Workbench(config).trainable(lora=False)
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    down = len(Payload(tensors=zeros).encode())
    assert [c["client"] for c in record["clients"]] == sample_clients(config, 1)
    for c in record["clients"]:
        up = len(Payload(tensors=zeros, scalars=stamp({}, 1, c["client"])).encode())
        assert (c["uplink_bytes"], c["downlink_bytes"]) == (up, down) and c["examples"] < 10**6
        assert c["metrics"] == {**c["metrics"], **claims}  # kept, apart
    assert record["downlink_bytes"] == 2 * down
    assert record["train_loss"] == 0.5  # the round's mean of what clients report as train_loss
    assert summary["uplink_bytes_total"] == record["uplink_bytes"] == sum(c["uplink_bytes"] for c in record["clients"])


def test_warnings_land_in_the_next_round_record(tmp_path, smoke_config, monkeypatch):
    """A warning raised in server.setup() lands in round 1's record, one a client raises in round 2
    in round 2's; each once; the summary lists them all."""
    from thinwire.methods.fedavg import DeltaServer

    setup, fit = DeltaServer.setup, DeltaClient.fit

    def warned_setup(self):
        self.ctx.warn("from setup")
        setup(self)

    def warned_fit(self, rnd, *args):
        if rnd == 2:
            self.ctx.warn("from a client")
        return fit(self, rnd, *args)

    monkeypatch.setattr(DeltaServer, "setup", warned_setup)
    monkeypatch.setattr(DeltaClient, "fit", warned_fit)
    summary = run_local(smoke_config("federation.rounds=3", "eval.generate=false"), tmp_path / "run", quiet=True)
    assert [r["warnings"] for r in _rounds(tmp_path / "run")] == [["from setup"], ["from a client"], []]
    assert summary["warnings"] == ["from setup", "from a client"]


def test_rounds_carry_their_phase_and_the_summary_traffic_per_phase(tmp_path, smoke_config):
    """CG-FedLLM (sign codec): a TGAP round then FAF rounds; each record names its phase, and the
    summary's per-phase totals add up to the whole run's, FAF's uplink far below TGAP's."""
    config = smoke_config("method.name='cgfedllm'", "method.cgfedllm.codec='signs'", "method.cgfedllm.tgap_rounds=1",
                          "federation.rounds=3", "eval.generate=false")
    summary = run_local(config, tmp_path / "run", quiet=True)
    rounds = _rounds(tmp_path / "run")
    assert [r["phase"] for r in rounds] == ["tgap", "faf", "faf"]
    phases = summary["phases"]
    assert list(phases) == ["tgap", "faf"] and [phases[p]["rounds"] for p in phases] == [1, 2]
    for key in ("uplink_bytes_total", "downlink_bytes_total", "client_rounds"):
        assert sum(p[key] for p in phases.values()) == summary[key]
    faf = phases["faf"]
    faf_up = sum(c["uplink_bytes"] for r in rounds[1:] for c in r["clients"])
    assert faf["uplink_bytes_total"] == faf_up
    assert faf["uplink_bytes_per_client_round"] == faf_up / sum(r["clients_contacted"] for r in rounds[1:])
    assert faf["uplink_bytes_per_client_round"] * 20 < phases["tgap"]["uplink_bytes_per_client_round"]
    # the whole run's figure is what it is: between the two phases'
    assert faf["uplink_bytes_per_client_round"] < summary["uplink_bytes_per_client_round"] \
        < phases["tgap"]["uplink_bytes_per_client_round"]
    # methods without phases record none
    run_local(smoke_config("federation.rounds=1", "eval.generate=false"), tmp_path / "plain", quiet=True)
    assert _rounds(tmp_path / "plain")[0]["phase"] is None
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["phases"] == {}


def test_sgd_momentum_carries_the_previous_step_within_a_round():
    """train.momentum is SGD's heavy ball: with constant gradient g and lr η, step k moves the weight
    by η·g·(1 + μ + … + μ^(k-1)); two steps of μ = 0.5 move it by η·g·(1 + 1.5)."""
    import torch

    from thinwire.config import TrainConfig
    from thinwire.train.first_order import make_optimizer

    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([w], TrainConfig(optimizer="sgd", lr=0.1, momentum=0.5))
    for _ in range(2):
        optimizer.zero_grad()
        (2.0 * w).sum().backward()  # gradient 2 everywhere
        optimizer.step()
    assert float(w) == pytest.approx(-0.1 * 2.0 * 2.5)
