"""Copy finished runs' small files into the repository, so their tables render from it alone.

For every run directory under each SOURCE (a run, or a compare's --out), copies config.toml,
metrics.jsonl, summary.json and predictions.jsonl (not the weights) to DEST/<name>/, where
`thinwire report DEST/*` renders them again on any machine.

    python benchmarks/keep_runs.py runs/headline --to docs/benchmarks/headline-runs
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SMALL_FILES = ("config.toml", "metrics.jsonl", "summary.json", "predictions.jsonl")


def finished_runs(source: Path) -> list[Path]:
    """`source` itself when it is a finished run, else its finished run subdirectories."""
    if (source / "summary.json").is_file():
        return [source]
    return sorted(p for p in source.iterdir() if (p / "summary.json").is_file() and not p.name.endswith(".partial"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--to", required=True, type=Path)
    args = ap.parse_args()
    for source in args.sources:
        for run in finished_runs(source):
            target = args.to / run.name
            target.mkdir(parents=True, exist_ok=True)
            for name in SMALL_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, target / name)
            print(f"{run} -> {target}")


if __name__ == "__main__":
    main()
