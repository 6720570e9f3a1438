"""Does the server's memory grow with the federation? Peak RSS of the same run with 4 and with
40 clients (the same clients per round and rounds, so the work per round is equal), per method,
each run in a fresh process so one peak does not hide another.

    python benchmarks/memory_clients.py --methods fedavg,fedit,ferret,fedkseed,cgfedllm,fedpt --clients 4,40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES
from thinwire.fuzz import FUZZ_SETTINGS

RUN = """
import json, sys
from thinwire.config import load_config
from thinwire.runtime.local import run_local
summary = run_local(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], quiet=True)
print(json.dumps({"peak_rss_mb": summary["peak_rss_mb"], "wall_s": summary["wall_s"]}))
"""


def peak(method: str, clients: int, out: Path, extra: list[str]) -> dict:
    overrides = [*FUZZ_SETTINGS[method], f"federation.clients={clients}", "federation.clients_per_round=2",
                 "federation.rounds=3", "eval.generate=false", *extra]
    done = subprocess.run([sys.executable, "-c", RUN, str(EXAMPLES / "smoke.toml"), str(out), *overrides],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(FUZZ_SETTINGS))
    ap.add_argument("--clients", default="4,40")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    sizes = [int(n) for n in args.clients.split(",")]
    table = Table(title="peak RSS (MB) against federation size (smoke work; the same rounds and clients per round)")
    table.add_column("method")
    for n in sizes:
        table.add_column(f"{n} clients", justify="right")
    table.add_column(f"{sizes[-1]} / {sizes[0]}", justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            peaks = [peak(method, n, Path(tmp) / f"{method}-{n}", args.overrides)["peak_rss_mb"] for n in sizes]
            table.add_row(method, *(f"{p:,.0f}" for p in peaks), f"{peaks[-1] / peaks[0]:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
