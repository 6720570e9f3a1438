"""Why Ferret's local optimizer matters: the projection's noise against the update, per block.

One client's local round on the headline work (SmolLM2-135M, first client's data, 10 steps of
batch 4), once with the released code's SGD and once with AdamW, each at the lr the headline
uses. Each update Δ is projected and reconstructed with the sketch basis at several K_max; per
block l the script reports the relative error ‖Δ̃_l − Δ_l‖/‖Δ_l‖ (theory: ≈ √(d_l/K_l)), and the
error's RMS per weight against the RMS of the weights themselves: the perturbation a client's
model takes from the projection, which is what decides whether the round helps or hurts.

    python benchmarks/ferret_noise.py                      # ~2 minutes on 2 cores
    python benchmarks/ferret_noise.py --k-max 200,2000,20000 --basis sketch
"""

from __future__ import annotations

import argparse
import math
import statistics

from rich.console import Console
from rich.table import Table

from thinwire.compress.projection import allocate, block_norms
from thinwire.compress.sketch import make_codec
from thinwire.config import load_config
from thinwire.data import build_federation
from thinwire.methods.base import RunContext, Workbench, load_into, snapshot
from thinwire.methods.ferret import FerretClient

OPTIMIZERS = {"sgd": 5e-2, "adamw": 1e-4}  # the headline's lr for each (benchmarks/compare_smollm2.toml)


def local_update(client: FerretClient, model, params, base, examples, optimizer: str, lr: float):
    load_into(params, base)
    client.config.train.optimizer, client.config.train.lr = optimizer, lr
    client.local_train(model, params, examples, rnd=1, client_id=0)
    return {name: base[name] - p.detach() for name, p in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="benchmarks/compare_smollm2.toml")
    ap.add_argument("--k-max", default="200,2000,20000")
    ap.add_argument("--basis", default="sketch", choices=("sketch", "uniform"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    config = load_config(args.config, ["method.name=ferret", *args.overrides])
    ctx = RunContext(config, Workbench(config))
    client = FerretClient(ctx)
    model, params = ctx.workbench.trainable(False)
    base = snapshot(params)
    examples = build_federation(config).clients[0]
    weight_rms = {b.index: float(b.gather(base).square().mean().sqrt()) for b in client.blocks}

    table = Table(title=f"projection noise per block, {args.basis} basis ({len(client.blocks)} blocks, "
                        f"{sum(b.size for b in client.blocks) / 1e6:.1f}M weights, one client's round)")
    for col in ("optimizer", "K_max", "coords sent", "‖Δ‖", "‖Δ̃−Δ‖/‖Δ‖ all", "median block (theory)",
                "error RMS / weight RMS (median, max block)"):
        table.add_column(col, justify="right")
    for optimizer, lr in OPTIMIZERS.items():
        delta = local_update(client, model, params, base, examples, optimizer, lr)
        norms = block_norms(client.blocks, delta)
        for k_max in [int(k) for k in args.k_max.split(",")]:
            codec = make_codec(client.blocks, config.federation.seed, args.basis, k_max=k_max)
            ks = allocate(norms, k_max, 2, "code")
            coords = codec.project(delta, 1, ks, scaling="unbiased")
            err_sq, rel, theory, perturb = 0.0, [], [], []
            for blk, flat in codec.iter_reconstruct(coords, 1):
                true = blk.gather(delta)
                e = float((flat - true).square().sum())
                err_sq += e
                if norms[blk.index] > 0:
                    rel.append(math.sqrt(e) / norms[blk.index])
                    theory.append(math.sqrt(blk.size / max(ks[blk.index], 1)))
                perturb.append(math.sqrt(e / blk.size) / max(weight_rms[blk.index], 1e-12))
            total = math.sqrt(sum(n * n for n in norms))
            table.add_row(f"{optimizer} lr {lr:g}", f"{k_max:,}", f"{sum(ks):,}", f"{total:.3g}",
                          f"{math.sqrt(err_sq) / total:.1f}",
                          f"{statistics.median(rel):.1f} ({statistics.median(theory):.1f})",
                          f"{statistics.median(perturb):.2g}, {max(perturb):.2g}")
    Console().print(table)


if __name__ == "__main__":
    main()
