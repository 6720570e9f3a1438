"""Run directories -> the comparison's tables: the runs read back (`Run`, skipping what is not a
complete run, with its reason), each run's baseline (FedIT for LoRA methods, FedAvg for
full-parameter ones) and its rows: one per run (comparison.csv), per phase (by_phase.csv) and
per task (by_task.csv). report.py renders them; nothing here draws or writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from thinwire.privacy import privacy_text
from thinwire.runtime.rundir import PREDICTIONS_FILE

SUMMARY_KEYS = ("method", "model", "rounds", "base_eval", "final_eval", "uplink_bytes_total",
                "downlink_bytes_total", "uplink_bytes_per_client_round",
                "downlink_bytes_per_client_round", "wall_s", "peak_rss_mb")
RUN_FILES = ("summary.json", "metrics.jsonl", "config.toml")
COMPARE_FILE = "compare.json"
QUALITY_ORDER = ("rougeL", "exact_match", "loss")


@dataclass
class Run:
    """One usable run directory, parsed."""
    path: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    config: dict[str, Any]  # flattened `section.key` -> value ({} when config.toml is unreadable)
    label: str = ""
    by_task: dict[str, dict[str, float]] = field(default_factory=dict)  # from predictions.jsonl, if any

    @property
    def method(self) -> str:
        return str(self.summary["method"])


# ---------------------------------------------------------------------------------------------
# Reading run directories


def is_run_dir(path: Path) -> bool:
    return path.name.endswith(".partial") or any((path / name).exists() for name in RUN_FILES)


def expand_dirs(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[str, str]]]:
    """Each path is a run directory or a directory of run directories (one level, like compare's
    output). Returns (candidate run dirs, skipped with reasons, failures recorded by compare)."""
    candidates: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if not path.exists():
            skipped.append((path, "does not exist"))
        elif not path.is_dir():
            skipped.append((path, "not a directory"))
        elif is_run_dir(path):
            candidates.append(path)
        else:
            order = _compare_order(path)
            subdirs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                             key=lambda p: (order.get(p.name.removesuffix(".partial"), len(order)), p.name))
            failed.extend(_compare_failures(path))
            runs = [p for p in subdirs if is_run_dir(p)]
            if not runs and not failed:
                skipped.append((path, "not a run directory (no summary.json, metrics.jsonl or "
                                      "config.toml) and holds no run directories"))
            candidates.extend(runs)
    seen: set[Path] = set()
    unique = []
    for path in candidates:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, skipped, failed


def _compare_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads((path / COMPARE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("methods"), list) else {}


def _compare_order(path: Path) -> dict[str, int]:
    """Method order of a compare output directory (run directories are named after methods)."""
    names = [r.get("method") for r in _compare_record(path).get("methods", []) if isinstance(r, dict)]
    return {str(name): i for i, name in enumerate(names) if isinstance(name, str)}


def _compare_failures(path: Path) -> list[tuple[str, str]]:
    """Methods that `thinwire compare` recorded as failed in `<dir>/compare.json`."""
    return [(str(r["method"]), str(r.get("reason") or "failed"))
            for r in _compare_record(path).get("methods", [])
            if isinstance(r, dict) and r.get("status") == "failed" and "method" in r]


def load_run(path: Path) -> Run | str:
    """A parsed run, or the one-line reason it cannot be used."""
    if path.name.endswith(".partial"):
        return "interrupted or failed run (.partial): it never finished"
    for name in ("summary.json", "metrics.jsonl"):
        if not (path / name).is_file():
            return f"no {name}: not a finished run directory"
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"summary.json is not valid JSON ({_short(exc)})"
    except OSError as exc:
        return f"cannot read summary.json ({exc.strerror})"
    if not isinstance(summary, dict):
        return "unknown format: summary.json is not a JSON object"
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        return f"older or unknown format: summary.json lacks {', '.join(missing)}"
    problem = _check_summary(summary)
    if problem:
        return f"unknown format: {problem}"
    rounds = []
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read metrics.jsonl ({_short(exc)})"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            return f"metrics.jsonl line {number} is not valid JSON ({_short(exc)})"
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            return f"unknown format: metrics.jsonl line {number} has no integer 'round'"
        rounds.append(record)
    if not rounds:
        return "metrics.jsonl holds no rounds"
    return Run(path, summary, sorted(rounds, key=lambda r: r["round"]), _read_config(path), by_task=_read_by_task(path))


def _read_by_task(path: Path) -> dict[str, dict[str, float]]:
    """Final scores per task from predictions.jsonl ({} when absent or unreadable: older runs)."""
    from thinwire.evaluate import by_task

    try:
        return by_task([json.loads(line) for line in (path / PREDICTIONS_FILE).read_text().splitlines() if line])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {}


def _check_summary(summary: dict[str, Any]) -> str | None:
    for key in ("base_eval", "final_eval"):
        value = summary[key]
        if not isinstance(value, dict) or not all(is_number(v) or v is None for v in value.values()):
            return f"summary.json {key} is not a dict of numbers"
    for key in SUMMARY_KEYS[5:]:
        if not is_number(summary[key]):
            return f"summary.json {key} is not a number"
    if not isinstance(summary["method"], str):
        return "summary.json method is not a string"
    return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        table = tomllib.loads((path / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", table)
    return flat


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Figures per run


def metric_keys(runs: list[Run]) -> list[str]:
    """Evaluation metrics present in any run: rougeL, exact_match, loss, heldout_*, others."""
    keys = {k for run in runs for k in (*run.summary["final_eval"], *run.summary["base_eval"])}
    return sorted(keys, key=metric_order)


def metric_order(key: str) -> tuple:
    base = key.removeprefix("heldout_")
    rank = QUALITY_ORDER.index(base) if base in QUALITY_ORDER else len(QUALITY_ORDER)
    return (key.startswith("heldout_"), rank, base)


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if is_number(v)]
    return sum(numbers) / len(numbers) if numbers else None


# Each method's traffic baseline: FedIT for methods that train a LoRA adapter, FedAvg for those
# that train every weight (Ferret: by `method.ferret.trainable`).
LORA_METHODS = ("fedit", "cgfedllm", "fedpt")
FULL_METHODS = ("fedavg", "fedkseed", "fedkseed-pro")


def baseline_method(run: Run) -> str | None:
    """The method `run`'s traffic is compared against (None: no baseline defined for it)."""
    if run.method == "ferret":
        trainable = run.config.get("method.ferret.trainable")
        return None if trainable is None else "fedit" if trainable == "lora" else "fedavg"
    return "fedit" if run.method in LORA_METHODS else "fedavg" if run.method in FULL_METHODS else None


