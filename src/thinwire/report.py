"""Run directories -> a side-by-side comparison: `comparison.csv`, `comparison.md`, PNG plots and
one self-contained `report.html` (plots embedded as data URIs, inline CSS, no script, no network).
This module renders; the runs and their rows come from tables.py.
Runs of one setting over several seeds are also summarised as mean ± std (`across_seeds.csv`,
across_seeds.py); runs that kept their final predictions are broken down by task (`by_task.csv`).

Traffic is whole-run (every byte sent, summary.json); methods with phases (CG-FedLLM's TGAP and
FAF rounds) also get it per phase (`by_phase.csv`), labelled as such. Each run's traffic is
compared with its baseline run measured in the same report (FedIT for LoRA methods, FedAvg for
full-parameter ones); without that run there is no ratio, and the report says so.

Everything comes from what a run wrote (`summary.json`, `metrics.jsonl`, `config.toml`), so a
report can be re-rendered at any time. A directory that is not a complete run (an interrupted
`<x>.partial`, missing or unparsable files, an unknown format) is skipped with its reason.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thinwire.across_seeds import SHARE_HEADER, format_mean_std, format_share, group_rows, seed_groups
from thinwire.errors import UsageError
from thinwire.runtime.display import human_bytes, random_model_note
from thinwire.runtime.rundir import atomic_write
from thinwire.tables import (
    Run,
    any_private,
    build_rows,
    expand_dirs,
    is_number,
    load_run,
    metric_keys,
    metric_order,
    phase_rows,
    task_rows,
    task_table,
)

SEEDS_CSV = "across_seeds.csv"
TASKS_CSV = "by_task.csv"
PHASES_CSV = "by_phase.csv"
PLOTS = ("quality_per_round.png", "quality_vs_bytes.png", "quality_vs_time.png")
METRIC_LABELS = {"rougeL": "Rouge-L", "exact_match": "exact match", "loss": "loss",
                 "rougeL_folded": "Rouge-L (case-folded)", "exact_match_folded": "exact match (case-folded)"}
# Header facts, in display order: (dotted config key, label).
FACTS = (("model.name", "model"), ("model.dtype", "dtype"), ("data.source", "data"),
         ("data.tasks", "tasks"), ("data.heldout_tasks", "held-out tasks"),
         ("data.partition", "partition"), ("data.examples_per_client", "examples / client"),
         ("federation.clients", "clients"), ("federation.clients_per_round", "clients / round"),
         ("federation.rounds", "rounds"), ("federation.seed", "seed"),
         ("train.local_steps", "local steps"), ("train.batch_size", "batch"), ("train.lr", "lr"),
         ("train.optimizer", "optimizer"), ("eval.max_examples", "eval examples"),
         ("eval.generate", "generation"), ("eval.every", "eval every"))


@dataclass
class ReportResult:
    out: Path
    html: Path
    csv: Path
    markdown: Path
    plots: list[Path]
    rows: list[dict[str, Any]]  # one per usable run, as written to comparison.csv
    runs: list[Path]  # the run directories used, in row order
    seeds_csv: Path | None = None
    tasks_csv: Path | None = None
    seed_rows: list[dict[str, Any]] = field(default_factory=list)  # one per setting, as in across_seeds.csv
    phase_rows: list[dict[str, Any]] = field(default_factory=list)  # one per (run, phase), as in by_phase.csv
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (directory, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (method, reason) from compare


TASKS_NOTE = "final evaluation per task (predictions.jsonl): exact match / Rouge-L"


def _series(run: Run, metric: str) -> dict[str, list[float]]:
    """Per evaluated point (round 0 = base): round, cumulative bytes, cumulative training time, value."""
    out = {"round": [], "bytes": [], "time": [], "value": []}
    base = run.summary["base_eval"].get(metric)
    if is_number(base):
        for key, value in (("round", 0), ("bytes", 0), ("time", 0.0), ("value", base)):
            out[key].append(value)
    cum_bytes, cum_time = 0, 0.0
    for record in run.rounds:
        cum_bytes += (record.get("uplink_bytes") or 0) + (record.get("downlink_bytes") or 0)
        t = record.get("time_s") if isinstance(record.get("time_s"), dict) else {}
        spent = t.get("local", 0) + t.get("aggregate", 0) if "local" in t else t.get("total", 0)
        cum_time += spent if is_number(spent) else 0
        value = (record.get("eval") or {}).get(metric) if isinstance(record.get("eval"), dict) else None
        if is_number(value):
            for key, v in (("round", record["round"]), ("bytes", cum_bytes), ("time", cum_time),
                           ("value", value)):
                out[key].append(v)
    return out


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend state)


def _styles(n: int) -> list[dict[str, Any]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["tab20"]
    markers = "osD^vPX*<>"
    return [{"color": cmap(i % cmap.N), "marker": markers[i % len(markers)]} for i in range(n)]


def _plot(runs: list[Run], x: str, title: str, xlabel: str, logx: bool = False) -> bytes:
    from matplotlib.figure import Figure

    panels = [m for m in ("rougeL", "loss") if any(m in r.summary["final_eval"] for r in runs)] or ["loss"]
    styles = _styles(len(runs))
    legend_rows = math.ceil(len(runs) / min(len(runs), 5))
    fig = Figure(figsize=(max(7.0, 5.2 * len(panels)), 3.6 + 0.28 * legend_rows), dpi=110, layout="constrained")
    fig.suptitle(title, fontsize=11)
    heldout_seen = False
    for index, metric in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for run, style in zip(runs, styles):
            for prefix, dashed in (("", False), ("heldout_", True)):
                series = _series(run, prefix + metric)
                points = [(xv, v) for xv, v in zip(series[x], series["value"]) if not (logx and xv <= 0)]
                if not points:
                    continue
                heldout_seen |= dashed
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=style["color"], marker=style["marker"], markersize=4,
                        linewidth=1.6, linestyle="--" if dashed else "-", alpha=0.8 if dashed else 1.0,
                        label=None if dashed else run.label)
        ax.set_title(METRIC_LABELS[metric] + (" (higher is better)" if metric != "loss" else " (lower is better)"),
                     fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(METRIC_LABELS[metric], fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, which="both" if logx else "major")
        if logx:
            _bytes_axis(ax)
        if metric != "loss":  # fractions in [0, 1]: keep 0 in view so flat-zero lines look flat
            top = max([line.get_ydata().max() for line in ax.get_lines() if len(line.get_ydata())] + [0.0])
            ax.set_ylim(-0.02, min(1.02, max(0.1, top * 1.1)))
        if x == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if heldout_seen:
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], color="grey", linestyle="--"))
        labels.append("held-out tasks (dashed)")
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8,
                   frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _bytes_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(value: float, _pos: int) -> str:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if value < 1000 or unit == "TB":
                return f"{value:.3g} {unit}"
            value /= 1000
        return ""

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())


def render_plots(runs: list[Run]) -> dict[str, bytes]:
    return {
        PLOTS[0]: _plot(runs, "round", "Quality per round (round 0: before training)", "round"),
        PLOTS[1]: _plot(runs, "bytes", "Quality against cumulative traffic (up + down, all clients)",
                        "cumulative bytes (log scale)", logx=True),
        PLOTS[2]: _plot(runs, "time", "Quality against wall time (local training + aggregation)",
                        "cumulative wall time excluding evaluation (s)"),
    }


# ---------------------------------------------------------------------------------------------
# Tables: CSV, Markdown, HTML


def _fmt_metric(value: Any) -> str:
    return "-" if not is_number(value) else f"{value:.4f}"


def _fmt_s(value: Any) -> str:
    if not is_number(value):
        return "-"
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"


def _fmt_ratio(value: Any) -> str:
    """A ratio of bytes to the baseline's, read at a glance: 0.00274 -> "365× fewer", 1.2 -> "1.20× more"."""
    if not is_number(value):
        return "-"
    if value <= 0:
        return "no bytes"
    factor = 1 / value if value < 1 else value
    if f"{factor:#.3g}" == "1.00":
        return "same"
    size = f"{factor:,.0f}" if factor >= 100 else f"{factor:#.3g}"
    return f"{size}× {'fewer' if value < 1 else 'more'}"


