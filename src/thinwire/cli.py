"""The `thinwire` command: run, compare, report, models, tasks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from thinwire.errors import UsageError

EXAMPLES = Path(__file__).resolve().parent / "examples"


def default_config() -> Path:
    """`examples/quickstart.toml`, shipped inside the package so an installed thinwire finds it."""
    return EXAMPLES / "quickstart.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    run.add_argument("config", nargs="?", help="TOML config (default: examples/quickstart.toml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<time>)")
    run.add_argument("--runtime", choices=["local"], default="local")
    run.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    compare = sub.add_parser("compare", help="run one experiment per method and report them side by side")
    compare.add_argument("config", nargs="?", help="TOML config (default: examples/quickstart.toml)")
    compare.add_argument("--methods", default="", help="comma-separated methods (default: all available)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    compare.add_argument("--out", type=Path, required=True, help="directory for the runs and the report")
    compare.add_argument("--quiet", action="store_true")
    report = sub.add_parser("report", help="tables, plots and report.html from run directories")
    report.add_argument("dirs", nargs="+", type=Path, help="run directories, or directories of runs")
    report.add_argument("--out", type=Path, help="where to write the report (default: the only DIR)")
    sub.add_parser("models", help="list built-in models")
    sub.add_parser("tasks", help="list the built-in task families")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from thinwire.config import load_config
    from thinwire.runtime.local import run_local

    config = load_config(args.config or default_config(), args.overrides)
    out = args.out or Path("runs") / f"{config.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_local(config, out, quiet=args.quiet)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from thinwire.compare import check_methods, run_compare

    methods = check_methods(args.methods.split(",") if args.methods else [])
    rows = run_compare(args.config or default_config(), methods, args.overrides, args.out, quiet=args.quiet)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from thinwire.report import render_report
    from thinwire.runtime.display import console

    if args.out is None and len(args.dirs) > 1:
        raise UsageError("several directories given; pass --out for the report")
    result = render_report(args.dirs, args.out or args.dirs[0])
    for path, reason in result.skipped:
        console.print(f"skipped {path}: {reason}")
    console.print(f"report: {result.html}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from thinwire.models.smollm2 import describe
    from thinwire.runtime.display import console

    table = Table(title="built-in models")
    for column in ("name", "parameters", "size on disk", "ready", "source"):
        table.add_column(column)
    table.add_row("tiny", "~91 K", "-", "yes (built in a second)", "random 2-layer Llama, byte tokenizer")
    info = describe()
    table.add_row(info["name"], f"{info['parameters'] / 1e6:.1f} M" if info.get("parameters") else "135 M",
                  f"{info['size_bytes'] / 1e6:.0f} MB" if info.get("size_bytes") else "-",
                  "yes" if info["ready"] else "no (prepared on first use)", info["hub_id"])
    console.print(table)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.table import Table

    from thinwire.data.tasks import FAMILIES, generate
    from thinwire.runtime.display import console

    table = Table(title=f"{len(FAMILIES)} built-in task families")
    for column in ("family", "category", "instruction", "example input", "example output"):
        table.add_column(column)
    for name, family in FAMILIES.items():
        example = generate(name, 1, 0)[0]
        table.add_row(name, family.category, family.instruction, example["input"], example["output"])
    console.print(table)
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "report": cmd_report, "models": cmd_models,
            "tasks": cmd_tasks}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"thinwire: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thinwire: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
