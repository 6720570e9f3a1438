"""Round time and traffic of several methods on the same model, data and clients, in one run.

    python benchmarks/round_time.py --model smollm2-135m --methods fedavg,ferret
    python benchmarks/round_time.py --model tiny --methods fedavg,ferret,fedkseed --rounds 2
    python benchmarks/round_time.py --methods fedavg,ferret --variant "ferret-sketch=ferret:method.ferret.basis='sketch'"

Each method runs `--rounds` rounds of the same experiment (evaluation reduced to the loss on a
few examples, so it barely counts); the table shows seconds per round split into local work
(all sampled clients, one after another) and aggregation, and bytes per client-round.
`--variant label=method:setting:setting...` adds a row for a method under extra settings. The
first row is the baseline of the "vs" column.

On a shared machine one run's seconds drift with the load, so `--repeats N` runs the methods N
times in turn (A B A B ...) and reports each one's median. "method overhead" is the round's
seconds outside the clients' own training steps (local − Σ train_s, plus aggregation): the part
a method adds to the same local SGD/AdamW work, which the load moves far less than the training.
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


def round_seconds(metrics: Path) -> dict[str, float]:
    """Mean seconds per round of one run: local, aggregate, total, and the method's overhead."""
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    local = statistics.mean(r["time_s"]["local"] for r in rounds)
    aggregate = statistics.mean(r["time_s"]["aggregate"] for r in rounds)
    train = statistics.mean(sum(c["metrics"].get("train_s", 0.0) for c in r["clients"]) for r in rounds)
    return {"local": local, "aggregate": aggregate, "total": local + aggregate,
            "overhead": local - train + aggregate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="fedavg,ferret")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="run the methods this many times in turn; medians")
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
                        f"batch 4, {args.rounds} rounds, median of {args.repeats}")
    for col in ("method", "local s/round", "aggregate s/round", "total s/round", "vs first",
                "method overhead s/round", "vs first", "up / client-round", "down / client-round"):
        table.add_column(col, justify="right")
    times: dict[str, list[dict[str, float]]] = {label: [] for label, _ in runs}
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, settings in runs:
                config = load_config(EXAMPLES / "smoke.toml", [*base, *settings])
                out = Path(tmp) / f"{label}-{repeat}"
                summaries[label] = run_local(config, out, quiet=True)
                times[label].append(round_seconds(out / "metrics.jsonl"))
    reference = None
    for label, _ in runs:
        median = {key: statistics.median(t[key] for t in times[label]) for key in times[label][0]}
        reference = reference or median
        summary = summaries[label]
        table.add_row(label, f"{median['local']:.1f}", f"{median['aggregate']:.2f}", f"{median['total']:.1f}",
                      f"{median['total'] / reference['total']:.2f}×", f"{median['overhead']:.2f}",
                      f"{median['overhead'] / reference['overhead']:.2f}×",
                      human_bytes(summary["uplink_bytes_per_client_round"]),
                      human_bytes(summary["downlink_bytes_per_client_round"]))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