def ratio_text(value: Any, baseline: str) -> str:
    """`_fmt_ratio` as a phrase naming the baseline: "365× fewer bytes than fedavg" ("-" without a ratio)."""
    if not is_number(value):
        return "-"
    text = _fmt_ratio(value)
    if text == "same":
        return f"same bytes as {baseline}"
    return f"{text} bytes than {baseline}" if value > 0 else text


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buffer.getvalue()


def _best(rows: list[dict[str, Any]], column: str, higher: bool) -> set[int]:
    """Row indices holding the best value of `column` (empty if fewer than two distinct values)."""
    values = {i: row[column] for i, row in enumerate(rows) if is_number(row.get(column))}
    if len(values) < 2 or len(set(values.values())) < 2:
        return set()
    target = max(values.values()) if higher else min(values.values())
    return {i for i, v in values.items() if v == target}


def _higher_is_better(metric: str) -> bool:
    return not metric.endswith("loss")


def _facts(runs: list[Run]) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, value) facts shared by every run, and config keys that differ between runs."""
    def value_of(run: Run, key: str) -> Any:
        if key in run.config:
            return run.config[key]
        fallback = {"model.name": "model", "federation.rounds": "rounds", "federation.clients": "clients",
                    "federation.clients_per_round": "clients_per_round", "federation.seed": "seed"}
        return run.summary.get(fallback.get(key, ""), None)

    common = []
    for key, label in FACTS:
        values = [value_of(run, key) for run in runs]
        if values[0] is not None and all(v == values[0] for v in values) and values[0] not in ([], ""):
            common.append((label, _fact_text(values[0])))
    with_config = [run for run in runs if run.config]
    keys = sorted({k for run in with_config for k in run.config})
    option_tables = tuple(f"method.{run.method}." for run in runs)
    differing = [k for k in keys if k != "method.name" and not k.startswith(option_tables)
                 and len({json.dumps(run.config.get(k), sort_keys=True) for run in with_config}) > 1]
    return common, differing


def differing_values(runs: list[Run], key: str) -> str:
    """A differing config key with its values, each followed by the runs that have it:
    "train.lr = 0.003 (fedavg, fedit); 0.05 (ferret)"."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        if run.config:
            value = run.config.get(key)
            groups.setdefault("(unset)" if value is None else _fact_text(value), []).append(run.label)
    return f"{key} = " + "; ".join(f"{value} ({', '.join(labels)})" for value, labels in groups.items())


