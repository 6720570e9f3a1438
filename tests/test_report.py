"""compare + report: real tiny runs, a failing method, skipped directories, and the HTML page
rendered by a real headless browser."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from thinwire.config import EXAMPLES
from thinwire.compare import parse_seeds, run_compare
from thinwire.errors import UsageError
from thinwire.report import PLOTS, render_report
from thinwire.across_seeds import mean_std

FAST = ["federation.rounds=2", "train.local_steps=2", "train.batch_size=2", "data.max_length=64",
        "eval.generate=false", "eval.max_examples=4",
        "data.examples_per_client=8"]
FAILING = "cgfedllm"  # stands in for a method whose client crashes mid-run


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """fedavg and fedit for real, plus a method whose client fit raises; one compare run."""
    import thinwire.runtime.local as local

    real_get_method = local.get_method

    def get_method(name):
        if name != FAILING:
            return real_get_method(name)
        spec = real_get_method("fedavg")

        class Crashing(spec.client):
            def fit(self, *args, **kwargs):
                raise RuntimeError("boom in client fit\nsecond line")

        return dataclasses.replace(spec, name=FAILING, client=Crashing)

    out = tmp_path_factory.mktemp("compare") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and immune to a busy machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(local, "get_method", get_method)
            rows = run_compare(EXAMPLES / "smoke.toml", ["fedavg", "fedit", FAILING], FAST, out, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out, rows


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def test_compare_runs_every_method_and_reports_the_failure(compared):
    out, rows = compared
    status = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["fedavg", "fedit", FAILING]
    assert status["fedavg"]["status"] == status["fedit"]["status"] == "ok"
    assert status[FAILING]["status"] == "failed"
    assert status[FAILING]["reason"] == "RuntimeError: boom in client fit"
    assert (out / f"{FAILING}.partial").is_dir() and not (out / FAILING).exists()
    for name in ("report.html", "comparison.csv", "comparison.md", "compare.json", *PLOTS):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))

    # Only method.name differs between the runs' resolved configs.
    configs = {m: (out / m / "config.toml").read_text() for m in ("fedavg", "fedit")}
    strip = [re.sub(r'name = "(fedavg|fedit)"', "", c) for c in configs.values()]
    assert strip[0] == strip[1]

    # CSV numbers are the summaries' numbers.
    table = _csv_rows(out / "comparison.csv")
    assert set(table) == {"fedavg", "fedit"}
    summaries = {m: json.loads((out / m / "summary.json").read_text()) for m in ("fedavg", "fedit")}
    for method, summary in summaries.items():
        row = table[method]
        for key in ("uplink_bytes_total", "downlink_bytes_total", "uplink_bytes_per_client_round",
                    "downlink_bytes_per_client_round", "wall_s", "peak_rss_mb", "rounds"):
            assert float(row[key]) == summary[key], (method, key)
        for key, value in summary["final_eval"].items():
            assert float(row[f"final_{key}"]) == value
            assert float(row[f"base_{key}"]) == summary["base_eval"][key]
        metrics = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        local_mean = sum(m["time_s"]["local"] for m in metrics) / len(metrics)
        assert float(row["local_s_mean"]) == pytest.approx(local_mean)
        # each is its own baseline (FedAvg for full weights, FedIT for LoRA): measured, ratio 1
        assert row["traffic_baseline"] == method and float(row["traffic_ratio_vs_baseline"]) == 1.0
    assert "fedavg_bytes_per_client_round" not in summaries["fedit"]

    html = (out / "report.html").read_text()
    markdown = (out / "comparison.md").read_text()
    for text in (html, markdown):
        assert FAILING in text and "boom in client fit" in text
        assert "tiny is a random 2-layer model" in text  # why exact match stays 0 -> 0
        assert "1.00×" not in text and "same" in text  # each is its own baseline
    assert "same bytes as fedavg" in markdown and "same bytes as fedit" in markdown

    # By task: each run's final predictions, scored per task (no generation here: loss only).
    with (out / "by_task.csv").open() as handle:
        by_task_rows = list(csv.DictReader(handle))
    assert {(r["run"], r["task"]) for r in by_task_rows} == {(m, t) for m in ("fedavg", "fedit")
                                                             for t in ("reverse-word", "uppercase", "add")}
    for r in by_task_rows:
        records = [json.loads(line) for line in (out / r["run"] / "predictions.jsonl").read_text().splitlines()]
        mine = [x for x in records if x["task"] == r["task"]]
        assert float(r["n"]) == len(mine)
        assert float(r["loss"]) == pytest.approx(sum(x["loss_sum"] for x in mine) / sum(x["tokens"] for x in mine))
    assert 'id="tasks"' in html and "## By task" in markdown
    assert f"{FAILING}.partial" not in html  # the failed method's own partial dir is not listed twice
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)
    assert html.count('src="data:image/png;base64,') == len(PLOTS)

    # Re-rendering from the compare directory alone lists the failure again (from compare.json).
    again = render_report([out], out / "again")
    assert [r["run"] for r in again.rows] == ["fedavg", "fedit"]
    assert again.failed == [(FAILING, "RuntimeError: boom in client fit")] and again.skipped == []


def test_compare_checks_method_names_and_output(compared, tmp_path):
    with pytest.raises(UsageError, match=r"unknown method 'fedsgd'.*valid names: fedavg, fedit"):
        run_compare(EXAMPLES / "smoke.toml", ["fedavg", "fedsgd"], FAST, tmp_path / "a", quiet=True)
    assert not (tmp_path / "a").exists()
    out, _ = compared
    with pytest.raises(UsageError, match=r"finished run of another config: train\.lr = 0\.003 there, 0\.001 now"):
        run_compare(EXAMPLES / "smoke.toml", ["fedavg"], [*FAST, "train.lr=1e-3"], out, quiet=True)
    with pytest.raises(UsageError, match="unknown config key"):
        run_compare(EXAMPLES / "smoke.toml", ["fedavg"], ["train.lrr=1"], tmp_path / "b", quiet=True)


def test_compare_runs_per_method_settings_and_named_variants(tmp_path):
    config = tmp_path / "variants.toml"
    config.write_text((EXAMPLES / "smoke.toml").read_text()
                      + '\n[compare.fedit.train]\nlr = 0.002\n'
                        '[compare.fedit-frozen.method]\nname = "fedit"\n[compare.fedit-frozen.train]\nlr = 0.0\n')
    with pytest.raises(UsageError, match="variants in the config: fedit-frozen"):
        run_compare(config, ["fedit-fast"], FAST, tmp_path / "bad", quiet=True)
    out = tmp_path / "out"
    rows = run_compare(config, ["fedit", "fedit-frozen"], [*FAST, "federation.rounds=1"], out, quiet=True)
    assert [(r["method"], r["status"]) for r in rows] == [("fedit", "ok"), ("fedit-frozen", "ok")]
    assert 'lr = 0.002' in (out / "fedit" / "config.toml").read_text()
    frozen = json.loads((out / "fedit-frozen" / "summary.json").read_text())
    assert frozen["method"] == "fedit" and frozen["final_eval"]["loss"] == frozen["base_eval"]["loss"]
    tuned = json.loads((out / "fedit" / "summary.json").read_text())
    assert tuned["final_eval"]["loss"] < tuned["base_eval"]["loss"]
    table = _csv_rows(out / "comparison.csv")
    assert set(table) == {"fedit (fedit)", "fedit (fedit-frozen)"}
    # the differing key, with each run's value
    differing = "train.lr = 0.002 (fedit (fedit)); 0.0 (fedit (fedit-frozen))"
    assert f"- {differing}" in (out / "comparison.md").read_text()
    assert f"<code>{differing}</code>" in (out / "report.html").read_text()


@pytest.mark.parametrize("ratio, text", [(0.00274, "365× fewer"), (0.5, "2.00× fewer"), (1.0, "same"),
                                         (1.2, "1.20× more"), (0.0401, "24.9× fewer"), (1234.0, "1,234× more")])
def test_byte_ratios_read_as_how_many_times_fewer_or_more(ratio, text):
    from thinwire.report import _fmt_ratio, ratio_text

    assert _fmt_ratio(ratio) == text
    assert ratio_text(ratio, "fedavg") == ("same bytes as fedavg" if text == "same" else f"{text} bytes than fedavg")
    assert ratio_text(None, "fedavg") == "-"


def test_compare_over_seeds_reports_mean_and_std(compared, tmp_path):
    with pytest.raises(UsageError, match="both --seeds and --set federation.seed"):
        run_compare(EXAMPLES / "smoke.toml", ["fedit"], [*FAST, "federation.seed=3"], tmp_path / "x", seeds=[0, 1])
    out = tmp_path / "out"
    rows = run_compare(EXAMPLES / "smoke.toml", ["fedit"], [*FAST, "federation.rounds=1"], out, quiet=True,
                       seeds=[0, 1, 2])
    names = ["fedit-seed0", "fedit-seed1", "fedit-seed2"]
    assert [(r["method"], r["status"]) for r in rows] == [(n, "ok") for n in names]
    configs = [(out / n / "config.toml").read_text() for n in names]
    assert [re.search(r"seed = (\d+)", c).group(1) for c in configs] == ["0", "1", "2"]
    assert len({re.sub(r"seed = \d+", "", c) for c in configs}) == 1  # only the seed differs
    summaries = [json.loads((out / n / "summary.json").read_text()) for n in names]
    losses = [s["final_eval"]["loss"] for s in summaries]
    assert len(set(losses)) == 3  # each seed draws its own data and sampling

    with (out / "across_seeds.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["run"] == "fedit" and row["n"] == "3" and row["seeds"] == "0 1 2"
    mean = sum(losses) / 3
    std = (sum((x - mean) ** 2 for x in losses) / 2) ** 0.5
    assert float(row["final_loss_mean"]) == pytest.approx(mean)
    assert float(row["final_loss_std"]) == pytest.approx(std)
    changes = [s["final_eval"]["loss"] - s["base_eval"]["loss"] for s in summaries]
    assert float(row["change_loss_mean"]) == pytest.approx(sum(changes) / 3)
    assert f"{mean:.4f} ± {std:.4f}" in (out / "comparison.md").read_text()
    assert 'id="seeds"' in (out / "report.html").read_text()

    # Mixed with other settings: fedavg and fedit of the first compare are groups of one each.
    mixed = render_report([out, compared[0]], tmp_path / "mixed")
    assert [(r["run"], r["n"]) for r in mixed.seed_rows] == [("fedit", 3), ("fedavg", 1), ("fedit (fedit)", 1)]
    assert mixed.seed_rows[1]["final_loss_std"] is None
    # A second run of a seed (here a copy) is not another seed: it starts a group of its own.
    shutil.copytree(out / "fedit-seed1", tmp_path / "again" / "fedit-seed1")
    repeated = render_report([out, tmp_path / "again"], tmp_path / "repeated")
    assert [(r["seeds"], r["n"]) for r in repeated.seed_rows] == [("0 1 2", 3), ("1", 1)]


def test_across_seeds_gives_each_setting_its_share_of_its_references_gain(compared, tmp_path):
    """A LoRA method's gain is measured against FedIT's on the same seed, both from FedIT's base:
    here a copy of the FedIT run relabelled as CG-FedLLM whose exact match gained half as much, and
    whose loss gained a quarter as much."""
    out = compared[0]
    fedit = json.loads((out / "fedit" / "summary.json").read_text())
    base = {**fedit["base_eval"], "exact_match": 0.0}
    final = {**fedit["final_eval"], "exact_match": 0.4}
    reference = tmp_path / "ref" / "fedit"
    shutil.copytree(out / "fedit", reference)
    (reference / "summary.json").write_text(json.dumps({**fedit, "base_eval": base, "final_eval": final}))
    copy = tmp_path / "cg" / "cgfedllm"
    shutil.copytree(out / "fedit", copy)
    halved = {**final, "exact_match": 0.2, "loss": base["loss"] - 0.25 * (base["loss"] - final["loss"])}
    (copy / "summary.json").write_text(json.dumps({**fedit, "method": "cgfedllm", "base_eval": base,
                                                   "final_eval": halved}))
    config = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config.replace('name = "fedit"', 'name = "cgfedllm"', 1))
    result = render_report([reference, out / "fedavg", copy], tmp_path / "report")
    rows = {r["run"]: r for r in result.seed_rows}
    cg = next(r for r in rows.values() if r["method"] == "cgfedllm")
    assert cg["reference"] == "fedit" and cg["reference_seeds"] == 1
    assert cg["share_exact_match"] == pytest.approx(0.5) and cg["share_loss"] == pytest.approx(0.25)
    assert cg["uplink_bytes_total_mean"] == fedit["uplink_bytes_total"]

    # A variant of FedAvg (another lr) over seeds 0 and 1, with plain FedAvg on seed 0 only: its
    # reference is plain FedAvg on the seed they share, never the variant itself on seed 1.
    plain = json.loads((out / "fedavg" / "summary.json").read_text())
    for seed in (0, 1):
        variant = tmp_path / "variant" / f"fedavg-lr-seed{seed}"
        shutil.copytree(out / "fedavg", variant)
        config = (variant / "config.toml").read_text().replace("lr = 0.003", "lr = 0.004", 1)
        (variant / "config.toml").write_text(config.replace("seed = 0", f"seed = {seed}", 1))
        (variant / "summary.json").write_text(json.dumps({**plain, "seed": seed}))
    mixed = render_report([out / "fedavg", tmp_path / "variant"], tmp_path / "mixed")
    by_label = {r["run"]: r for r in mixed.seed_rows}
    assert by_label["fedavg-lr"]["n"] == 2 and by_label["fedavg-lr"]["reference_seeds"] == 1
    assert by_label["fedavg-lr"]["reference"] != "fedavg-lr" and by_label["fedavg-lr"]["share_loss"] == pytest.approx(1.0)
    fedavg = next(r for r in rows.values() if r["method"] == "fedavg")
    assert fedavg["reference"] == "fedavg" and fedavg["share_loss"] == pytest.approx(1.0)


def test_seed_statistics_and_parsing():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx((7 / 3) ** 0.5)
    assert mean_std([5.0]) == (5.0, None) and mean_std([]) == (None, None)
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", ","):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_report_skips_incomplete_directories(compared, tmp_path):
    out, _ = compared
    runs = tmp_path / "runs"
    shutil.copytree(out / "fedit", runs / "fedit")
    shutil.copytree(out / "fedit", runs / "interrupted.partial")
    shutil.copytree(out / "fedit", runs / "garbage")
    (runs / "garbage" / "summary.json").write_text("{not json")
    shutil.copytree(out / "fedit", runs / "old")
    (runs / "old" / "summary.json").write_text(json.dumps({"method": "fedit", "rounds": 2}))
    shutil.copytree(out / "fedit", runs / "no-metrics")
    (runs / "no-metrics" / "metrics.jsonl").unlink()
    shutil.copytree(out / "fedit", runs / "bad-line")
    with (runs / "bad-line" / "metrics.jsonl").open("a") as handle:
        handle.write("{truncated\n")
    (runs / "notes").mkdir()  # not a run directory at all: ignored inside a container

    result = render_report([runs, tmp_path / "missing"], tmp_path / "report")
    assert [r["run"] for r in result.rows] == ["fedit"]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert set(reasons) == {"missing", "interrupted.partial", "garbage", "old", "no-metrics", "bad-line"}
    assert "does not exist" in reasons["missing"]
    assert ".partial" in reasons["interrupted.partial"]
    assert "not valid JSON" in reasons["garbage"]
    assert "lacks" in reasons["old"] and "final_eval" in reasons["old"]
    assert "no metrics.jsonl" in reasons["no-metrics"]
    assert "line 3" in reasons["bad-line"]
    html = (tmp_path / "report" / "report.html").read_text()
    for name in reasons:
        assert name in html

    assert "estimate" not in html.replace("never an estimate", "")

    with pytest.raises(UsageError) as info:
        render_report([runs / "garbage", runs / "interrupted.partial"], tmp_path / "nothing")
    assert "no usable run directory" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "nothing").exists()


def test_compare_keeps_finished_runs_and_resumes_the_rest(compared, tmp_path):
    """A compare into a directory that holds finished runs of the same config keeps them as they
    are and runs only what is missing; the report covers both."""
    out = tmp_path / "out"
    shutil.copytree(compared[0] / "fedavg", out / "fedavg")
    before = (out / "fedavg" / "summary.json").read_bytes()
    rows = run_compare(EXAMPLES / "smoke.toml", ["fedavg", "fedit"], FAST, out, quiet=True)
    assert [(r["method"], r["status"], r.get("reused", False)) for r in rows] == \
        [("fedavg", "ok", True), ("fedit", "ok", False)]
    assert (out / "fedavg" / "summary.json").read_bytes() == before  # not run again
    assert rows[0]["summary"] == json.loads(before)
    assert set(_csv_rows(out / "comparison.csv")) == {"fedavg", "fedit"}
    # the run that was missing is the same as in the first compare (deterministic)
    fresh, first = (json.loads((d / "fedit" / "summary.json").read_text()) for d in (out, compared[0]))
    assert fresh["final_eval"] == first["final_eval"] and fresh["uplink_bytes_total"] == first["uplink_bytes_total"]
    # continuing once more runs nothing
    again = run_compare(EXAMPLES / "smoke.toml", ["fedavg", "fedit"], FAST, out, quiet=True)
    assert all(r.get("reused") for r in again)
    # a directory in the way that is not a finished run is refused
    (out / "fedit" / "summary.json").unlink()
    with pytest.raises(UsageError, match="holds no finished run"):
        run_compare(EXAMPLES / "smoke.toml", ["fedit"], FAST, out, quiet=True)


def test_compare_resumes_an_interrupted_run(compared, tmp_path, monkeypatch):
    """A method that stopped mid-run leaves `<name>.partial` with its checkpoint; the next compare
    into the same directory resumes it and ends exactly where an uninterrupted run does."""
    from conftest import crash_in_round

    restore = crash_in_round(monkeypatch, "fedit", 2, RuntimeError("power cut"))
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="every method failed"):
        run_compare(EXAMPLES / "smoke.toml", ["fedit"], FAST, out, quiet=True)
    assert (out / "fedit.partial" / "checkpoint").is_dir()
    round_1 = (out / "fedit.partial" / "metrics.jsonl").read_text().splitlines()[0]
    restore()
    (row,) = run_compare(EXAMPLES / "smoke.toml", ["fedit"], FAST, out, quiet=True)
    assert row["status"] == "ok" and not (out / "fedit.partial").exists()
    # resumed, not run again: round 1's record (its timings included) is the interrupted run's
    assert (out / "fedit" / "metrics.jsonl").read_text().splitlines()[0] == round_1
    assert (out / "fedit" / "final_state.safetensors").read_bytes() == \
        (compared[0] / "fedit" / "final_state.safetensors").read_bytes()


def _as_method(src: Path, dst: Path, method: str, phases: dict | None = None, model: str | None = None) -> None:
    """A copy of a finished run that claims another method (report-only checks)."""
    shutil.copytree(src, dst)
    summary = json.loads((dst / "summary.json").read_text())
    summary["method"] = method
    summary["model"] = model or summary["model"]
    if phases is not None:
        summary["phases"] = phases
    (dst / "summary.json").write_text(json.dumps(summary))


def test_report_ratios_against_a_measured_baseline_and_per_phase(compared, tmp_path):
    """LoRA methods are compared with the FedIT run, full-parameter ones with the FedAvg run, both
    measured in the same report; without that run there is no ratio and the report says so.
    Per-phase traffic is reported as such."""
    out, _ = compared
    fedit = json.loads((out / "fedit" / "summary.json").read_text())
    faf = {"rounds": 1, "client_rounds": 2, "uplink_bytes_total": 200, "downlink_bytes_total": 4000,
           "uplink_bytes_per_client_round": 100.0, "downlink_bytes_per_client_round": 2000.0}
    tgap = {**faf, "uplink_bytes_total": 8000, "uplink_bytes_per_client_round": 4000.0}
    runs = tmp_path / "runs"
    _as_method(out / "fedit", runs / "cg", "cgfedllm", {"tgap": tgap, "faf": faf})
    _as_method(out / "fedavg", runs / "kseed", "fedkseed")
    _as_method(out / "fedit", runs / "pt", "fedpt", model="tiny-small")  # trains tiny-small, evaluates tiny
    shutil.copytree(out / "fedavg", runs / "fedavg")

    alone = render_report([runs], tmp_path / "alone")  # no FedIT run: no ratio for the LoRA method
    rows = {r["run"]: r for r in alone.rows}
    assert rows["cgfedllm"]["traffic_ratio_vs_baseline"] is None
    assert rows["cgfedllm"]["traffic_baseline"] == "no fedit run of tiny in this comparison"
    assert rows["fedkseed"]["traffic_baseline"] == "fedavg" and rows["fedkseed"]["traffic_ratio_vs_baseline"] == 1.0
    markdown = (tmp_path / "alone" / "comparison.md").read_text()
    assert "No ratio for cgfedllm: no fedit run of tiny in this comparison." in markdown
    assert "FedAvg would" not in markdown

    shutil.copytree(out / "fedit", runs / "fedit")
    both = render_report([runs], tmp_path / "both")
    rows = {r["run"]: r for r in both.rows}
    cg = rows["cgfedllm"]
    assert cg["traffic_baseline"] == "fedit"
    assert cg["traffic_ratio_vs_baseline"] == pytest.approx(1.0)  # a copy of the FedIT run's figures
    assert rows["fedavg"]["traffic_baseline"] == "fedavg"
    assert rows["fedpt"]["traffic_baseline"] == "fedit"  # FedIT on the large model FedPT evaluates
    assert cg["phase_faf_uplink_bytes_per_client_round"] == 100.0 and cg["phase_tgap_rounds"] == 1
    assert [(p["run"], p["phase"]) for p in both.phase_rows] == [("cgfedllm", "tgap"), ("cgfedllm", "faf")]
    assert both.phase_rows[1]["uplink_ratio_vs_baseline"] == pytest.approx(
        100.0 / fedit["uplink_bytes_per_client_round"])
    with (tmp_path / "both" / "by_phase.csv").open() as handle:
        assert [(r["run"], r["phase"], r["uplink_bytes_total"]) for r in csv.DictReader(handle)] == \
            [("cgfedllm", "tgap", "8000"), ("cgfedllm", "faf", "200")]
    markdown = (tmp_path / "both" / "comparison.md").read_text()
    html = (tmp_path / "both" / "report.html").read_text()
    assert "## Traffic by phase" in markdown and 'id="phases"' in html


def test_report_shows_the_epsilon_each_run_spent(compared, tmp_path):
    """A private run's ε (at its δ) is in every table; a run without DP says none."""
    from thinwire.config import load_config
    from thinwire.runtime.local import run_local

    out, _ = compared
    runs = tmp_path / "runs"
    shutil.copytree(out / "fedavg", runs / "plain")
    config = load_config(EXAMPLES / "smoke.toml", [*FAST, "privacy.dp='central'", "privacy.clip_norm=0.1",
                                                   "privacy.noise_multiplier=1.0"])
    epsilon = run_local(config, runs / "private", quiet=True)["privacy"]["epsilon"]
    assert 0 < epsilon < float("inf")
    report = render_report([runs], tmp_path / "report")
    rows = {Path(r["run_dir"]).name: r for r in report.rows}
    assert rows["plain"]["privacy"] == "none" and rows["plain"]["epsilon"] is None
    assert rows["private"]["epsilon"] == epsilon
    cell = f"ε {epsilon:.2f}, δ 1e-05 (central)"
    assert rows["private"]["privacy"] == cell
    assert cell in (tmp_path / "report" / "comparison.md").read_text()
    assert cell in (tmp_path / "report" / "report.html").read_text()


