import json

import pytest
import torch

from thinwire.errors import UsageError
from thinwire.methods.base import RunContext, Workbench
from thinwire.methods.ferret import FerretClient
from thinwire.runtime.local import run_local
from thinwire.wire import Payload


@pytest.mark.parametrize("options", [
    ["method.ferret.trainable='lora'", "method.server_lr=1.0"],
    ["method.ferret.scaling='code'", "method.ferret.clip=10.0", "method.server_lr=1.0"],
    ["method.ferret.fixed_bases=true", "method.ferret.momentum=0.5", "method.server_lr=0.2"],
    ["method.ferret.allocation='proportional'", "method.ferret.budget=300", "method.ferret.lr_schedule='cosine'",
     "method.server_lr=0.05"],
    ["method.ferret.basis='sketch'", "method.ferret.clip=10.0", "method.server_lr=0.3"],
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