def evaluated_model(run: Run) -> str:
    """The model whose quality the run reports: FedPT trains its small device model but evaluates
    the large one it proxy-tunes, so its baseline is FedIT on that large model."""
    model = run.summary["model"]
    if run.method != "fedpt":
        return model
    from thinwire.models import large_of

    return run.config.get("method.fedpt.large") or large_of(model) or model


def find_baseline(run: Run, runs: list[Run]) -> tuple[Run | None, str]:
    """The measured baseline run for `run` among `runs`, or None and why there is none.

    A run of the baseline method on the same model; of the same seed where there is one; the run
    named after the method (`fedit`, `fedit-seed1`) before a variant of it."""
    method = baseline_method(run)
    if method is None:
        return None, ("its config.toml lacks method.ferret.trainable" if run.method == "ferret"
                      else f"no baseline is defined for {run.method}")
    model, seed = evaluated_model(run), run.summary.get("seed")
    pool = [b for b in runs if b.method == method and b.summary["model"] == model]
    pool = [b for b in pool if b.summary.get("seed") == seed] or pool
    if not pool:
        return None, f"no {method} run of {model} in this comparison"
    plain = [b for b in pool if b.path.name in (method, f"{method}-seed{seed}")]
    return (plain or pool)[0], method


def _ratio(value: Any, reference: Any) -> float | None:
    return value / reference if is_number(value) and is_number(reference) and reference else None


def _per_round(figures: dict[str, Any]) -> float:
    return figures["uplink_bytes_per_client_round"] + figures["downlink_bytes_per_client_round"]