def random_model_notes(models: Iterable[Any]) -> list[str]:
    """Why quality stays near zero, for each built-in random model among `models` (model names)."""
    notes = (random_model_note(model) for model in sorted({str(m) for m in models}))
    return [f"Note: {note}." for note in notes if note]


def _fact_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def write_markdown(runs: list[Run], rows: list[dict[str, Any]], skipped: list[tuple[Path, str]],
                   failed: list[tuple[str, str]], seed_rows: list[dict[str, Any]] = ()) -> str:
    keys = metric_keys(runs)
    common, differing = _facts(runs)
    lines = ["# thinwire comparison", ""]
    if common:
        lines += ["; ".join(f"{label}: {value}" for label, value in common), ""]
    lines += [line for note in random_model_notes(r.summary["model"] for r in runs) for line in (note, "")]
    if differing:
        lines += ["Config keys that differ between runs (besides the method):", "",
                  *(f"- {differing_values(runs, k)}" for k in differing), ""]
    private = any_private(rows)
    header = ["run"] + [_metric_label(k) for k in keys] + (["privacy"] if private else [])
    header += ["up / client-round", "down / client-round", "total traffic (whole run)", "up+down vs baseline",
               "round time (local + agg)", "peak RSS"]
    lines += [_md_row(header), "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run"]]
        cells += [f"{_fmt_metric(row[f'base_{k}'])} → {_fmt_metric(row[f'final_{k}'])}" for k in keys]
        cells += [row["privacy"]] if private else []
        cells += [human_bytes(row["uplink_bytes_per_client_round"]),
                  human_bytes(row["downlink_bytes_per_client_round"]), human_bytes(row["bytes_total"]),
                  _ratio_cell(row),
                  f"{_fmt_s(row['round_s_mean'])} ({_fmt_s(row['local_s_mean'])} + "
                  f"{_fmt_s(row['aggregate_s_mean'])})", f"{row['peak_rss_mb']:,.0f} MB"]
        lines.append(_md_row(cells))
    lines.append("")
    lines.append(_reference_note(rows))
    phases = phase_rows(runs)
    if phases:
        header = ["run", "phase", "rounds", "client-rounds", "up / client-round", "down / client-round",
                  "up total", "down total", "up vs baseline"]
        lines += ["", f"## Traffic by phase ({PHASES_NOTE})", "", _md_row(header), "|" + "---|" * len(header)]
        lines += [_md_row(_phase_cells(row)) for row in phases]
    warned = [(run.label, w) for run in runs for w in run.summary.get("warnings") or []]
    if warned:
        lines += ["", "## Warnings", ""] + [f"- {label}: {w}" for label, w in warned]
    if _has_repeats(seed_rows):
        header = (["setting", "seeds"] + [_metric_label(k) + " (change from base)" for k in keys]
                  + [SHARE_HEADER, "up (whole run)", "down (whole run)", "round time"])
        lines += ["", f"## Across seeds ({SEEDS_NOTE})", "", _md_row(header), "|" + "---|" * len(header)]
        lines += [_md_row([row["run"], row["seeds"], *(_seed_cell(row, k) for k in keys), *_seed_costs(row)])
                  for row in seed_rows]
    tasks, with_tasks, cells = task_table(runs)
    if tasks:
        lines += ["", f"## By task ({TASKS_NOTE})", "", _md_row(["task", *(r.label for r in with_tasks)]),
                  "|" + "---|" * (len(with_tasks) + 1)]
        lines += [_md_row([task, *row]) for task, row in zip(tasks, cells)]
    if failed or skipped:
        lines += ["", "## Failed or skipped", ""]
        lines += [f"- {method}: failed: {reason}" for method, reason in failed]
        lines += [f"- {path}: skipped: {reason}" for path, reason in skipped]
    lines += ["", "Plots: " + ", ".join(PLOTS), ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


SEEDS_NOTE = ("mean ± sample std over runs whose configs differ only in federation.seed; share of the "
              "reference's gain: mean gain over the seeds against the reference's (FedIT for LoRA methods, "
              "FedAvg for full-parameter ones) on the same seeds, both from the reference's base")


def _metric_label(key: str) -> str:
    if key.startswith("heldout_"):
        return "held-out " + METRIC_LABELS.get(key[8:], key[8:])
    return METRIC_LABELS.get(key, key)


def _has_repeats(seed_rows: list[dict[str, Any]]) -> bool:
    return any(row["n"] > 1 for row in seed_rows)


def _seed_cell(row: dict[str, Any], key: str) -> str:
    final = format_mean_std(row[f"final_{key}_mean"], row[f"final_{key}_std"])
    return f"{final} ({format_mean_std(row[f'change_{key}_mean'], row[f'change_{key}_std'])})"


def _seed_costs(row: dict[str, Any]) -> list[str]:
    """A group's share of its reference's gain, mean whole-run bytes each way and round time."""
    seconds = row.get("round_s_mean")
    return [format_share(row), human_bytes(row["uplink_bytes_total_mean"]), human_bytes(row["downlink_bytes_total_mean"]),
            "-" if seconds is None else f"{seconds:.0f} s"]


def _reference_note(rows: list[dict[str, Any]]) -> str:
    missing = [f"No ratio for {row['run']}: {row['traffic_baseline']}." for row in rows
               if row["traffic_ratio_vs_baseline"] is None]
    note = ("Traffic counts every byte sent, failed, late and rejected clients included; per client-round = "
            "bytes sent / downloads sent, over the whole run. Ratios: per client-round, against the baseline "
            "run measured in this comparison (FedIT for LoRA methods, FedAvg for full-parameter ones), never "
            "an estimate.")
    return " ".join([note, *missing])


PHASES_NOTE = ("methods whose rounds differ in kind, e.g. CG-FedLLM's TGAP and FAF rounds; each phase's "
               "uplink per client-round against its baseline's whole run")


def _ratio_cell(row: dict[str, Any]) -> str:
    return ratio_text(row["traffic_ratio_vs_baseline"], row["traffic_baseline"])


def _phase_cells(row: dict[str, Any]) -> list[str]:
    ratio = row["uplink_ratio_vs_baseline"]
    return [row["run"], row["phase"], str(row["rounds"]), str(row.get("client_rounds", "-")),
            human_bytes(row["uplink_bytes_per_client_round"]), human_bytes(row["downlink_bytes_per_client_round"]),
            human_bytes(row["uplink_bytes_total"]), human_bytes(row["downlink_bytes_total"]),
            ratio_text(ratio, row["baseline"])]


CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0969da; --best:#dafbe1;
        --bestfg:#116329; --bad:#ffebe9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: #fff; }
header { background: linear-gradient(135deg, #0b3d91, #0969da); color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0 0 12px; opacity: .9; }
.facts { display: flex; flex-wrap: wrap; gap: 6px; margin: 0; padding: 0; list-style: none; }
.facts li { background: rgba(255,255,255,.15); border-radius: 12px; padding: 2px 10px; font-size: 12.5px; }
.facts b { font-weight: 600; margin-right: 4px; opacity: .85; }
main { padding: 20px 32px 40px; max-width: 1500px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: var(--bg); font-weight: 600; }
th.group { text-align: center; }
td.name, th.name { text-align: left; }
td.name { font-weight: 600; }
td.best { background: var(--best); color: var(--bestfg); font-weight: 600; }
.delta { color: var(--muted); font-size: 12px; }
.up { color: #1a7f37; } .down { color: #cf222e; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0; max-width: 1000px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; }
ul.problems { padding-left: 20px; } ul.problems li { margin: 3px 0; }
.tag { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; font-weight: 600; }
.tag.failed { background: var(--bad); color: #a40e26; } .tag.skipped { background: #fff8c5; color: #7d4e00; }
code { background: var(--bg); border-radius: 4px; padding: 0 4px; font-size: 12.5px; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
details table { margin: 6px 0 12px; font-size: 12.5px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _td(text: str, best: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in (cls, "best" if best else "") if c)
    return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def _delta_html(base: Any, final: Any, metric: str) -> str:
    if not (is_number(base) and is_number(final)):
        return ""
    delta = final - base
    if delta == 0:
        return ' <span class="delta">(±0)</span>'
    good = delta > 0 if _higher_is_better(metric) else delta < 0
    cls = "up" if good else ("down" if delta else "")
    return f' <span class="delta {cls}">({delta:+.4f})</span>'


def write_html(runs: list[Run], rows: list[dict[str, Any]], plots: dict[str, bytes],
               skipped: list[tuple[Path, str]], failed: list[tuple[str, str]],
               seed_rows: list[dict[str, Any]] = ()) -> str:
    keys = metric_keys(runs)
    common, differing = _facts(runs)
    models = sorted({str(r.summary["model"]) for r in runs})
    methods = ", ".join(row["run"] for row in rows)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>thinwire comparison: {_e(methods)}</title>", f"<style>{CSS}</style></head><body>",
             "<header>", f"<h1>thinwire comparison — {_e(', '.join(models))}</h1>",
             f"<p>{len(rows)} run{'s' if len(rows) != 1 else ''}: {_e(methods)}"
             + (f"; {len(failed) + len(skipped)} failed or skipped" if failed or skipped else "") + "</p>",
             '<ul class="facts">']
    parts += [f"<li><b>{_e(label)}</b>{_e(value)}</li>" for label, value in common]
    notes = random_model_notes(r.summary["model"] for r in runs)
    parts += ["</ul>", *(f'<p class="note">{_e(note)}</p>' for note in notes), "</header>", "<main>"]

    # Quality table
    parts += ["<h2>Quality: before → after federated fine-tuning</h2>", '<div class="scroll"><table id="quality">',
              "<thead><tr><th class=\"name\">run</th>"]
    for key in keys:
        name = _metric_label(key)
        arrow = "↑" if _higher_is_better(key) else "↓"
        parts.append(f"<th>{_e(name)} {arrow}<br><small>base → final</small></th>")
    private = any_private(rows)
    parts.append(("<th>privacy<br><small>ε spent</small></th>" if private else "") + "</tr></thead><tbody>")
    best = {k: _best(rows, f"final_{k}", _higher_is_better(k)) for k in keys}
    for i, row in enumerate(rows):
        parts.append(f'<tr data-run="{_e(row["run"])}">' + _td(_e(row["run"]), cls="name"))
        for k in keys:
            base, final = row[f"base_{k}"], row[f"final_{k}"]
            parts.append(_td(f"{_fmt_metric(base)} → <b>{_fmt_metric(final)}</b>{_delta_html(base, final, k)}",
                             i in best[k]))
        parts.append((_td(_e(row["privacy"])) if private else "") + "</tr>")
    parts.append("</tbody></table></div>")
    if _has_repeats(seed_rows):
        parts += ["<h2>Across seeds</h2>", '<div class="scroll"><table id="seeds">',
                  '<thead><tr><th class="name">setting</th><th>seeds</th>']
        parts += [f"<th>{_e(_metric_label(k))}<br><small>final (change from base)</small></th>" for k in keys]
        parts += [f"<th>{_e(h)}</th>" for h in (SHARE_HEADER, "up (whole run)", "down (whole run)", "round time")]
        parts.append("</tr></thead><tbody>")
        for row in seed_rows:
            parts.append(f'<tr data-run="{_e(row["run"])}">' + _td(_e(row["run"]), cls="name")
                         + _td(_e(row["seeds"])) + "".join(_td(_e(_seed_cell(row, k))) for k in keys)
                         + "".join(_td(_e(c)) for c in _seed_costs(row)) + "</tr>")
        parts.append(f'</tbody></table></div><p class="note">{_e(SEEDS_NOTE)}.</p>')
    tasks, with_tasks, cells = task_table(runs)
    if tasks:
        parts += ["<h2>By task</h2>", '<div class="scroll"><table id="tasks">', '<thead><tr><th class="name">task</th>']
        parts += [f"<th>{_e(run.label)}</th>" for run in with_tasks]
        parts.append("</tr></thead><tbody>")
        parts += [f"<tr>{_td(_e(task), cls='name')}" + "".join(_td(_e(c)) for c in row) + "</tr>"
                  for task, row in zip(tasks, cells)]
        parts.append(f'</tbody></table></div><p class="note">{_e(TASKS_NOTE)}.</p>')

    # Cost table
    cost_columns = [  # (column, header, formatter, lower is better)
        ("uplink_bytes_per_client_round", "uplink<br><small>per client-round</small>", human_bytes),
        ("downlink_bytes_per_client_round", "downlink<br><small>per client-round</small>", human_bytes),
        ("uplink_bytes_total", "uplink<br><small>whole run</small>", human_bytes),
        ("downlink_bytes_total", "downlink<br><small>whole run</small>", human_bytes),
        ("uplink_ratio_vs_baseline", "uplink vs baseline<br><small>per client-round</small>", _fmt_ratio),
        ("traffic_ratio_vs_baseline", "up+down vs baseline<br><small>per client-round</small>", _fmt_ratio),
        ("round_s_mean", "time / round<br><small>mean, all</small>", _fmt_s),
        ("local_s_mean", "local<br><small>mean / round</small>", _fmt_s),
        ("aggregate_s_mean", "aggregation<br><small>mean / round</small>", _fmt_s),
        ("wall_s", "wall<br><small>whole run</small>", _fmt_s),
        ("peak_rss_mb", "peak RSS", lambda v: f"{v:,.0f} MB"),
    ]
    parts += ["<h2>Cost: traffic, time, memory</h2>", '<div class="scroll"><table id="cost">',
              '<thead><tr><th class="name">run</th>']
    parts += [f"<th>{header} ↓</th>" for _, header, _ in cost_columns]
    parts.append("<th>baseline</th></tr></thead><tbody>")
    cost_best = {c: _best(rows, c, False) for c, _, _ in cost_columns}
    for i, row in enumerate(rows):
        parts.append(f'<tr data-run="{_e(row["run"])}">' + _td(_e(row["run"]), cls="name"))
        for column, _, formatter in cost_columns:
            value = row[column]
            parts.append(_td(_e(formatter(value)) if is_number(value) else "-", i in cost_best[column]))
        measured = is_number(row["traffic_ratio_vs_baseline"])
        parts.append(_td(_e(row["traffic_baseline"]) if measured else "-", cls="name") + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append(f'<p class="note">{_e(_reference_note(rows))} Best value per column highlighted. '
                 "Time per round includes evaluation; local time is the sum over the round's clients, "
                 "run one after another.</p>")
    if differing:
        parts.append('<p class="note">Config keys that differ between runs besides the method:</p><ul class="note">'
                     + "".join(f"<li><code>{_e(differing_values(runs, k))}</code></li>" for k in differing) + "</ul>")
    phases = phase_rows(runs)
    if phases:
        head = ["run", "phase", "rounds", "client-rounds", "uplink / client-round", "downlink / client-round",
                "uplink total", "downlink total", "uplink vs baseline"]
        parts += ["<h2>Traffic by phase</h2>", '<div class="scroll"><table id="phases"><thead><tr>']
        parts += [f'<th{" class=name" if i < 2 else ""}>{_e(h)}</th>' for i, h in enumerate(head)]
        parts.append("</tr></thead><tbody>")
        parts += ["<tr>" + "".join(_td(_e(c), cls="name" if i < 2 else "") for i, c in enumerate(_phase_cells(row)))
                  + "</tr>" for row in phases]
        parts.append(f'</tbody></table></div><p class="note">Per phase: {_e(PHASES_NOTE)}.</p>')
    warned = [(run.label, w) for run in runs for w in run.summary.get("warnings") or []]
    if warned:
        parts += ["<h2>Warnings</h2>", '<ul class="problems" id="warnings">']
        parts += [f"<li><b>{_e(label)}</b>: {_e(w)}</li>" for label, w in warned]
        parts.append("</ul>")

    # Plots
    parts += ["<h2>Plots</h2>", '<div class="grid">']
    captions = {PLOTS[0]: "Rouge-L and evaluation loss after each round; round 0 is the base model.",
                PLOTS[1]: "Quality against cumulative bytes moved (uplink + downlink, all clients); log x axis.",
                PLOTS[2]: "Quality against cumulative wall time of local training and aggregation."}
    for name, data in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img class="plot" src="{uri}" alt="{_e(name)}" data-name="{_e(name)}">'
                     f"<figcaption>{_e(captions.get(name, name))} (<code>{_e(name)}</code>)</figcaption></figure>")
    parts.append("</div>")

    # Failures and skipped directories
    if failed or skipped:
        parts += ["<h2>Failed or skipped</h2>", '<ul class="problems" id="problems">']
        parts += [f'<li><span class="tag failed">failed</span> <b>{_e(m)}</b>: {_e(r)}</li>' for m, r in failed]
        parts += [f'<li><span class="tag skipped">skipped</span> <code>{_e(p)}</code>: {_e(r)}</li>'
                  for p, r in skipped]
        parts.append("</ul>")

    # Per-round details
    parts.append("<h2>Per round</h2>")
    for run in runs:
        parts.append(_round_details(run))
    parts.append('<p class="note">Runs: ' + ", ".join(f"<code>{_e(r.path)}</code>" for r in runs) + "</p>")
    parts += ["</main>", "</body></html>", ""]
    return "\n".join(parts)


def _round_details(run: Run) -> str:
    evals = sorted({k for r in run.rounds if isinstance(r.get("eval"), dict) for k in r["eval"]},
                   key=metric_order)
    phased = any(r.get("phase") is not None for r in run.rounds)
    head = ["round", *(["phase"] if phased else []), "clients ok", "uplink sent", "downlink sent", "train loss",
            *evals, "local", "aggregate", "total"]
    rows = []
    for r in run.rounds:
        t = r.get("time_s") if isinstance(r.get("time_s"), dict) else {}
        e = r.get("eval") if isinstance(r.get("eval"), dict) else {}
        cells = [r["round"], *([r.get("phase") or "-"] if phased else []),
                 f"{r.get('clients_ok', '-')}/{r.get('clients_sampled', '-')}",
                 human_bytes(r["uplink_bytes"]) if is_number(r.get("uplink_bytes")) else "-",
                 human_bytes(r["downlink_bytes"]) if is_number(r.get("downlink_bytes")) else "-",
                 _fmt_metric(r.get("train_loss")), *(_fmt_metric(e.get(k)) for k in evals),
                 _fmt_s(t.get("local")), _fmt_s(t.get("aggregate")), _fmt_s(t.get("total"))]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (f"<details><summary>{_e(run.label)} <span class=\"delta\">({_e(run.path)})</span></summary>"
            "<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></details>")


# ---------------------------------------------------------------------------------------------
# Entry point


def _label_runs(runs: list[Run]) -> None:
    """The method name; with the directory name where methods repeat; the full path if still ambiguous."""
    def ambiguous() -> list[Run]:
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        return [run for run in runs if counts[run.label] > 1]

    for run in runs:
        run.label = run.method
    for run in ambiguous():
        run.label = f"{run.method} ({run.path.name})"
    for run in ambiguous():
        run.label = f"{run.method} ({run.path})"


def render_report(run_dirs: list[Path], out: Path, failures: list[tuple[str, str]] | None = None) -> ReportResult:
    """Write report.html, comparison.csv, across_seeds.csv, by_task.csv, by_phase.csv (runs of methods
    with phases only), comparison.md and the PNG plots into `out`.

    Each of `run_dirs` is a run directory or a directory of run directories (expanded one level).
    `failures` are (method, reason) pairs to list (compare passes the methods that failed).
    Unusable directories are skipped with a reason; no usable run at all is a UsageError.
    """
    out = Path(out)
    candidates, skipped, failed = expand_dirs([Path(p) for p in run_dirs])
    failed = list(dict.fromkeys([*(failures or []), *failed]))
    failed_methods = {m for m, _ in failed}
    runs: list[Run] = []
    for path in candidates:
        loaded = load_run(path)
        if isinstance(loaded, Run):
            runs.append(loaded)
        elif not (path.name.endswith(".partial") and path.name[:-8] in failed_methods):
            skipped.append((path, loaded))  # a failed method's own .partial is already listed
    if not runs:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped) or "no run directories given"
        if failed:
            reasons += "; " + "; ".join(f"{m}: {r}" for m, r in failed)
        raise UsageError(f"no usable run directory to report on ({reasons}); pass finished run "
                         "directories (each with summary.json and metrics.jsonl)")
    _label_runs(runs)
    rows = build_rows(runs)
    seed_rows = group_rows(seed_groups(runs), metric_keys(runs), runs)
    plots = render_plots(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create report directory {out}: {exc.strerror}; pass a writable directory") from exc
    plot_paths = []
    for name, data in plots.items():
        atomic_write(out / name, data)
        plot_paths.append(out / name)
    atomic_write(out / "comparison.csv", write_csv(rows))
    atomic_write(out / SEEDS_CSV, write_csv(seed_rows))
    atomic_write(out / TASKS_CSV, write_csv(task_rows(runs)))
    phases = phase_rows(runs)
    if phases:
        atomic_write(out / PHASES_CSV, write_csv(phases))
    atomic_write(out / "comparison.md", write_markdown(runs, rows, skipped, failed, seed_rows))
    atomic_write(out / "report.html", write_html(runs, rows, plots, skipped, failed, seed_rows))
    return ReportResult(out=out, html=out / "report.html", csv=out / "comparison.csv",
                        markdown=out / "comparison.md", plots=plot_paths, rows=rows,
                        runs=[r.path for r in runs], skipped=skipped, failed=failed,
                        seeds_csv=out / SEEDS_CSV, tasks_csv=out / TASKS_CSV, seed_rows=seed_rows,
                        phase_rows=phases)
