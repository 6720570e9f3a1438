"""How much can proxy-tuning pass on at all? The small expert trained centrally on every client's
examples pooled (no federation, no averaging of non-IID updates), then the small model alone and
the proxy-tuned large model evaluated at several α.

If even this expert leaves the proxy far from FedIT-on-large, the gap is the small/large pair's
and proxy-tuning's, not the federation's. Takes a FedPT run directory for its config (model pair,
data, LoRA, lr); the run's own adapters are not used.

    python benchmarks/fedpt_ceiling.py runs/s5-fedavg-pt/fedavg-pt --steps 200 --alphas 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedpt_alpha import fedpt_config, fedpt_server  # benchmarks/ is on sys.path when a script runs
from thinwire.data import build_federation
from thinwire.evaluate import evaluate_splits
from thinwire.methods.base import snapshot
from thinwire.seeding import derive_seed
from thinwire.train.first_order import batch_stream, train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a fedpt run directory (its config.toml is used)")
    parser.add_argument("--steps", type=int, default=200, help="central optimizer steps on the pooled examples")
    parser.add_argument("--alphas", default="1,2", help="comma-separated strengths")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = fedpt_config(args.run_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, local_steps=args.steps))
    workbench, server = fedpt_server(config)
    federation = build_federation(config)
    pooled = [example for client in federation.clients for example in client]
    model, params = workbench.trainable(True)
    rng = np.random.default_rng(derive_seed(config.federation.seed, "fedpt-ceiling"))
    started = time.perf_counter()
    stats = train_local(model, list(params.values()),
                        batch_stream(pooled, workbench.tokenizer, config.train.batch_size, config.data.max_length, rng),
                        config.train)
    train_s = time.perf_counter() - started
    server.expert = snapshot(params)
    splits = federation.eval_splits()

    def scores(evaluated: torch.nn.Module) -> dict[str, float]:
        return evaluate_splits(evaluated, workbench.tokenizer, splits, config.eval, config.data.max_length)

    table = Table(title=f"small expert {config.model.name} trained centrally: {args.steps} steps of batch "
                        f"{config.train.batch_size} on {len(pooled)} pooled examples, lr {config.train.lr:g} "
                        f"(train loss {stats.loss:.3f}, {train_s:.0f} s)")
    for column in ("evaluated model", "loss", "Rouge-L", "exact match"):
        table.add_column(column, justify="right")
    rows = [("small expert alone", scores(model))]
    for alpha in (float(a) for a in args.alphas.split(",")):
        server.options = dataclasses.replace(server.options, alpha=alpha)
        rows.append((f"proxy-tuned {server.options.large}, α {alpha:g}", scores(server.eval_model())))
    for label, s in rows:
        table.add_row(label, f"{s['loss']:.3f}", f"{s.get('rougeL', float('nan')):.3f}",
                      f"{s.get('exact_match', float('nan')):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
