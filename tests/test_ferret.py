import json

import pytest
import torch

from thinwire.config import load_config
from thinwire.errors import UsageError
from thinwire.methods.base import RunContext, Workbench
from thinwire.methods.ferret import FerretClient
from thinwire.runtime.local import run_local
from thinwire.wire import Payload


@pytest.mark.parametrize("options", [
    ["method.ferret.trainable='lora'", "method.ferret.server_lr=1.0"],
    ["method.ferret.scaling='code'", "method.ferret.clip=10.0", "method.ferret.server_lr=1.0"],
    ["method.ferret.fixed_bases=true", "method.ferret.momentum=0.5", "method.ferret.server_lr=0.2"],
    ["method.ferret.allocation='proportional'", "method.ferret.budget=300", "method.ferret.lr_schedule='cosine'",
     "method.ferret.server_lr=0.05"],
    ["method.ferret.basis='sketch'", "method.ferret.clip=10.0", "method.ferret.server_lr=0.3"],
])
def test_variants_learn_and_upload_what_they_allocate(tmp_path, smoke_config, options):
    config = smoke_config("method.name='ferret'", "federation.rounds=3", *options)
    summary = run_local(config, tmp_path / "r", quiet=True)
    assert summary["final_eval"]["loss"] < summary["base_eval"]["loss"]
    client = FerretClient(RunContext(config, Workbench(config)))
    rounds = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    for r in rounds:
        # an upload is 16-bit values + one int32 count per block: its size is bounded by k_max per block
        most = len(Payload(tensors={"values": torch.zeros(200 * len(client.blocks), dtype=torch.float16),
                                    "counts": torch.zeros(len(client.blocks), dtype=torch.int32)},
                           scalars={"basis_round": 99}).encode())
        assert all(0 < c["uplink_bytes"] <= most for c in r["clients"])
    if "method.ferret.allocation='proportional'" in options:
        assert all(r["aggregate"]["coordinates"] <= 300 * 2 for r in rounds)


@pytest.mark.parametrize(("options", "message"), [
    (["method.ferret.momentum=0.9"], "fixed_bases"),
    (["method.ferret.basis='sketch'", "method.ferret.scaling='code'"], "unbiased"),
])
def test_incompatible_options_are_usage_errors(tmp_path, smoke_config, options, message):
    with pytest.raises(UsageError, match=message):
        run_local(smoke_config("method.name='ferret'", *options), tmp_path / "r", quiet=True)


def test_keeps_most_of_fedavgs_gain_under_the_same_optimizer(tmp_path, smoke_config):
    """Full-parameter Ferret with the released code's SGD against FedAvg with the same SGD and lr:
    measured 0.85 against 0.91 of held-out loss gain after 6 rounds (93%); asserted: ≥ 85%."""
    same = ["federation.rounds=4", "train.optimizer='sgd'", "train.lr=3e-2", "eval.generate=false"]
    gains = {}
    for method in ("ferret", "fedavg"):
        summary = run_local(smoke_config(f"method.name='{method}'", *same), tmp_path / method, quiet=True)
        gains[method] = summary["base_eval"]["loss"] - summary["final_eval"]["loss"]
    assert gains["fedavg"] > 0.4
    assert gains["ferret"] >= 0.85 * gains["fedavg"], gains


def test_adamw_is_warned_about_once(tmp_path, smoke_config, capsys):
    config = smoke_config("method.name='ferret'", "train.optimizer='adamw'", "eval.generate=false")
    run_local(config, tmp_path / "r", quiet=True)
    err = capsys.readouterr().err
    assert err.count("amplifies the projection noise") == 1
    assert load_config(tmp_path / "r" / "config.toml").train.optimizer == "adamw"
    rounds = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["warnings"]) for r in rounds] == [1] + [0] * (len(rounds) - 1)
    assert "amplifies the projection noise" in rounds[0]["warnings"][0]
    quiet = run_local(smoke_config("method.name='ferret'", "eval.generate=false"), tmp_path / "s", quiet=True)
    assert "amplifies" not in capsys.readouterr().err and quiet["final_eval"]["loss"] < quiet["base_eval"]["loss"]