def _phases(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """summary.json's `phases` in the order the run went through them (the file sorts its keys)."""
    phases = run.summary.get("phases") or {}
    order = list(dict.fromkeys(r.get("phase") for r in run.rounds if r.get("phase") in phases))
    return [(p, phases[p]) for p in [*order, *(p for p in phases if p not in order)]]


def phase_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (run, phase) of the runs whose method has phases (summary.json `phases`): the
    phase's traffic, and its uplink per client-round against the baseline's whole run."""
    rows = []
    for run in runs:
        base, _ = find_baseline(run, runs)
        for phase, figures in _phases(run):
            rows.append({"run": run.label, "phase": phase, **figures,
                         "uplink_ratio_vs_baseline": _ratio(figures.get("uplink_bytes_per_client_round"),
                                                            base and base.summary["uplink_bytes_per_client_round"]),
                         "baseline": base.label if base else None})
    return rows


def any_private(rows: list[dict[str, Any]]) -> bool:
    return any(row["privacy"] != "none" for row in rows)


def round_times(run: Run) -> list[dict[str, Any]]:
    """Each round's `time_s` split (total, local, aggregate, eval), {} where a round lacks one."""
    return [r.get("time_s") if isinstance(r.get("time_s"), dict) else {} for r in run.rounds]


def build_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run. Traffic is whole-run (every byte sent, summary.json); per client-round is
    all bytes sent / downloads sent; ratios compare per-client-round figures with the baseline run
    measured in the same comparison (`find_baseline`), and are empty when it is absent."""
    keys = metric_keys(runs)
    rows = []
    for run in runs:
        s = run.summary
        row: dict[str, Any] = {
            "run": run.label, "method": run.method, "run_dir": str(run.path), "model": s["model"],
            "rounds": s["rounds"], "clients": s.get("clients"),
            "clients_per_round": s.get("clients_per_round"), "seed": s.get("seed"),
            "privacy": privacy_text(s), "epsilon": (s.get("privacy") or {}).get("epsilon"),
        }
        for key in keys:
            row[f"base_{key}"] = s["base_eval"].get(key)
            row[f"final_{key}"] = s["final_eval"].get(key)
        base, how = find_baseline(run, runs)
        b = base.summary if base else {}
        times = round_times(run)
        row.update({
            "uplink_bytes_per_client_round": s["uplink_bytes_per_client_round"],
            "downlink_bytes_per_client_round": s["downlink_bytes_per_client_round"],
            "bytes_per_client_round": _per_round(s),
            "client_rounds": s.get("client_rounds"),
            "uplink_bytes_total": s["uplink_bytes_total"],
            "downlink_bytes_total": s["downlink_bytes_total"],
            "bytes_total": s["uplink_bytes_total"] + s["downlink_bytes_total"],
            "uplink_bytes_accepted_total": s.get("uplink_bytes_accepted_total"),
            "downlink_bytes_accepted_total": s.get("downlink_bytes_accepted_total"),
            "traffic_baseline": base.label if base else how,
            "uplink_ratio_vs_baseline": _ratio(s["uplink_bytes_per_client_round"],
                                               b.get("uplink_bytes_per_client_round")),
            "downlink_ratio_vs_baseline": _ratio(s["downlink_bytes_per_client_round"],
                                                 b.get("downlink_bytes_per_client_round")),
            "traffic_ratio_vs_baseline": _ratio(_per_round(s), base and _per_round(b)),
            "round_s_mean": _mean([t.get("total") for t in times]),
            "local_s_mean": _mean([t.get("local") for t in times]),
            "aggregate_s_mean": _mean([t.get("aggregate") for t in times]),
            "eval_s_mean": _mean([t.get("eval") for t in times]),
            "wall_s": s["wall_s"],
            "peak_rss_mb": s["peak_rss_mb"],
            "trainable_parameters": s.get("trainable_parameters"),
        })
        for phase, figures in _phases(run):
            for key in ("rounds", "uplink_bytes_per_client_round", "downlink_bytes_per_client_round",
                        "uplink_bytes_total", "downlink_bytes_total"):
                row[f"phase_{phase}_{key}"] = figures.get(key)
        rows.append(row)
    return rows


def task_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (run, task) of the runs' final evaluations, as in by_task.csv."""
    return [{"run": run.label, "task": task, **scores} for run in runs for task, scores in run.by_task.items()]


def task_table(runs: list[Run]) -> tuple[list[str], list[Run], list[list[str]]]:
    """(tasks, runs with per-task scores, cells[task][run]): exact match / Rouge-L, or loss."""
    with_tasks = [run for run in runs if run.by_task]
    tasks = list(dict.fromkeys(t for run in with_tasks for t in run.by_task))

    def cell(scores: dict[str, float] | None) -> str:
        if scores is None:
            return "-"
        if "exact_match" in scores:
            return f"{scores['exact_match']:.2f} / {scores['rougeL']:.2f}"
        return f"loss {scores['loss']:.3f}"

    return tasks, with_tasks, [[cell(run.by_task.get(t)) for run in with_tasks] for t in tasks]
