"""What one hostile client achieves against the plain mean and the default bounded-mean, and what
bounded-mean costs a clean run: final evaluation loss on the smoke config, every method.

    python benchmarks/attacks.py                         # every method, seeds 0,1,2
    python benchmarks/attacks.py --methods fedavg,ferret --seeds 0 --set method.norm_bound_factor=2

Each method runs `examples/smoke.toml` (its [compare.<method>] settings apply) with all 3 clients in
every round, per seed:

- clean, `method.aggregation = "mean"` and the default `"bounded-mean"`;
- client 1 sending its honest update ×100, under each rule;
- client 1 sending its honest update ×(−100) under bounded-mean: clipped, that is a sign-flipped
  update exactly at the adaptive bound (the worst a bounded attacker can aim, in norm, at the model).

The table gives the mean final loss over seeds, the spread of the clean mean runs (the seeds' noise:
max − min), and the honest updates bounded-mean clipped in the clean runs (0: the clean runs are
bit-identical to the mean's).

Measured (CPU, seeds 0,1,2; `python benchmarks/attacks.py`), final loss:

    method        clean mean  clean bounded  x100 mean  x100 bounded  -x100 at bound  noise  honest clips
    fedavg             4.365          4.365     13.680         5.380           4.920  0.168             0
    fedit              5.333          5.333      5.443         5.393           5.482  0.034             0
    fedkseed           5.431          5.431  13995.182         5.453           5.684  0.066             0
    fedkseed-pro       5.430          5.430  44166.617         5.596           5.637  0.151             0
    ferret             5.001          5.001     16.337         4.928           5.442  0.071             0
    fedpt              5.342          5.342      5.516         5.385           5.531  0.034             0
    cgfedllm           5.335          5.335      5.449         5.372           5.584  0.034             0

With `--set method.norm_bound_factor=2` the x100 attacker gets FedAvg to 4.704, Ferret 4.934 and
FedKSeed 5.424 (clean: still no honest clip). With 2 clients a round (`--set
federation.clients_per_round=2`, the attacker is half the round) FedAvg goes 4.654 clean, 62.1 under
x100 with the mean, and 6.260 with bounded-mean; FedKSeed goes 5.442, 110,279 and 5.446.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thinwire.config import EXAMPLES, load_config
from thinwire.methods import METHOD_NAMES, get_method
from thinwire.runtime.local import run_local

ATTACKER = 1
# method -> overrides that give the method's phases a round each within the run
EXTRA = {"cgfedllm": ["federation.rounds=3", "method.cgfedllm.tgap_rounds=1"]}
CASES = {  # name -> (aggregation, factor applied to the attacker's update; None: no attacker)
    "clean mean": ("mean", None),
    "clean bounded": ("bounded-mean", None),
    "x100 mean": ("mean", 100.0),
    "x100 bounded": ("bounded-mean", 100.0),
    "-x100 bounded (at bound)": ("bounded-mean", -100.0),
}


def hostile_fit(fit: Callable, factor: float | None) -> Callable:
    def run(self, rnd, cid, download, examples, state):
        upload = fit(self, rnd, cid, download, examples, state)
        if factor is not None and cid == ATTACKER:
            upload.payload.tensors = {k: t * factor if t.is_floating_point() else t
                                      for k, t in upload.payload.tensors.items()}
        return upload

    return run


def final_loss(method: str, seed: int, rule: str, factor: float | None, out: Path,
               overrides: list[str]) -> tuple[float, int]:
    """(final evaluation loss, updates clipped over the run) of one run."""
    spec = get_method(method)
    fit = spec.client.fit
    spec.client.fit = hostile_fit(fit, factor)
    try:
        config = load_config(EXAMPLES / "smoke.toml", [
            f"method.name='{method}'", "federation.clients_per_round=3", f"federation.seed={seed}",
            "eval.generate=false", f"method.aggregation='{rule}'", *EXTRA.get(method, []), *overrides])
        summary = run_local(config, out, quiet=True)
    finally:
        spec.client.fit = fit
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary["final_eval"]["loss"], int(sum(r["aggregate"].get("clipped", 0) for r in rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. method.norm_bound_factor=2)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    table = Table(title="final eval loss, smoke config, 3 clients (client 1 hostile), mean over seeds " + args.seeds)
    for column in ("method", *CASES, "clean noise (max-min)", "honest clips (clean bounded)"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods.split(","):
            losses: dict[str, list[float]] = {case: [] for case in CASES}
            clean_clips = 0
            for seed in seeds:
                for case, (rule, factor) in CASES.items():
                    loss, clipped = final_loss(method, seed, rule, factor,
                                               Path(work) / f"{method}-{seed}-{case.replace(' ', '_')}", args.set)
                    losses[case].append(loss)
                    if case == "clean bounded":
                        clean_clips += clipped
            clean = losses["clean mean"]
            table.add_row(method, *(f"{statistics.fmean(v):.3f}" for v in losses.values()),
                          f"{max(clean) - min(clean):.3f}", str(clean_clips))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
