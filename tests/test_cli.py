"""The `thinwire` command as a user meets it: what it prints while a run goes on, when it is
interrupted, when it ends, and its smaller options."""

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinwire.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "smoke.toml"
QUICK = ["--set", "eval.generate=false", "--set", "train.local_steps=2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args):
    return [sys.executable, "-m", "thinwire.cli", "run", str(SMOKE), *args]


def test_version_and_help_name_every_subcommand(capsys):
    from thinwire import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"thinwire {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    for command in COMMANDS:
        assert command in description, command  # the one-line summary names them all
        assert re.search(rf"^\s+{command}\s+\S", text, flags=re.M), command  # and each has its help line


def test_a_run_piped_to_a_file_logs_every_round(tmp_path):
    """stdout is a file (nohup, CI, a cluster job): plain lines, one per round as it ends, no bars;
    the summary ends with the run directory and next commands that name it."""
    out = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run(_cli("--out", str(out), "--set", "federation.rounds=3", "--set", "eval.every=1", *QUICK),
                              stdout=log, stderr=subprocess.PIPE, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0].startswith(f"run directory: {out}.partial")
    assert lines[1].startswith("evaluating the base model") and lines[2].startswith("base model evaluated in")
    assert sum("evaluat" in line for line in lines) == 2  # rounds' evaluations show in their round lines
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(",")[0] for line in rounds] == ["round 1/3", "round 2/3", "round 3/3"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line, record in zip(rounds, records):
        assert f"train loss {record['train_loss']:.4f}" in line
        assert f"eval loss {record['eval']['loss']:.4f}" in line  # quality when evaluated
        assert " up " in line and " down " in line
    assert "eta" in rounds[0] and "eta" not in rounds[-1]
    assert "━" not in "\n".join(lines)  # no progress bars in a log
    err = done.stderr
    assert f"run directory: {out}\n" in err
    assert f"thinwire export {out} --out {out}-export" in err and f"thinwire generate {out} " in err
    assert f"thinwire compare {out}/config.toml --methods fedavg," in err
    assert "random model" in err  # tiny's 0 -> 0 is explained


def test_quiet_prints_only_the_run_directory_and_the_summary_records_the_environment(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out), "--quiet", "--set", "federation.rounds=1", *QUICK]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"run directory: {out}\n"
    summary = json.loads((out / "summary.json").read_text())
    import torch

    assert summary["versions"]["python"] == platform.python_version()
    assert summary["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(summary["versions"]) == {"python", "thinwire", "torch", "transformers", "peft", "flwr"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert summary["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    assert summary["machine"]["cpu_cores"] == os.cpu_count() and summary["machine"]["memory_gb"] > 0


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    from thinwire.runtime.records import git_commit

    assert git_commit(tmp_path) is None


def test_ctrl_c_says_how_far_the_run_got_and_how_to_resume_it(tmp_path, capsys, monkeypatch):
    from conftest import crash_in_round

    out = tmp_path / "my run"
    sets = ["--set", "federation.rounds=3", *QUICK]
    restore = crash_in_round(monkeypatch, "fedavg", 3, KeyboardInterrupt())
    assert main(["run", str(SMOKE), "--out", str(out), "--quiet", *sets]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == [f"thinwire: interrupted in round 3 of 3; the run so far is in {out}.partial",
                   f"thinwire: continue it (from round 3) with: thinwire run --resume '{out}'"]
    restore()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # the printed command, as a user runs it
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_sigint_on_a_real_process_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(_cli("--out", str(out), "--set", "federation.rounds=50", *QUICK), stdout=log,
                                stderr=subprocess.PIPE, text=True, env=_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "round 1/50" not in (tmp_path / "log.txt").read_text():
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert f"the run so far is in {out}.partial" in err and f"with: thinwire run --resume {out}\n" in err
    assert "Traceback" not in err


def test_an_auto_named_rerun_finds_the_interrupted_run_of_its_config(tmp_path, capsys, monkeypatch):
    """No --out: an interrupted run of the same resolved config under runs/ is named with its resume
    command (not on a terminal: the new run starts anyway); on a terminal a yes resumes it."""
    from conftest import crash_in_round

    monkeypatch.chdir(tmp_path)
    sets = ["--set", "federation.rounds=2", *QUICK, "--quiet"]
    earlier = Path("runs") / "fedavg-20000101-000000"
    restore = crash_in_round(monkeypatch, "fedavg", 2, KeyboardInterrupt())
    assert main(["run", str(SMOKE), "--out", str(earlier), *sets]) == 130
    restore()
    capsys.readouterr()
    assert main(["run", str(SMOKE), *sets, "--set", "federation.seed=1"]) == 0  # another config: no word of it
    assert "interrupted" not in capsys.readouterr().err
    assert main(["run", str(SMOKE), *sets]) == 0
    err = capsys.readouterr().err
    assert f"an interrupted run of this config is in {earlier}.partial (1 of 2 rounds done)" in err
    assert f"to continue that one instead: thinwire run --resume {earlier}" in err
    assert Path(f"{earlier}.partial").is_dir() and len(list(Path("runs").iterdir())) == 3

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["run", str(SMOKE), *sets]) == 0
    assert (earlier / "summary.json").is_file() and not Path(f"{earlier}.partial").exists()
    assert len(list(Path("runs").iterdir())) == 3  # resumed, no new run


def test_compare_without_methods_says_it_runs_every_method_and_asks_at_a_terminal(tmp_path, capsys, monkeypatch):
    """The CLI's contract (DESIGN.md: --methods is optional) holds, but never silently: the cost is
    stated, and at a terminal nothing runs without a yes."""
    from thinwire.methods import METHOD_NAMES

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"running every method, {len(METHOD_NAMES)} runs of 2 rounds each on tiny" in err
    assert all(name in err for name in METHOD_NAMES) and "pass --methods" in err
    assert not (tmp_path / "c").exists()


def test_compare_methods_all_means_every_method():
    from thinwire.compare import check_methods
    from thinwire.methods import METHOD_NAMES

    assert check_methods(["all"]) == list(METHOD_NAMES)
    assert check_methods(["fedit,fedavg", "fedit"]) == ["fedit", "fedavg"]


@pytest.mark.parametrize("generate", [False, True])
def test_evaluation_progress_counts_every_example_pass(smoke_config, generate):
    from thinwire.data import build_federation
    from thinwire.evaluate import evaluation_work, score_splits
    from thinwire.methods.base import Workbench

    config = smoke_config(f"eval.generate={str(generate).lower()}", "eval.batch_size=5", "eval.max_new_tokens=2")
    workbench = Workbench(config)
    model, _ = workbench.trainable(False)
    splits = build_federation(config).eval_splits()
    batches: list[int] = []
    records = score_splits(model, workbench.tokenizer, splits, config.eval, config.data.max_length, batches.append)
    assert sum(batches) == evaluation_work(splits, config.eval) == len(records) * (2 if generate else 1)
    assert max(batches) == 5 and len(batches) == sum(-(-len(r) // 5) for r in splits.values()) * (1 + generate)


def test_a_round_line_gives_loss_quality_bytes_and_eta():
    from thinwire.runtime.display import round_line

    record = {"round": 3, "clients_ok": 2, "clients_sampled": 3, "train_loss": 1.23456, "skipped": False,
              "eval": {"loss": 0.5, "rougeL": 0.25, "exact_match": 0.125}, "uplink_bytes": 1_500_000,
              "downlink_bytes": 999, "time_s": {"total": 12.34}}
    assert round_line(record, 10, 75.0) == ("round 3/10, clients 2/3, train loss 1.2346, eval loss 0.5000, "
                                            "rougeL 0.2500, exact match 0.1250, up 1.50 MB, down 999 B, 12.3 s, "
                                            "eta 1m 15s")
    record.update(eval=None, train_loss=None, skipped=True)
    assert round_line(record, 3, None) == ("round 3/3, skipped (too few replies), clients 2/3, up 1.50 MB, "
                                           "down 999 B, 12.3 s")
