"""Progress bars (rounds, clients, steps) and the closing summary table, on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
    """Base vs final quality, and bytes moved next to what plain FedAvg would have moved."""
    table = Table(title=f"{summary['method']} on {summary['model']}: {summary['rounds']} rounds, "
                        f"{summary['wall_s']:.1f} s")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("final", justify="right")
    base, final = summary["base_eval"], summary["final_eval"]
    for key in ("rougeL", "exact_match", "loss"):
        if key in final:
            table.add_row(key, _fmt(base.get(key)), _fmt(final.get(key)))
    per_round = summary["uplink_bytes_per_client_round"] + summary["downlink_bytes_per_client_round"]
    fedavg = 2 * summary["fedavg_bytes_per_client_round"]
    table.add_row("bytes / client-round (up+down)", "", human_bytes(per_round))
    table.add_row("  plain FedAvg would move", "", human_bytes(fedavg))
    table.add_row("total bytes moved", "", human_bytes(summary["uplink_bytes_total"] + summary["downlink_bytes_total"]))
    table.add_row("peak RSS", "", f"{summary['peak_rss_mb']:,.0f} MB")
    return table
