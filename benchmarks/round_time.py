"""Round time and traffic of several methods on the same model, data and clients, in one run.

    python benchmarks/round_time.py --model smollm2-135m --methods fedavg,ferret
    python benchmarks/round_time.py --model tiny --methods fedavg,ferret,fedkseed --rounds 2
    python benchmarks/round_time.py --methods fedavg,ferret --variant "ferret-sketch=ferret:method.ferret.basis='sketch'"

Each method runs `--rounds` rounds of the same experiment (evaluation reduced to the loss on a
few examples, so it barely counts); the table shows mean seconds per round split into local
work (all sampled clients, one after another) and aggregation, and bytes per client-round.
`--variant label=method:setting:setting...` adds a row for a method under extra settings. The
first row is the baseline of the "vs" column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES
from thinwire.config import load_config
from thinwire.runtime.display import human_bytes
from thinwire.runtime.local import run_local


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="fedavg,ferret")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], help="label=method:setting:setting...")
    args = parser.parse_args()
    runs = [(method, [f"method.name='{method}'"]) for method in args.methods.split(",")]
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        method, *settings = rest.split(":")
        if not label or not method:
            parser.error(f"--variant {spec!r}: expected label=method:setting:setting...")
        runs.append((label, [f"method.name='{method}'", *settings]))
    base = [f"model.name='{args.model}'", f"federation.rounds={args.rounds}", "federation.clients=4",
            f"federation.clients_per_round={args.clients_per_round}", f"train.local_steps={args.steps}",
            "train.batch_size=4", "train.lr=1e-5", "data.max_length=128", "eval.generate=false",
            "eval.max_examples=4", "eval.every=0", *args.overrides]
    table = Table(title=f"{args.model}: {args.clients_per_round} clients/round, {args.steps} local steps, "
                        f"batch 4, {args.rounds} rounds")
    for col in ("method", "local s/round", "aggregate s/round", "total s/round", "vs first",
                "up / client-round", "down / client-round"):
        table.add_column(col, justify="right")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in runs:
            config = load_config(EXAMPLES / "smoke.toml", [*base, *settings])
            summary = run_local(config, Path(tmp) / label, quiet=True)
            rounds = [json.loads(line) for line in (Path(tmp) / label / "metrics.jsonl").read_text().splitlines()]
            local = statistics.mean(r["time_s"]["local"] for r in rounds)
            agg = statistics.mean(r["time_s"]["aggregate"] for r in rounds)
            total = local + agg
            reference = reference or total
            table.add_row(label, f"{local:.1f}", f"{agg:.1f}", f"{total:.1f}", f"{total / reference:.2f}×",
                          human_bytes(summary["uplink_bytes_per_client_round"]),
                          human_bytes(summary["downlink_bytes_per_client_round"]))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
