"""`thinwire compare`: the same experiment once per method, then one side-by-side report.

Only `method.name` differs between the runs: data, federation, client sampling and seed are the
config's. Runs go one after another in this process (`out/<method>`); a method that fails is
recorded with a one-line reason and the others still run. `out/compare.json` keeps the status
of every method so that `thinwire report out` can list the failures again later. With `seeds`
every method runs once per seed (`out/<method>-seed<N>`) and the report adds mean ± std.

A comparison can be continued (a long one across sessions): a run already finished in `out`
(`out/<name>` with its summary.json) is kept and not run again, provided its config.toml is the
config that would run now (compared after parsing, so formatting does not matter); a finished run
of another config is an error naming the first key that differs (remove that directory or pass
another --out), never silently mixed in. An interrupted run (`out/<name>.partial`) of the same
config resumes from its last checkpoint (runtime/checkpoint.py); of another config it starts over.

The console table gives whole-run traffic per client-round and each method's ratio against its
baseline measured in the same comparison (report.py: FedIT for LoRA methods, FedAvg for
full-parameter ones), then per-phase traffic for methods with phases (CG-FedLLM's TGAP and FAF).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import tomllib

from thinwire.errors import UsageError
from thinwire.report import ReportResult, render_report
from thinwire.runtime.rundir import atomic_write
from thinwire.privacy import privacy_text
from thinwire.tables import COMPARE_FILE, any_private


def check_methods(methods: list[str], variants: list[str] = ()) -> list[str]:
    """Cleaned, de-duplicated run names (`all`: every implemented method). A name is a method or
    one of the config's named `variants`; anything else is a UsageError naming the valid ones."""
    from thinwire.methods import METHOD_NAMES

    names = list(dict.fromkeys(m.strip() for item in methods for m in item.split(",") if m.strip()))
    if names == ["all"]:
        return list(METHOD_NAMES)
    unknown = [m for m in names if m not in METHOD_NAMES and m not in variants]
    if unknown:
        defined = f"; variants in the config: {', '.join(variants)}" if variants else ""
        raise UsageError(f"unknown method {unknown[0]!r} in --methods; valid names: {', '.join(METHOD_NAMES)}"
                         f"{defined}, or all")
    return names


def every_method(config: Any, variants: list[str]) -> list[str]:
    """A compare without --methods runs every method (the CLI's contract), but never silently:
    it says what that costs and, at a terminal, asks first."""
    from thinwire.methods import METHOD_NAMES

    defined = f"; the config's variants: {', '.join(variants)}" if variants else ""
    print(f"no --methods: running every method, {len(METHOD_NAMES)} runs of {config.federation.rounds} rounds "
          f"each on {config.model.name} ({', '.join(METHOD_NAMES)}); pass --methods, e.g. --methods fedavg,fedit, "
          f"to choose{defined}", file=sys.stderr)
    if sys.stdin.isatty() and sys.stderr.isatty() and input("run them all? [y/N] ").strip().lower() != "y":
        raise UsageError("compare stopped before any run; pass --methods to choose what to run")
    return ["all"]


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; anything but distinct integers is a UsageError."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        seeds = [int(item) for item in items]
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma-separated list of integers; pass e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r} needs distinct integers; pass e.g. --seeds 0,1,2")
    return seeds


def failure_reason(exc: BaseException) -> str:
    """One line: a UsageError's own message, otherwise the exception type and its first line."""
    lines = str(exc).strip().splitlines()
    if isinstance(exc, UsageError):
        return lines[0] if lines else "usage error"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def config_difference(path: Path, config: Any) -> str | None:
    """None when the run config at `path` (a config.toml) is `config`, else what differs (one line)."""
    from thinwire.config import from_dict, to_toml

    try:
        old = tomllib.loads(path.read_text())
        if to_toml(from_dict(old)) == to_toml(config):
            return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"its config.toml cannot be read ({exc})"
    except UsageError as exc:
        return f"its config.toml is not valid for this thinwire ({exc})"
    new = tomllib.loads(to_toml(config))

    def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
        return out

    a, b = flat(old), flat(new)
    key = next((k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)), None)
    if key is None:
        return "its config.toml differs in form"
    return f"{key} = {a.get(key, '(absent)')!r} there, {b.get(key, '(absent)')!r} now"


