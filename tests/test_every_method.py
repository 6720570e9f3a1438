"""Every method runs on examples/smoke.toml with no option but its name (defaults that work)."""

import json
import math

import pytest

from thinwire.cli import main
from thinwire.config import EXAMPLES
from thinwire.methods import METHOD_NAMES


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_runs_on_the_smoke_config_by_name_alone(tmp_path, method):
    out = tmp_path / method
    assert main(["run", str(EXAMPLES / "smoke.toml"), "--set", f"method.name={method}", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 2
    assert math.isfinite(summary["final_eval"]["loss"]) and math.isfinite(summary["base_eval"]["loss"])
    assert summary["uplink_bytes_total"] > 0 and summary["downlink_bytes_total"] > 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in rounds)
