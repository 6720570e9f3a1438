"""benchmarks/tune.py: every method's setting chosen the same way, on the validation split."""

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tune", ROOT / "benchmarks" / "tune.py")
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)
edge_keys = tune.edge_keys


def test_edge_keys_name_every_key_chosen_at_its_grids_end():
    points = [{"train.lr": lr, "method.ferret.server_lr": g} for lr in ("0.01", "0.03", "0.1") for g in ("1", "2", "3")]
    assert edge_keys({"train.lr": "0.03", "method.ferret.server_lr": "2"}, points) == []
    assert edge_keys({"train.lr": "0.1", "method.ferret.server_lr": "2"}, points) == ["train.lr"]
    assert edge_keys({"train.lr": "0.01", "method.ferret.server_lr": "3"}, points) == ["train.lr", "method.ferret.server_lr"]
    assert edge_keys({"train.lr": "0.01"}, [{"train.lr": "0.01"}]) == []  # one value tried: no edge to widen


def test_tune_picks_the_best_validation_run_and_reuses_finished_runs(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "tune.py"), str(ROOT / "examples" / "smoke.toml"),
               "--methods", "ferret", "--factors", "1,3", "--grid", "ferret:method.ferret.server_lr=1,2",
               "--rounds", "1", "--metric", "loss", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "4 tuning runs (4 run now, 0 reused" in first.stdout
    runs = {d.name: d for d in (tmp_path / "ferret").iterdir()}
    assert len(runs) == 4
    for run in runs.values():
        config = tomllib.loads((run / "config.toml").read_text())
        assert config["data"]["eval_split"] == "validation"
    losses = {name: json.loads((run / "summary.json").read_text())["final_eval"]["loss"] for name, run in runs.items()}
    best = min(losses, key=losses.get)
    tuned = tomllib.loads((tmp_path / "tuned.toml").read_text())["compare"]["ferret"]
    assert f"train.lr={tuned['train']['lr']:.2g},method.ferret.server_lr={tuned['method']['ferret']['server_lr']}" == best
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "4 tuning runs (0 run now, 4 reused" in second.stdout