def _plan(out: Path, configs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(summaries of runs already finished in `out` with the same config, names whose interrupted
    `.partial` run has the same config and resumes); a finished run of another config, or a
    directory that is not a finished run, is a UsageError."""
    done, resume = {}, set()
    for name, config in configs.items():
        run_dir, partial = out / name, out / f"{name}.partial"
        if run_dir.exists():
            if not (run_dir / "summary.json").is_file():
                raise UsageError(f"output directory {run_dir} already exists and holds no finished run; "
                                 "pass a new --out or remove it")
            differs = config_difference(run_dir / "config.toml", config)
            if differs:
                raise UsageError(f"{run_dir} holds a finished run of another config: {differs}; remove it to run "
                                 "it again, or pass a new --out")
            try:
                done[name] = json.loads((run_dir / "summary.json").read_text())
            except (OSError, ValueError) as exc:
                raise UsageError(f"{run_dir}/summary.json cannot be read ({exc}); remove {run_dir} to run it "
                                 "again") from None
        elif partial.is_dir() and config_difference(partial / "config.toml", config) is None:
            resume.add(name)
    return done, resume


def _reset_peak_rss() -> None:
    """Best effort: reset the kernel's peak-RSS mark so each run's peak is its own (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


class _RoundWatcher:
    """Advances the display's rounds bar from the lines of the running method's metrics.jsonl."""

    def __init__(self, progress: Any, task: Any):
        self.progress, self.task = progress, task
        self.paths: tuple[Path, ...] = ()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="thinwire-compare-rounds", daemon=True)

    def __enter__(self) -> _RoundWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        for path in self.paths:
            try:
                with path.open("rb") as handle:
                    done = sum(1 for _ in handle)
            except OSError:
                continue
            self.progress.update(self.task, completed=done)
            return

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()


def run_compare(config_path: str | Path | None, methods: list[str], overrides: list[str], out: Path,
                quiet: bool = False, seeds: list[int] = ()) -> list[dict[str, Any]]:
    """Run the experiment once per method (and seed) into `out/<method>` (`out/<method>-seed<N>`)
    and render the report into `out`.

    Returns one row per run: method (the run's name), status ("ok" or "failed"), reason (None when
    ok), run_dir, wall_s and, for finished runs, the run's summary. The report is `out/report.html`.
    """
    from rich.markup import escape

    from thinwire.config import compare_variants, load_config
    from thinwire.methods import METHOD_NAMES
    from thinwire.runtime.display import console, make_progress
    from thinwire.runtime.local import run_local

    if seeds and any(item.split("=", 1)[0].strip() == "federation.seed" for item in overrides):
        raise UsageError("both --seeds and --set federation.seed given; pass one of them")
    defined = compare_variants(config_path)
    if not any(m.strip() for m in methods):
        methods = every_method(load_config(config_path, list(overrides)), defined)
    variants = check_methods(list(methods), defined)
    configs = {}  # run name -> config; a bad config fails once, up front
    for variant in variants:
        chosen = [*overrides, *([f"method.name={variant}"] if variant in METHOD_NAMES else [])]
        if not seeds:
            configs[variant] = load_config(config_path, chosen, variant=variant)
        for seed in seeds:
            configs[f"{variant}-seed{seed}"] = load_config(config_path, [*chosen, f"federation.seed={seed}"],
                                                           variant=variant)
    names = list(configs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory")
    done, resume = _plan(out, configs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror}; pass a writable --out") from exc

    rows: list[dict[str, Any]] = []
    progress = make_progress()
    if not quiet:
        progress.start()
    try:
        methods_bar = progress.add_task("methods", total=len(names))
        rounds_bar = progress.add_task("rounds", total=configs[names[0]].federation.rounds)
        with _RoundWatcher(progress, rounds_bar) as watcher:
            for name in names:
                progress.update(methods_bar, description=name)
                progress.reset(rounds_bar, total=configs[name].federation.rounds)
                run_dir = out / name
                watcher.paths = (run_dir.with_name(name + ".partial") / "metrics.jsonl", run_dir / "metrics.jsonl")
                row: dict[str, Any] = {"method": name, "status": "ok", "reason": None, "run_dir": None}
                if name in done:  # finished earlier with this very config: kept as it is
                    row.update(run_dir=str(run_dir), summary=done[name], wall_s=done[name].get("wall_s", 0.0),
                               reused=True)
                    rows.append(row)
                    if not quiet:
                        progress.console.print(f"{name}: finished earlier, kept ({run_dir})", highlight=False)
                    progress.advance(methods_bar)
                    continue
                started = time.perf_counter()
                _reset_peak_rss()
                try:
                    row["summary"] = run_local(configs[name], run_dir, quiet=True, resume=name in resume)
                    row["run_dir"] = str(run_dir)
                except Exception as exc:  # noqa: BLE001 -- one method failing must not stop the others
                    row.update(status="failed", reason=failure_reason(exc))
                    if not isinstance(exc, UsageError):
                        row["traceback"] = traceback.format_exc()
                row["wall_s"] = time.perf_counter() - started
                watcher.poll()
                gc.collect()
                rows.append(row)
                if not quiet:
                    mark = "[green]ok[/]" if row["status"] == "ok" else f"[red]failed[/]: {escape(row['reason'])}"
                    progress.console.print(f"{name}: {mark} ({row['wall_s']:.1f} s)", markup=True,
                                           highlight=False)
                progress.advance(methods_bar)
            progress.update(methods_bar, description="methods")
            progress.update(rounds_bar, visible=False)
    finally:
        if not quiet:
            progress.stop()

    _write_status(out, config_path, names, overrides, rows)
    ok = [out / r["method"] for r in rows if r["status"] == "ok"]
    failures = [(r["method"], r["reason"]) for r in rows if r["status"] == "failed"]
    if not ok:
        raise UsageError("every method failed: " + "; ".join(f"{m}: {r}" for m, r in failures))
    result = render_report(ok, out, failures=failures)
    if not quiet:
        console.print(_status_table(rows, result))
        if result.phase_rows:
            console.print(_phases_table(result.phase_rows))
        if seeds and len(seeds) > 1:
            console.print(_seeds_table(result.seed_rows))
        console.print(f"report: {result.html}")
    return rows


def _write_status(out: Path, config_path: str | Path | None, names: list[str], overrides: list[str],
                  rows: list[dict[str, Any]]) -> None:
    record = {
        "config": None if config_path is None else str(config_path), "overrides": list(overrides),
        "methods": [{k: v for k, v in row.items() if k != "summary"} for row in rows],
    }
    atomic_write(out / COMPARE_FILE, json.dumps(record, indent=2, sort_keys=True))


def _status_table(rows: list[dict[str, Any]], result: ReportResult) -> Any:
    from rich.table import Table

    from thinwire.report import ratio_text
    from thinwire.runtime.display import human_bytes

    by_dir = {row["run_dir"]: row for row in result.rows}
    missing = [f"no ratio for {r['run']}: {r['traffic_baseline']}" for r in result.rows
               if r["traffic_ratio_vs_baseline"] is None]
    private = any_private(result.rows)
    from thinwire.report import random_model_notes

    notes = [*missing, *random_model_notes(r["model"] for r in result.rows)]
    table = Table(title="compare (traffic: whole run, every byte sent)", caption="; ".join(notes) or None)
    for column in ("method", "status", "Rouge-L", "loss", *(["privacy"] if private else []),
                   "up / down per client-round", "total sent", "vs baseline (up+down)", "wall"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for row in rows:
        summary = row.get("summary") or {}
        final = summary.get("final_eval", {})
        report = by_dir.get(row["run_dir"]) or {}
        ratio = report.get("traffic_ratio_vs_baseline")
        status = "ok" if row["status"] == "ok" else f"failed: {row['reason']}"
        table.add_row(
            row["method"], status + (" (kept)" if row.get("reused") else ""),
            f"{final['rougeL']:.4f}" if "rougeL" in final else "-",
            f"{final['loss']:.4f}" if "loss" in final else "-",
            *([privacy_text(summary) if summary else "-"] if private else []),
            f"{human_bytes(summary['uplink_bytes_per_client_round'])} / "
            f"{human_bytes(summary['downlink_bytes_per_client_round'])}" if summary else "-",
            human_bytes(summary["uplink_bytes_total"] + summary["downlink_bytes_total"]) if summary else "-",
            ratio_text(ratio, report["traffic_baseline"]) if ratio is not None else "-",
            f"{row['wall_s']:.1f} s")
    return table


def _phases_table(phases: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from thinwire.report import PHASES_NOTE, _phase_cells

    table = Table(title="traffic by phase", caption=PHASES_NOTE)
    for column in ("run", "phase", "rounds", "client-rounds", "up / client-round", "down / client-round",
                   "up total", "down total", "up vs baseline"):
        table.add_column(column, justify="left" if column in ("run", "phase") else "right")
    for row in phases:
        table.add_row(*_phase_cells(row))
    return table


def _seeds_table(seed_rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from thinwire.across_seeds import SHARE_HEADER, format_mean_std, format_share

    table = Table(title="across seeds (mean ± sample std)")
    for column in ("setting", "seeds", "Rouge-L", "exact match", "loss", SHARE_HEADER):
        table.add_column(column, justify="left" if column in ("setting", "seeds") else "right")
    for row in seed_rows:
        table.add_row(row["run"], row["seeds"], *(format_mean_std(row.get(f"final_{k}_mean"), row.get(f"final_{k}_std"))
                                                  for k in ("rougeL", "exact_match", "loss")), format_share(row))
    return table
