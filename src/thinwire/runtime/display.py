"""What a run shows while it runs, and the closing summary table.

On a terminal: rich bars on stderr (rounds with an ETA, clients, local steps, evaluation) with one
line per finished round printed above them. When stdout is not a terminal (nohup, CI, a cluster
job, `> log.txt`): no bars, the same lines as plain text on stdout, flushed as they come, so a
log shows every round while the run goes on. `--quiet`: neither.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table
from rich.text import Text

from thinwire.privacy import privacy_text

console = Console(stderr=True)

RANDOM_MODELS = {"tiny": "a random 2-layer model", "tiny-small": "a random 1-layer model"}


class EtaColumn(ProgressColumn):
    """The task's `eta` field (set from measured round times), blank where a task has none."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        return Text(f"eta {eta}" if eta else "", style="progress.remaining")


def make_progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), EtaColumn(),
        console=console, transient=False, disable=disable,
    )


def is_live() -> bool:
    """Rich bars only when both stdout and the console (stderr) are terminals; plain lines otherwise."""
    return console.is_terminal and sys.stdout.isatty()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def round_line(record: dict[str, Any], total: int, eta_s: float | None) -> str:
    """One finished round in a line: training loss, quality when evaluated, bytes, time, ETA."""
    parts = [f"round {record['round']}/{total}"]
    if record.get("skipped"):
        parts.append("skipped (too few replies)")
    parts.append(f"clients {record['clients_ok']}/{record['clients_sampled']}")
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.4f}")
    evaluation = record.get("eval") or {}
    for key, label in (("loss", "eval loss"), ("rougeL", "rougeL"), ("exact_match", "exact match")):
        if key in evaluation:
            parts.append(f"{label} {evaluation[key]:.4f}")
    parts.append(f"up {human_bytes(record['uplink_bytes'])}")
    parts.append(f"down {human_bytes(record['downlink_bytes'])}")
    parts.append(f"{record['time_s']['total']:.1f} s")
    if eta_s is not None:
        parts.append(f"eta {human_seconds(eta_s)}")
    return ", ".join(parts)


class RunDisplay:
    """The live view of one run (the engine's): bars or plain lines (see the module docstring)."""

    def __init__(self, partial: Path, rounds: int, quiet: bool):
        self.partial, self.total, self.quiet = partial, rounds, quiet
        self.live = not quiet and is_live()
        self.progress = make_progress(disable=not self.live)
        self.round_seconds: list[float] = []  # measured this session (the ETA's basis)
        self.rounds_done = 0
        self.rounds_bar = self.progress.add_task("rounds", total=rounds)
        self.eval_bar: Any = None

    def __enter__(self) -> RunDisplay:
        if self.live:
            self.progress.start()
        self.log(f"run directory: {self.partial} (renamed without .partial when the run finishes)")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.progress.stop()

    def log(self, text: str) -> None:
        """A line above the bars on a terminal, a flushed line on stdout otherwise (none when quiet)."""
        if self.live:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        elif not self.quiet:
            print(text, flush=True)

    def resumed(self, rnd: int) -> None:
        self.rounds_done = rnd
        self.progress.update(self.rounds_bar, completed=rnd)
        self.log(f"resuming after round {rnd} of {self.total}")

    def evaluation(self, total: int) -> Callable[[int], None]:
        """Start an evaluation of `total` units of work; returns the function that advances it."""
        # plain lines say when the base evaluation (the first, before any round) starts and ends: the
        # silent stretch before round 1; a round's evaluation shows in its round line
        announce = not self.live and self.rounds_done == 0 and self.eval_bar is None
        if self.eval_bar is None:
            self.eval_bar = self.progress.add_task("evaluate", total=total)
        else:
            self.progress.reset(self.eval_bar, total=total)
        started, done = time.perf_counter(), 0
        if announce:
            self.log(f"evaluating the base model ({total} example passes)")

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self.progress.advance(self.eval_bar, n)
            if done >= total and announce:
                self.log(f"base model evaluated in {time.perf_counter() - started:.1f} s")

        return advance

    def round_done(self, record: dict[str, Any]) -> None:
        """Advance the rounds bar, update its ETA (mean measured round time × rounds left), log the line."""
        self.rounds_done = record["round"]
        self.round_seconds.append(record["time_s"]["total"])
        left = self.total - record["round"]
        eta_s = sum(self.round_seconds) / len(self.round_seconds) * left if left else None
        self.progress.update(self.rounds_bar, advance=1, eta=human_seconds(eta_s) if eta_s else "")
        self.log(round_line(record, self.total, eta_s))


