"""Progress bars (rounds, clients, steps) and the closing summary table, on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thinwire.privacy import privacy_text

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(summary: dict[str, Any]) -> Table:
    """Base vs final quality, and the bytes the run moved: whole run, then per phase (if any).

    Per client-round = all bytes sent / downloads sent (summary.json `client_rounds`)."""
    table = Table(title=f"{summary['method']} on {summary['model']}: {summary['rounds']} rounds, "
                        f"{summary['wall_s']:.1f} s")
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
