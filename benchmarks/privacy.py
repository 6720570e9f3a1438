"""Quality under client-level central DP at target ε, against the non-private run.

For each method: one round without noise measures the median L2 norm of a client's update in the
method's DP space (`dp_update_norm_median`), which becomes `privacy.clip_norm`; the noise
multiplier for each target ε (δ = 1e-5, the run's rounds and sampling) is found by bisection on
dp-accounting's own ε; then one run per ε. Prints quality against the non-private runs named by
--baseline (same config, same seed).

    python benchmarks/privacy.py benchmarks/compare_smollm2.toml --methods fedit,ferret \\
        --epsilons 1,4,8 --baseline fedit=runs/s11-template/fedit \\
        --baseline ferret=docs/benchmarks/headline-runs/ferret-sketch-seed0 --out runs/privacy
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from rich.console import Console
from rich.table import Table

from thinwire.config import Config, load_config
from thinwire.runtime.local import run_local


def central_epsilon(z: float, config: Config) -> float:
    fed = config.federation
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        fed.clients, fed.clients_per_round, dp_accounting.GaussianDpEvent(z / 2)), fed.rounds)
    return accountant.get_epsilon(config.privacy.delta)


def noise_for(target: float, config: Config) -> float:
    """The smallest noise multiplier whose ε is at most `target` (bisection in log space)."""
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if central_epsilon(mid, config) > target else (low, mid)
    return high


def run(config: Config, out: Path) -> dict:
    """The run's summary; a run already finished in `out` is kept (the script resumes)."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else run_local(config, out, quiet=True)


def aggregated(run_dir: Path) -> int:
    """Rounds whose aggregate was released (a round whose every reply was rejected spends no ε)."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(1 for r in rounds if not r.get("skipped"))


def quality(evaluation: dict[str, float]) -> list[str]:
    return [f"{evaluation[k]:.3f}" if k in evaluation else "-" for k in ("exact_match", "rougeL", "loss")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--methods", default="fedit,ferret")
    ap.add_argument("--epsilons", default="1,4,8")
    ap.add_argument("--baseline", action="append", default=[], metavar="METHOD=RUN_DIR")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("runs/privacy"))
    args = ap.parse_args()
    baselines = dict(item.split("=", 1) for item in args.baseline)
    table = Table(title="central DP (δ = 1e-5) against the non-private run")
    for column in ("method", "target ε", "ε spent", "rounds aggregated", "noise multiplier", "clip norm",
                   "exact match", "Rouge-L", "loss"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in args.methods.split(","):
        base = [*args.overrides, f"method.name={method}", "privacy.dp=central"]
        probe = load_config(args.config, [*base, "federation.rounds=1", "eval.generate=false",
                                          "privacy.clip_norm=1e30"])
        run(probe, args.out / f"{method}-norm")
        first = (args.out / f"{method}-norm" / "metrics.jsonl").read_text().splitlines()[0]
        clip = json.loads(first)["aggregate"]["dp_update_norm_median"]
        if method in baselines:
            plain = json.loads((Path(baselines[method]) / "summary.json").read_text())
            table.add_row(method, "∞ (no DP)", "∞", str(plain["rounds"]), "0", "-", *quality(plain["final_eval"]))
        for target in (float(e) for e in args.epsilons.split(",")):
            config = load_config(args.config, [*base, f"privacy.clip_norm={clip}"])
            z = noise_for(target, config)
            config = load_config(args.config, [*base, f"privacy.clip_norm={clip}", f"privacy.noise_multiplier={z}"])
            summary = run(config, args.out / f"{method}-eps{target:g}")
            table.add_row(method, f"{target:g}", f"{summary['privacy']['epsilon']:.2f}",
                          str(aggregated(args.out / f"{method}-eps{target:g}")), f"{z:.3f}", f"{clip:.4g}",
                          *quality(summary["final_eval"]))
    Console().print(table)


if __name__ == "__main__":
    main()
