"""FedKSeed's local step against its floor: one ZO step (`zo_step`: z drawn once, two forwards,
the update) timed beside the two forward passes it cannot avoid, and beside the three-draw route
(`zo_estimate` regenerating z per forward, then `apply_seed_scalars` regenerating it again).

Model: SmolLM2-135M-shaped Llama (random init, float32, CPU). Batches: the headline's local batch
(4 x 128 tokens) and the FedKSeed authors' (1 example; --seq tokens). Medians over --reps.

    python benchmarks/zo_step.py            # ~2 minutes on 2 cores
    python benchmarks/zo_step.py --layers 2 # quick
"""

from __future__ import annotations

import argparse

import torch
from fedkseed_rebuild import EPS, LR, build, timed
from rich.console import Console
from rich.table import Table

from thinwire.train.zeroth_order import SeedPool, apply_seed_scalars, zo_estimate, zo_parameters, zo_step


def batch(rows: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (rows, seq), generator=torch.Generator().manual_seed(rows * 1000 + seq))
    return {"input_ids": ids, "labels": ids}


def median_s(fn, reps: int) -> float:
    fn()  # warm-up
    return timed(fn, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128, help="tokens per example")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers)
    params = zo_parameters(model)
    pool = SeedPool(4096, 0)
    table = Table(title=f"ZO step vs two forwards ({sum(p.numel() for p in params) / 1e6:.1f}M weights, "
                        f"{args.threads} threads, median of {args.reps})")
    for col in ("batch", "two forwards (floor)", "three-draw route", "zo_step", "zo_step / floor",
                "three-draw / floor"):
        table.add_column(col, justify="right")
    for rows in (4, 1):
        b = batch(rows, args.seq)

        @torch.no_grad()
        def forwards() -> None:
            model(**b, use_cache=False)
            model(**b, use_cache=False)

        def three_draw() -> None:
            est = zo_estimate(model, params, pool.seed(7), EPS, b, threads=args.threads)
            apply_seed_scalars(params, pool, {7: est.g}, LR, threads=args.threads)

        floor = median_s(forwards, args.reps)
        old = median_s(three_draw, args.reps)
        new = median_s(lambda: zo_step(model, params, pool.seed(7), EPS, LR, b, threads=args.threads), args.reps)
        table.add_row(f"{rows} x {args.seq}", f"{floor:.3f} s", f"{old:.3f} s", f"{new:.3f} s",
                      f"{new / floor:.2f}x", f"{old / floor:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
