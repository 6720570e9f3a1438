"""Quality under client-level central DP at target ε, against the non-private run.

For each method the clip norm is chosen on data no client holds: the median L2 norm, in the
method's update space, of local updates trained on the validation split (split over
`clients_per_round` probe clients), so choosing it spends nothing of any client's privacy. The
noise multiplier for each target ε (δ = 1e-5) is found by bisection on dp-accounting's own ε for
the run's schedule: a Gaussian mechanism of multiplier z/2 composed over the rounds that sample
the most exposed client (the sample is public, so no amplification). Each ε level draws its own
noise (secret keys: nothing is reused between runs). Prints quality against the non-private runs
named by --baseline (same config, same seed).

    python benchmarks/privacy.py benchmarks/compare_smollm2.toml --methods fedit,ferret \\
        --epsilons 1,4,8 --set "method.ferret.basis='sketch'" \\
        --baseline fedit=docs/benchmarks/headline-runs/fedit-seed0 \\
        --baseline ferret=docs/benchmarks/headline-runs/ferret-sketch-seed0 --out runs/privacy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thinwire import privacy
from thinwire.config import Config, load_config
from thinwire.data import build_federation
from thinwire.methods import get_method
from thinwire.methods.base import ClientState, RunContext, Workbench
from thinwire.runtime.engine import sample_clients
from thinwire.runtime.local import run_local


def scheduled_releases(config: Config) -> int:
    """The most rounds any client is sampled in (the seeded, public sample; no faults)."""
    counts: dict[int, int] = {}
    for rnd in range(1, config.federation.rounds + 1):
        for cid in sample_clients(config, rnd):
            counts[cid] = counts.get(cid, 0) + 1
    return max(counts.values())


def noise_for(target: float, config: Config) -> float:
    """The smallest noise multiplier whose ε is at most `target` (bisection in log space)."""
    releases = {0: scheduled_releases(config)}
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(low * high)
        probe = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, noise_multiplier=mid))
        low, high = (mid, high) if privacy.epsilon(probe, releases) > target else (low, mid)
    return high


def validation_clip_norm(config: Config) -> float:
    """The median update norm in the method's DP space of local rounds on the validation split."""
    probe = dataclasses.replace(config, data=dataclasses.replace(config.data, eval_split="validation"))
    examples = next(iter(build_federation(probe).eval_splits().values()))
    spec, space = get_method(config.method.name), privacy.update_space(config)
    ctx = RunContext(config, Workbench(config))
    client, server = spec.client(ctx), spec.server(ctx)
    server.setup()
    parts = config.federation.clients_per_round
    norms = []
    for i in range(parts):
        upload = client.fit(1, i, server.download(1, i), examples[i::parts], ClientState())
        view = space.view(upload.payload)
        norms.append(math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in view.values())))
    return statistics.median(norms)


def run(config: Config, out: Path) -> dict:
    """The run's summary; a run already finished in `out` is kept (the script resumes)."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else run_local(config, out, quiet=True)


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
    for column in ("method", "target ε", "ε spent", "most releases", "noise multiplier", "clip norm",
                   "exact match", "Rouge-L", "loss"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in args.methods.split(","):
        base = [*args.overrides, f"method.name={method}", "privacy.dp=central"]
        clip = validation_clip_norm(load_config(args.config, base))
        if method in baselines:
            plain = json.loads((Path(baselines[method]) / "summary.json").read_text())
            table.add_row(method, "∞ (no DP)", "∞", "-", "0", "-", *quality(plain["final_eval"]))
        for target in (float(e) for e in args.epsilons.split(",")):
            config = load_config(args.config, [*base, f"privacy.clip_norm={clip}"])
            z = noise_for(target, config)
            config = load_config(args.config, [*base, f"privacy.clip_norm={clip}", f"privacy.noise_multiplier={z}"])
            summary = run(config, args.out / f"{method}-eps{target:g}")
            table.add_row(method, f"{target:g}", f"{summary['privacy']['epsilon']:.2f}",
                          str(summary["privacy"]["releases_max"]), f"{z:.3f}", f"{clip:.4g}",
                          *quality(summary["final_eval"]))
    Console().print(table)


if __name__ == "__main__":
    main()
