import json

import pytest
import torch

from thinwire.errors import UsageError
from thinwire.evaluate import by_task, exact_match, rouge_l, split_metrics, summarise
from thinwire.methods.base import Workbench
from thinwire.methods.fedavg import DeltaClient
from thinwire.runtime.local import run_local, sample_clients
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
    expected = len(Payload(tensors={n: torch.zeros_like(p) for n, p in params.items()}).encode())
    assert summary["trainable_parameters"] == sum(p.numel() for p in params.values())
    rounds = _rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert all(c["uplink_bytes"] == expected and c["downlink_bytes"] == expected for c in r["clients"])
        assert r["uplink_bytes"] == r["downlink_bytes"] == expected * r["clients_ok"]
        assert set(r["time_s"]) >= {"local", "aggregate", "total"} and r["eval"]["loss"] > 0
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in rounds)
    assert summary["uplink_bytes_per_client_round"] == expected
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