def next_steps(out: Path, config: Any) -> list[str]:
    """What to do with a finished run: export it, generate from it, compare methods on its config."""
    run = shlex.quote(str(out))
    instruction, example_input = _example_prompt(config)
    others = [m for m in ("fedavg", "fedit", "ferret") if m != config.method.name][:2]
    generate = f"thinwire generate {run} {shlex.quote(instruction)}"
    if example_input:
        generate += f" --input {shlex.quote(example_input)}"
    return ["next:",
            f"  thinwire export {run} --out {shlex.quote(str(out) + '-export')}",
            f"  {generate}",
            f"  thinwire compare {shlex.quote(str(out / 'config.toml'))} --methods "
            f"{','.join([config.method.name, *others])} --out {shlex.quote(str(out) + '-compare')}"]


def _example_prompt(config: Any) -> tuple[str, str]:
    """An instruction (and input) of the run's own task: the first built-in family it trained on."""
    if config.data.source == "tasks":
        from thinwire.data.tasks import FAMILIES, generate

        example = generate((config.data.tasks or list(FAMILIES))[0], 1, 0)[0]
        return example["instruction"], example.get("input", "")
    return "Summarise federated learning in one sentence.", ""


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def random_model_note(model: str) -> str | None:
    """Why a built-in random model's quality stays at zero (None for a real model)."""
    if model not in RANDOM_MODELS:
        return None
    return (f"{model} is {RANDOM_MODELS[model]} for tests and smoke runs: its generations are noise, so exact "
            "match and Rouge-L stay near 0 whatever the method; use smollm2-135m to see learning")


def summary_table(summary: dict[str, Any]) -> Table:
    """Base vs final quality, and the bytes the run moved: whole run, then per phase (if any).

    Per client-round = all bytes sent / downloads sent (summary.json `client_rounds`)."""
    random = summary["model"] in RANDOM_MODELS
    table = Table(title=f"{summary['method']} on {summary['model']}{' (random model)' if random else ''}: "
                        f"{summary['rounds']} rounds, {summary['wall_s']:.1f} s",
                  caption=random_model_note(summary["model"]))
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("final", justify="right")
    base, final = summary["base_eval"], summary["final_eval"]
    for key in ("rougeL", "exact_match", "loss"):
        if key in final:
            table.add_row(key, _fmt(base.get(key)), _fmt(final.get(key)))
    table.add_row("up / down per client-round, whole run", "", _up_down(summary))
    for phase, figures in (summary.get("phases") or {}).items():
        table.add_row(f"  {phase} rounds ({figures['rounds']})", "", _up_down(figures))
    table.add_row("total bytes sent (up + down), whole run", "",
                  human_bytes(summary["uplink_bytes_total"] + summary["downlink_bytes_total"]))
    if "privacy" in summary:
        table.add_row("client-level DP", "", privacy_text(summary))
    table.add_row("peak RSS", "", f"{summary['peak_rss_mb']:,.0f} MB")
    return table


def _up_down(figures: dict[str, Any]) -> str:
    return (f"{human_bytes(figures['uplink_bytes_per_client_round'])} / "
            f"{human_bytes(figures['downlink_bytes_per_client_round'])}")