def test_report_with_many_runs_labels_them_apart(compared, tmp_path):
    out, _ = compared
    for i in range(10):
        shutil.copytree(out / ("fedavg" if i % 2 else "fedit"), tmp_path / "many" / f"run{i}")
    result = render_report([tmp_path / "many"], tmp_path / "report")
    labels = [r["run"] for r in result.rows]
    assert len(labels) == len(set(labels)) == 10 and "fedit (run0)" in labels
    assert all(p.stat().st_size > 10_000 for p in result.plots)


# ---------------------------------------------------------------------------------------------
# The HTML in a real browser

CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-decoded", String(decoded.length));
  document.body.setAttribute("data-widths", imgs.map(function (i) { return i.naturalWidth; }).join(","));
});
</script>"""


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium; installed with apt when missing (skip only if that is impossible)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                           env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, check=False)


def _png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_report_html_renders_in_headless_chromium(compared, chromium, tmp_path):
    out, rows = compared
    page = (out / "report.html").read_text()
    check = out / "browser-check.html"
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        result = _browser(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                          check.as_uri())
    finally:
        check.unlink()
    dom = result.stdout
    assert result.returncode == 0 and "<body" in dom, result.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body))
    assert attrs.get("data-images") == str(len(PLOTS)), body
    assert attrs.get("data-decoded") == str(len(PLOTS)), body
    assert attrs["data-widths"].split(",") == [str(_png_width(out / name)) for name in PLOTS]
    for name in PLOTS:
        assert f'data-name="{name}"' in dom
    for method in ("fedavg", "fedit"):
        assert dom.count(f'<tr data-run="{method}">') == 2  # quality table and cost table
    assert FAILING in dom and "boom in client fit" in dom

    shot = tmp_path / "shot.png"
    result = _browser(chromium, tmp_path / "profile2", "--window-size=1280,2000", f"--screenshot={shot}",
                      (out / "report.html").as_uri())
    assert result.returncode == 0 and shot.stat().st_size > 20_000, result.stderr[-2000:]
