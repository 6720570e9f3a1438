"""Pick every method's learning rate the same way, on a validation split, before the headline runs.

For each method (or `[compare.<name>]` variant of CONFIG): runs with its local lr (for FedKSeed,
`method.fedkseed.lr`) at --factors times the value CONFIG gives it, plus any `--grid` keys, each
run evaluated on `data.eval_split = "validation"`: examples disjoint from training and from the
reported test split. The best run by --metric (ties: lower loss) wins; the script prints every
run and writes `<out>/tuned.toml`, per-method tables to paste into CONFIG so that the headline
runs each method at its own chosen setting. Finished runs in --out are reused, so a sweep
continues across sessions. Runs: (methods) x (factors) x (grid points).

    python benchmarks/tune.py examples/smoke.toml --methods fedavg,ferret --out runs/tune-smoke
    python benchmarks/tune.py benchmarks/compare_smollm2.toml --methods fedavg,ferret-sketch \\
        --grid ferret-sketch:method.ferret.server_lr=1,2 --rounds 3 --out runs/tune
"""

from __future__ import annotations

import argparse
import itertools
import json
from fractions import Fraction
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thinwire.config import METHOD_NAMES, load_config
from thinwire.runtime.local import run_local

ZO_METHODS = ("fedkseed", "fedkseed-pro")


def lr_key(method: str) -> str:
    return "method.fedkseed.lr" if method in ZO_METHODS else "train.lr"


def setting(config, key: str):
    """The value of a dotted key (`train.lr`, `method.fedkseed.lr`) in a resolved config."""
    section, *rest = key.split(".")
    node = getattr(config, section)
    if len(rest) == 2:
        return node.options[rest[0]][rest[1]]
    return getattr(node, rest[0])


def score(summary: dict, metric: str) -> tuple[float, float]:
    """Larger is better: the metric (negated for loss), then lower loss."""
    final = summary["final_eval"]
    value = -final["loss"] if metric == "loss" else final.get(metric, 0.0)
    return value, -final["loss"]


def edge_keys(chosen: dict[str, str], points: list[dict[str, str]]) -> list[str]:
    """The keys whose chosen value is the smallest or largest of several tried: the best may lie beyond."""
    edges = []
    for key, value in chosen.items():
        tried = sorted({float(p[key]) for p in points})
        if len(tried) > 1 and float(value) in (tried[0], tried[-1]):
            edges.append(key)
    return edges


def grid_points(name: str, base_lr: float, factors: list[float], extra: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = {lr_key(name): [f"{base_lr * f:.2g}" for f in factors], **extra}
    return [dict(zip(keys, values)) for values in itertools.product(*keys.values())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--methods", required=True, help="comma-separated methods or variants of CONFIG")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--factors", default="1/3,1,3", help="multiples of each method's configured lr")
    ap.add_argument("--grid", action="append", default=[], help="NAME:section.key=v1,v2 (more keys to sweep)")
    ap.add_argument("--metric", default="exact_match", choices=("exact_match", "rougeL", "loss"))
    ap.add_argument("--rounds", type=int, help="federation.rounds of every tuning run (default: CONFIG's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = ap.parse_args()
    factors = [float(Fraction(f)) for f in args.factors.split(",")]
    extra: dict[str, dict[str, list[str]]] = {}
    for item in args.grid:
        name, assignment = item.split(":", 1)
        key, values = assignment.split("=", 1)
        extra.setdefault(name, {})[key] = values.split(",")
    common = [*args.overrides, "data.eval_split='validation'"]
    if args.rounds:
        common.append(f"federation.rounds={args.rounds}")

    table = Table(title=f"tuning on the validation split ({args.metric}; ties: lower loss)")
    for col in ("method", "setting", "exact_match", "rougeL", "loss", ""):
        table.add_column(col, overflow="fold")
    chosen: dict[str, dict[str, str]] = {}
    ran = reused = 0
    for name in args.methods.split(","):
        named = [*common, *([f"method.name={name}"] if name in METHOD_NAMES else [])]
        base = load_config(args.config, named, variant=name)
        results = []
        for point in grid_points(name, setting(base, lr_key(name)), factors, extra.get(name, {})):
            label = ",".join(f"{k}={v}" for k, v in point.items())
            run_dir = args.out / name / label.replace("/", "_")
            if (run_dir / "summary.json").is_file():
                reused += 1
            else:
                config = load_config(args.config, [*named, *(f"{k}={v}" for k, v in point.items())], variant=name)
                run_local(config, run_dir, quiet=True)
                ran += 1
            results.append((point, label, json.loads((run_dir / "summary.json").read_text())))
        best = max(range(len(results)), key=lambda i: score(results[i][2], args.metric))
        chosen[name] = results[best][0]
        edges = edge_keys(chosen[name], [p for p, _, _ in results])
        for i, (point, label, summary) in enumerate(results):
            final = summary["final_eval"]
            mark = (f"chosen (at the grid's edge in {', '.join(edges)}: widen it)" if edges else "chosen") if i == best else ""
            table.add_row(name, label, f"{final.get('exact_match', 0):.3f}", f"{final.get('rougeL', 0):.3f}",
                          f"{final['loss']:.3f}", mark)
    Console(width=160).print(table)
    print(f"{ran + reused} tuning runs ({ran} run now, {reused} reused from {args.out})")
    lines = [f"# chosen by benchmarks/tune.py on the validation split ({args.metric}); paste into {args.config}"]
    for name, point in chosen.items():
        by_table: dict[str, list[str]] = {}
        for key, value in point.items():
            section, field = key.rsplit(".", 1)
            by_table.setdefault(section, []).append(f"{field} = {value}")
        for section, fields in by_table.items():
            lines += ["", f"[compare.{name}.{section}]", *fields]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "tuned.toml.partial"
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(args.out / "tuned.toml")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
