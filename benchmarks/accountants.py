"""One DP run's ε under three accounting conventions, side by side (docs/privacy.md says which
holds for thinwire and why the others do not).

    python benchmarks/accountants.py docs/benchmarks/s13-privacy/fedit-eps8 [RUN_DIR ...]

- thinwire: replace-one neighbours (sensitivity 2C, multiplier z/2), the Gaussian mechanism
  composed over the releases that touched the most exposed client (its privacy_ledger.jsonl),
  no amplification (the sample is public);
- Flower-style: add/remove-one neighbours (sensitivity C, multiplier z) composed over every
  round, no amplification: what Flower's accounted DP strategies assume (Flower 1.41, installed
  here, computes no ε);
- Poisson add/remove: each client joins each round independently with q = m/N (the textbook
  DP-FedAvg analysis): amplification that needs a secret Poisson sample, which neither thinwire's
  fixed-size, public sample nor Flower's is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from rich.console import Console
from rich.table import Table

from thinwire.config import load_config
from thinwire.privacy import LEDGER, Ledger, epsilon

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def flower_style(z: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant(neighboring_relation=ADD_REMOVE)
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def poisson(z: float, q: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant(neighboring_relation=ADD_REMOVE)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    table = Table(title="ε of one run under three conventions (δ from the run's config)")
    for column in ("run", "z", "rounds", "m of N", "most releases", "thinwire", "Flower-style", "Poisson add/remove"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in args.runs:
        config = load_config(run / "config.toml")
        fed, privacy = config.federation, config.privacy
        z, delta = privacy.noise_multiplier, privacy.delta
        releases = Ledger(run / LEDGER).participations()
        table.add_row(str(run), f"{z:.3f}", str(fed.rounds), f"{fed.clients_per_round} of {fed.clients}",
                      str(max(releases.values(), default=0)), f"{epsilon(config, releases):.2f}",
                      f"{flower_style(z, fed.rounds, delta):.2f}",
                      f"{poisson(z, fed.clients_per_round / fed.clients, fed.rounds, delta):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
